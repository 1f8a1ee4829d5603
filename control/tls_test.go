package control

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"log/slog"
	"net"
	"os"
	"strings"
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
	if lc.Policy == nil {
		lc.Policy = &Policy{CertURIs: []string{testtls.DaemonURI}}
	}
	l, err := ListenTLS("127.0.0.1:0", server, lc)
	require.NoError(t, err)
	return serveT(t, l, l.URL(), cfg)
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
	inlineShutdown(t, d, k)
}

// Refusals on TLS: no client certificate, one from another CA, an
// identity the policy does not admit. Each fails the daemon's Dial with
// ErrHandshake and is one audit record on the kernel, naming the peer by
// its address (and its certificate, once verified).
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
		name    string
		cfg     *tls.Config
		reason  string
		code    error
		subject string // in the record: the certificate, once verified
	}{
		{"no client certificate", noCert, "TLS handshake", nil, ""},
		{"another CA", m.ca.ClientConfig(foreign), "TLS handshake", nil, ""},
		{"identity not allowed", m.ca.ClientConfig(stranger), "certificate identity not allowed", wire.ErrPermission, "CN=stranger"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sink, log := newAuditSink()
			ts := startTLSServer(t, m.server, Config{}, ServerConfig{SessionConfig: SessionConfig{Logger: log}})
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
			r := sink.one(t, EventAttestation)
			assert.True(t, strings.HasPrefix(r[LogKeyPeerAddr], "127.0.0.1:"), "%v", r)
			assert.Equal(t, tc.subject, r[LogKeyCertSubject])
			assert.NotContains(t, r, LogKeyPeerUID, "a network peer has no uid")
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

// streamConn is a net.Conn of some other transport (as a gRPC stream
// adapted to one would be): its LocalAddr's network names it.
type streamConn struct{ net.Conn }

type streamAddr struct{}

func (streamAddr) Network() string      { return "stream" }
func (streamAddr) String() string       { return "stream" }
func (streamConn) LocalAddr() net.Addr  { return streamAddr{} }
func (streamConn) RemoteAddr() net.Addr { return streamAddr{} }

// streamPair is two connected streamConns (TCP loopback under them).
func streamPair(t *testing.T) (net.Conn, net.Conn) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	a, err := net.Dial("tcp", l.Addr().String())
	require.NoError(t, err)
	b, err := l.Accept()
	require.NoError(t, err)
	t.Cleanup(func() { a.Close(); b.Close() })
	return streamConn{a}, streamConn{b}
}

// HandshakeConn and DialConn run a session on any stream with deadlines
// (as a gRPC stream adapted to a net.Conn would be): the caller's
// identity is the peer's, the data plane inline, and the kernel's Next
// reads the stream directly, through heartbeats.
func TestHandshakeConnOnAStream(t *testing.T) {
	srv, err := NewStreamServer(ServerConfig{Keys: testKeys(t), SessionConfig: SessionConfig{HeartbeatInterval: 20 * time.Millisecond}})
	require.NoError(t, err)
	kc, dc := streamPair(t)
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
	assert.Equal(t, "stream", k.Network())
	assert.Equal(t, "stream", d.Network())
	assert.Equal(t, peer, k.Peer())
	assert.Equal(t, [32]byte{1}, k.Capability().Subject.ExeSHA256)
	for i := range 10 {
		inlineExchange(t, d, k, string(rune('a'+i)))
		time.Sleep(10 * time.Millisecond) // heartbeats interleave
	}
	// Wake ends a wait of the kernel's reader and leaves the stream whole.
	go func() {
		time.Sleep(20 * time.Millisecond)
		k.Inline().Wake()
	}()
	_, err = k.Inline().Next(time.Time{})
	assert.ErrorIs(t, err, os.ErrDeadlineExceeded)
	inlineExchange(t, d, k, "after a wake")
	assert.NoError(t, d.Err())
	assert.NoError(t, k.Err())

	_, err = srv.Accept(ctx)
	assert.ErrorIs(t, err, ErrConfig, "no Listener")

	// A local identity is only a Listener's to give.
	kc, _ = streamPair(t)
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

// A session that ends with ERROR on TCP while the daemon's bytes lie
// unread at the kernel: the kernel shuts its writing side and keeps the
// socket open a moment (lingerAfterError), so the daemon, reading late,
// reads the ERROR and then the end of the stream, never a reset that
// discards the reason.
func TestTCPErrorSurvivesUnreadBytes(t *testing.T) {
	ts := startTLSServer(t, nil, Config{InsecurePlaintextLoopback: true}, ServerConfig{SessionConfig: SessionConfig{Logger: quietLogger()}})
	addr := strings.TrimPrefix(ts.path, "tcp://")
	for i := range 5 {
		c, err := net.Dial("tcp", addr)
		require.NoError(t, err)
		c.SetDeadline(time.Now().Add(10 * time.Second))
		// A version no kernel speaks, then bytes the kernel never reads.
		msg := append(encodeMsg(t, 1, &wire.Hello{MinVersion: 99, MaxVersion: 99}), make([]byte, 256<<10)...)
		_, err = c.Write(msg)
		require.NoError(t, err, "round %d", i)
		time.Sleep(20 * time.Millisecond) // the kernel has answered and ended the session
		e := readError(t, c)
		assert.ErrorIs(t, e, wire.ErrVersion, "round %d", i)
		c.Close()
		assert.ErrorIs(t, ts.acceptErr(t), ErrHandshake)
	}
}

// Plaintext is checked against the address the system resolved, not only
// the name given: "localhost" that a hosts file maps elsewhere is refused.
func TestOnLoopback(t *testing.T) {
	for _, ip := range []string{"127.0.0.1", "127.3.2.1", "::1"} {
		assert.NoError(t, onLoopback("f", &net.TCPAddr{IP: net.ParseIP(ip), Port: 1}), ip)
	}
	for _, a := range []net.Addr{&net.TCPAddr{IP: net.ParseIP("192.0.2.7"), Port: 1}, &net.TCPAddr{IP: net.IPv4zero, Port: 1}, &net.UnixAddr{Name: "x"}} {
		assert.ErrorIs(t, onLoopback("f", a), ErrConfig, "%v", a)
	}
}

// An empty rule admits nobody: not a certificate without a subject, nor
// one with an empty URI SAN.
func TestPolicyEmptyRulesAdmitNothing(t *testing.T) {
	p := &Policy{CertURIs: []string{"", ""}, CertSubjects: []string{""}}
	assert.Error(t, p.admitCert(&CertIdentity{}))
	assert.Error(t, p.admitCert(&CertIdentity{URIs: []string{""}}))
	p.CertURIs = append(p.CertURIs, "spiffe://x/d")
	assert.NoError(t, p.admitCert(&CertIdentity{URIs: []string{"", "spiffe://x/d"}}))
}
