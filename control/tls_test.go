package control

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/internal/testtls"
	"github.com/sypas/go/wire"
)

// tlsMaterial is a CA, a kernel TLS configuration it signs, and a daemon
// certificate (URI testtls.DaemonURI): made per test, never stored.
type tlsMaterial struct {
	ca     *testtls.CA
	server *tls.Config
	daemon tls.Certificate
}

func newTLSMaterial(t *testing.T) *tlsMaterial {
	t.Helper()
	ca, err := testtls.NewCA("sypas test CA")
	require.NoError(t, err)
	server, err := ca.ServerConfig()
	require.NoError(t, err)
	daemon, err := ca.Client("daemon", testtls.DaemonURI)
	require.NoError(t, err)
	return &tlsMaterial{ca: ca, server: server, daemon: daemon}
}

// startTLSServer listens on 127.0.0.1 with TLS (nil server config:
// plaintext loopback) and accepts sessions in the background.
func startTLSServer(t *testing.T, server *tls.Config, lc Config, cfg ServerConfig) *testServer {
	t.Helper()
	if cfg.Keys == nil {
		cfg.Keys = testKeys(t)
	}
	if lc.Policy == nil {
		lc.Policy = &Policy{CertURIs: []string{testtls.DaemonURI}}
	}
	l, err := ListenTLS("127.0.0.1:0", server, lc)
	require.NoError(t, err)
	srv, err := NewServer(l, cfg)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	ts := &testServer{path: l.URL(), l: l, srv: srv, sess: make(chan *Session, 16), errs: make(chan error, 16), stop: cancel, done: make(chan struct{})}
	go func() {
		defer close(ts.done)
		for ctx.Err() == nil {
			s, err := srv.Accept(ctx)
			if err != nil {
				if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
					return
				}
				ts.errs <- err
				continue
			}
			ts.sess <- s
		}
	}()
	t.Cleanup(ts.Close)
	return ts
}

// A daemon on TCP with TLS: the same handshake without REGIONS, the data
// plane inline, the certificate as the attested identity, the token bound
// to it; heartbeats and an orderly GOAWAY as on a Unix socket.
func TestTLSSession(t *testing.T) {
	m := newTLSMaterial(t)
	ts := startTLSServer(t, m.server, Config{}, ServerConfig{SessionConfig: SessionConfig{HeartbeatInterval: 20 * time.Millisecond}})
	require.True(t, strings.HasPrefix(ts.path, "tcp://127.0.0.1:"), ts.path)
	d := dialT(t, ts.path, DialConfig{TLS: m.ca.ClientConfig(m.daemon)})
	k := ts.session(t)

	assert.Equal(t, NetworkTLS, d.Network())
	assert.Equal(t, NetworkTLS, k.Network())
	assert.Empty(t, d.Fallback())
	require.NotNil(t, d.Inline(), "no shared memory across TCP")
	assert.Nil(t, d.Producer())
	assert.Contains(t, d.Inline().Reason(), "tcp+tls, not a Unix socket")
	assert.Zero(t, d.Params().Features&wire.FeatureInlineOnly)

	peer := k.Peer()
	require.NotNil(t, peer.Cert)
	assert.False(t, peer.Local())
	assert.Equal(t, []string{testtls.DaemonURI}, peer.Cert.URIs)
	assert.Equal(t, "CN=daemon", peer.Cert.Subject)
	assert.Equal(t, sha256.Sum256(m.daemon.Certificate[0]), peer.Cert.SHA256)
	assert.EqualValues(t, NoUID, peer.UID)
	assert.Zero(t, peer.PID)
	assert.True(t, strings.HasPrefix(peer.Remote, "127.0.0.1:"))
	sub := k.Capability().Subject
	assert.EqualValues(t, NoUID, sub.UID, "the token is bound to no uid")
	assert.Equal(t, peer.Cert.SHA256, sub.ExeSHA256, "and to the certificate")

	for i := range 10 {
		inlineExchange(t, d, k, string(rune('a'+i)))
		time.Sleep(5 * time.Millisecond) // heartbeats interleave
	}
	kread := make(chan error, 1)
	go func() {
		for {
			if _, err := k.Inline().Next(time.Time{}); err != nil {
				kread <- err
				return
			}
		}
	}()
	kdone := make(chan error, 1)
	go func() {
		<-k.GoAway()
		kdone <- k.Shutdown(context.Background())
	}()
	require.NoError(t, d.Shutdown(context.Background()))
	require.NoError(t, <-kdone)
	assert.ErrorIs(t, <-kread, ErrSessionClosed)
}

// recordLog keeps the audit records written to it, one line each.
type recordLog struct {
	mu    sync.Mutex
	lines []string
}

func (l *recordLog) Enabled(context.Context, slog.Level) bool { return true }
func (l *recordLog) WithAttrs([]slog.Attr) slog.Handler       { return l }
func (l *recordLog) WithGroup(string) slog.Handler            { return l }
func (l *recordLog) Handle(_ context.Context, r slog.Record) error {
	var b strings.Builder
	b.WriteString(r.Message)
	r.Attrs(func(a slog.Attr) bool {
		b.WriteString(" " + a.Key + "=" + a.Value.String())
		return true
	})
	l.mu.Lock()
	l.lines = append(l.lines, b.String())
	l.mu.Unlock()
	return nil
}

func (l *recordLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.lines, "\n")
}

// Refusals on TLS: no client certificate, one from another CA, an
// identity the policy does not admit. Each fails the daemon's Dial with
// ErrHandshake and is one audit record on the kernel.
func TestTLSRefusals(t *testing.T) {
	m := newTLSMaterial(t)
	other, err := testtls.NewCA("another CA")
	require.NoError(t, err)
	foreign, err := other.Client("daemon", testtls.DaemonURI)
	require.NoError(t, err)
	stranger, err := m.ca.Client("stranger", "spiffe://sypas.test/stranger")
	require.NoError(t, err)
	noCert := m.ca.ClientConfig(tls.Certificate{})
	noCert.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &tls.Certificate{}, nil }

	for _, tc := range []struct {
		name   string
		cfg    *tls.Config
		reason string
		code   error
	}{
		{"no client certificate", noCert, "TLS handshake", nil},
		{"another CA", m.ca.ClientConfig(foreign), "TLS handshake", nil},
		{"identity not allowed", m.ca.ClientConfig(stranger), "certificate identity not allowed", wire.ErrPermission},
	} {
		t.Run(tc.name, func(t *testing.T) {
			log := &recordLog{}
			ts := startTLSServer(t, m.server, Config{}, ServerConfig{SessionConfig: SessionConfig{Logger: slog.New(log)}})
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			s, err := Dial(ctx, ts.path, DialConfig{TLS: tc.cfg, SessionConfig: SessionConfig{Logger: quietLogger()}})
			if s != nil {
				s.Close()
			}
			require.Error(t, err)
			assert.ErrorIs(t, err, ErrHandshake)
			assert.False(t, Unreachable(err), "a refusal is no reason to fall back")
			if tc.code != nil {
				assert.ErrorIs(t, err, tc.code, "the kernel says why: %v", err)
			}
			kerr := ts.acceptErr(t)
			assert.ErrorIs(t, kerr, ErrPeerRejected)
			assert.Contains(t, kerr.Error(), tc.reason)
			assert.Contains(t, log.String(), "event=attestation")
			assert.Contains(t, log.String(), "peer_addr=127.0.0.1:")
		})
	}
}

func quietLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }

// Configurations that would be insecure are refused before anything
// listens or connects.
func TestTLSConfigRefusals(t *testing.T) {
	m := newTLSMaterial(t)
	pol := &Policy{CertURIs: []string{testtls.DaemonURI}}
	for _, tc := range []struct {
		name string
		addr string
		tls  *tls.Config
		cfg  Config
		want string
	}{
		{"plaintext without the flag", "127.0.0.1:0", nil, Config{}, "InsecurePlaintextLoopback"},
		{"plaintext on a non-loopback address", "0.0.0.0:0", nil, Config{InsecurePlaintextLoopback: true}, "only a loopback address"},
		{"plaintext on a host name", "example.com:0", nil, Config{InsecurePlaintextLoopback: true}, "only a loopback address"},
		{"no certificate rule", "127.0.0.1:0", m.server, Config{}, "admits no certificate"},
		{"client certificates not verified", "127.0.0.1:0", withClientAuth(m.server, tls.RequestClientCert), Config{Policy: pol}, "RequireAndVerifyClientCert"},
		{"TLS 1.2 only", "127.0.0.1:0", withMaxVersion(m.server, tls.VersionTLS12), Config{Policy: pol}, "TLS 1.3 is required"},
		{"no client CA", "127.0.0.1:0", &tls.Config{Certificates: m.server.Certificates}, Config{Policy: pol}, "ClientCAs"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l, err := ListenTLS(tc.addr, tc.tls, tc.cfg)
			if l != nil {
				l.Close()
			}
			require.ErrorIs(t, err, ErrConfig)
			assert.Contains(t, err.Error(), tc.want)
		})
	}
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		addr string
		cfg  DialConfig
		want string
	}{
		{"no TLS", "tcp://127.0.0.1:1", DialConfig{}, "DialConfig.TLS"},
		{"plaintext to another host", "tcp://192.0.2.1:7070", DialConfig{InsecurePlaintextLoopback: true}, "only a loopback address"},
		{"no client certificate", "tcp://127.0.0.1:1", DialConfig{TLS: m.ca.ClientConfig(tls.Certificate{})}, "client certificate"},
		{"bad address", "tcp://nohostport", DialConfig{}, "host:port"},
	} {
		t.Run("dial "+tc.name, func(t *testing.T) {
			_, err := Dial(ctx, tc.addr, tc.cfg)
			require.ErrorIs(t, err, ErrConfig)
			assert.Contains(t, err.Error(), tc.want)
			assert.False(t, Unreachable(err))
		})
	}
}

func withClientAuth(c *tls.Config, a tls.ClientAuthType) *tls.Config {
	c = c.Clone()
	c.ClientAuth = a
	return c
}

func withMaxVersion(c *tls.Config, v uint16) *tls.Config {
	c = c.Clone()
	c.MaxVersion = v
	return c
}

// Plain TCP on loopback, when both sides say so: no identity but the
// address, inline.
func TestPlaintextLoopback(t *testing.T) {
	ts := startTLSServer(t, nil, Config{InsecurePlaintextLoopback: true}, ServerConfig{})
	d := dialT(t, ts.path, DialConfig{InsecurePlaintextLoopback: true})
	k := ts.session(t)
	assert.Equal(t, NetworkPlain, d.Network())
	assert.Nil(t, k.Peer().Cert)
	assert.False(t, k.Peer().Local())
	inlineExchange(t, d, k, "plain")
}

// HandshakeConn and DialConn run a session on any stream with deadlines
// (net.Pipe here, as a gRPC stream adapted to a net.Conn would be): the
// caller's identity is the peer's, the data plane inline.
func TestHandshakeConnOnAStream(t *testing.T) {
	srv, err := NewStreamServer(ServerConfig{Keys: testKeys(t)})
	require.NoError(t, err)
	kc, dc := net.Pipe()
	peer := PeerIdentity{UID: NoUID, GID: NoUID, Remote: "pipe", Cert: &CertIdentity{URIs: []string{testtls.DaemonURI}, SHA256: [32]byte{1}}}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	kch := make(chan *Session, 1)
	go func() {
		k, err := srv.HandshakeConn(ctx, kc, peer)
		assert.NoError(t, err)
		kch <- k
	}()
	d, err := DialConn(ctx, dc, DialConfig{})
	require.NoError(t, err)
	defer d.Close()
	k := <-kch
	require.NotNil(t, k)
	defer k.Close()
	assert.Equal(t, "pipe", k.Network())
	assert.Equal(t, peer, k.Peer())
	assert.Equal(t, [32]byte{1}, k.Capability().Subject.ExeSHA256)
	inlineExchange(t, d, k, "stream")

	_, err = srv.Accept(ctx)
	assert.ErrorIs(t, err, ErrConfig, "no Listener")

	// A local identity is only a Listener's to give.
	kc, dc = net.Pipe()
	defer dc.Close()
	_, err = srv.HandshakeConn(ctx, kc, PeerIdentity{UID: 1000, GID: 1000, PID: 1})
	assert.ErrorIs(t, err, ErrPeerRejected)
}

func TestParseAddress(t *testing.T) {
	for _, tc := range []struct{ in, network, where string }{
		{"/run/sypas.sock", "unix", "/run/sypas.sock"},
		{"rel/x.sock", "unix", "rel/x.sock"},
		{"unix:///run/sypas.sock", "unix", "/run/sypas.sock"},
		{"tcp://kernel.example:7070", "tcp", "kernel.example:7070"},
		{"tcp://[::1]:7070", "tcp", "[::1]:7070"},
		{"grpc://kernel.example:7443", "grpc", "kernel.example:7443"},
	} {
		n, w, err := ParseAddress(tc.in)
		require.NoError(t, err, tc.in)
		assert.Equal(t, tc.network, n, tc.in)
		assert.Equal(t, tc.where, w, tc.in)
	}
	for _, bad := range []string{"", "://x", "unix://", "unix://relative", "tcp://nohost", "grpc://"} {
		_, _, err := ParseAddress(bad)
		assert.ErrorIs(t, err, ErrConfig, bad)
	}
}

// A preference order: a Unix socket nobody listens at, a transport not
// built in, then TCP with TLS. Each is passed over because it cannot be
// reached, and the session says why.
func TestDialFallbacks(t *testing.T) {
	m := newTLSMaterial(t)
	ts := startTLSServer(t, m.server, Config{}, ServerConfig{})
	missing := sockPath(t)
	d := dialT(t, "unix://"+missing, DialConfig{TLS: m.ca.ClientConfig(m.daemon), Fallbacks: []string{"grpc://127.0.0.1:1", ts.path}})
	ts.session(t)
	assert.Equal(t, NetworkTLS, d.Network())
	assert.Contains(t, d.Fallback(), missing)
	assert.Contains(t, d.Fallback(), "grpc is not built in this binary")

	_, err := Dial(context.Background(), "grpc://127.0.0.1:1", DialConfig{})
	assert.ErrorIs(t, err, ErrNoTransport)
	assert.True(t, Unreachable(err))

	// A refusal ends the search: the next address is not tried.
	stranger, err := m.ca.Client("stranger", "")
	require.NoError(t, err)
	_, err = Dial(context.Background(), ts.path, DialConfig{TLS: m.ca.ClientConfig(stranger), Fallbacks: []string{"unix://" + missing},
		SessionConfig: SessionConfig{Logger: quietLogger()}})
	assert.ErrorIs(t, err, wire.ErrPermission)
	assert.NotContains(t, err.Error(), missing)
}
