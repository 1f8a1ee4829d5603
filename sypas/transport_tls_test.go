package sypas

import (
	"context"
	"crypto/tls"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/control"
	"github.com/sypas/go/internal/testtls"
)

// forceTLS makes sockPath hand out tcp:// addresses, so that the kernels
// of startKernel and startHelperKernel listen on TCP with TLS and dialT's
// Clients dial them with a client certificate. SYPAS_TRANSPORT=tls sets
// it for the whole package run; TestTLSConformance for the conformance
// set.
var forceTLS atomic.Bool

// tlsCAEnv carries the test CA (PEM) to a helper kernel process: made at
// run time, never stored.
const tlsCAEnv = "SYPAS_TEST_TLS_CA"

var (
	caOnce sync.Once
	ca     *testtls.CA
	caErr  error
)

// testCA is the CA of this test process: its parent's, for a helper
// process.
func testCA(t testing.TB) *testtls.CA {
	caOnce.Do(func() {
		if p := os.Getenv(tlsCAEnv); p != "" {
			ca, caErr = testtls.ParseCA(p)
		} else {
			ca, caErr = testtls.NewCA("sypas test CA")
		}
	})
	if t != nil {
		require.NoError(t, caErr)
	}
	return ca
}

func testCAPEM(t testing.TB) string {
	p, err := testCA(t).PEM()
	require.NoError(t, err)
	return p
}

// skipOnTLS skips a test whose subject exists only on a Unix socket, in
// a run on TCP with TLS.
func skipOnTLS(t *testing.T, why string) {
	t.Helper()
	if forceTLS.Load() {
		t.Skip("not on TCP: " + why)
	}
}

// needRings skips a test about the shared-memory rings, or what only they
// carry (bulk spans), in a run over another transport.
func needRings(t *testing.T, why string) {
	t.Helper()
	if forceInline.Load() || forceTLS.Load() {
		t.Skip("needs the rings: " + why)
	}
}

func isTCP(addr string) bool { return strings.HasPrefix(addr, "tcp://") }

// freeTCPAddr is tcp:// on a loopback port free a moment ago: a kernel
// restarted at it listens on the same port.
func freeTCPAddr(t testing.TB) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return "tcp://" + l.Addr().String()
}

// listenAt listens at a kernel address of the tests: a socket path, or
// tcp:// with TLS admitting the test daemons' certificate URI.
func listenAt(addr string) (*control.Listener, error) {
	if !isTCP(addr) {
		return control.Listen(addr, control.Config{})
	}
	if testCA(nil) == nil {
		return nil, caErr
	}
	sc, err := ca.ServerConfig()
	if err != nil {
		return nil, err
	}
	return control.ListenTLS(strings.TrimPrefix(addr, "tcp://"), sc,
		control.Config{Policy: &control.Policy{CertURIs: []string{testtls.DaemonURI}}, Logger: quiet})
}

// daemonTLS is a daemon's TLS configuration with a certificate of the
// test CA for cn and uri.
func daemonTLS(t testing.TB, cn, uri string) *tls.Config {
	cert, err := testCA(t).Client(cn, uri)
	require.NoError(t, err)
	return ca.ClientConfig(cert)
}

// withTLS gives cfg the test daemon's certificate if addr is tcp://, and
// reports whether it is.
func withTLS(t testing.TB, addr string, cfg *ClientConfig) bool {
	if !isTCP(addr) {
		return false
	}
	if cfg.TLS == nil {
		cfg.TLS = daemonTLS(t, "daemon", testtls.DaemonURI)
	}
	return true
}

// The bridge's behaviour (conformance) over TCP with TLS 1.3 and client
// certificates, the kernel killed and restarted in another process
// included.
func TestTLSConformance(t *testing.T) {
	if forceTLS.Load() {
		t.Skip("the whole run is on TCP with TLS already")
	}
	if forceInline.Load() {
		t.Skip("the whole run is inline on the Unix socket")
	}
	forceTLS.Store(true)
	defer forceTLS.Store(false)
	for _, tc := range conformance {
		if tc.rings {
			continue
		}
		t.Run(tc.name, tc.fn)
	}
}

// A Client on TCP with TLS: Transport says so, the kernel attested the
// certificate (the token's subject is no uid), nothing is logged as a
// fallback.
func TestTLSClient(t *testing.T) {
	addr := freeTCPAddr(t)
	k := startKernelAt(t, addr, ServerConfig{}, func(s *Server) { s.Handle("echo", RightRequest, echo) })
	log := &inlineLog{}
	c := dialT(t, k.path, ClientConfig{DialConfig: control.DialConfig{SessionConfig: control.SessionConfig{Logger: slog.New(log)}}})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	got, err := c.Call(ctx, "echo", []byte("over tls"))
	require.NoError(t, err)
	assert.Equal(t, "over tls", string(got))
	info, err := c.Transport()
	require.NoError(t, err)
	assert.Equal(t, TransportTLS, info.Name)
	assert.Equal(t, addr, info.Address)
	assert.Empty(t, info.Fallback)
	assert.Contains(t, info.Reason, "not a Unix socket")
	tok, err := c.Token()
	require.NoError(t, err)
	assert.EqualValues(t, control.NoUID, tok.Subject.UID)
	assert.Zero(t, log.count(inlineMsg), "TCP is no fallback to inline")
	assert.Zero(t, log.count("fallback"))
	assert.Zero(t, k.srv.Stats().Inline, "counted as inline only on a Unix socket")
}

// Refused on TLS: an identity the kernel's policy does not admit (the
// kernel says E_PERMISSION), a certificate of another CA (not even sent:
// the kernel names the CAs it takes, and requires one); and an address
// that cannot work (no TLS, plaintext to another host) before anything
// is dialed. Dial keeps trying until its context ends, then reports the
// last refusal.
func TestTLSClientRefused(t *testing.T) {
	k := startKernelAt(t, freeTCPAddr(t), ServerConfig{}, nil)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_, err := Dial(ctx, k.path, ClientConfig{DialConfig: control.DialConfig{TLS: daemonTLS(t, "intruder", "spiffe://sypas.test/intruder"),
		SessionConfig: control.SessionConfig{Logger: quiet}}})
	require.Error(t, err)
	assert.ErrorIs(t, err, ErrPermission)

	other, err := testtls.NewCA("another CA")
	require.NoError(t, err)
	cert, err := other.Client("daemon", testtls.DaemonURI)
	require.NoError(t, err)
	cfg := other.ClientConfig(cert)
	cfg.RootCAs = testCA(t).Pool // the kernel is genuine; the daemon's CA is not its
	short, cancelShort := context.WithTimeout(context.Background(), time.Second)
	defer cancelShort()
	_, err = Dial(short, k.path, ClientConfig{DialConfig: control.DialConfig{TLS: cfg, SessionConfig: control.SessionConfig{Logger: quiet}}})
	require.Error(t, err)
	assert.ErrorIs(t, err, ErrPermission)
	assert.Contains(t, err.Error(), "the kernel refused the TLS handshake: remote error: tls: certificate required")

	_, err = NewClient(k.path, ClientConfig{})
	assert.ErrorIs(t, err, control.ErrConfig, "tcp:// without TLS")
	_, err = NewClient("tcp://192.0.2.7:7070", ClientConfig{DialConfig: control.DialConfig{InsecurePlaintextLoopback: true}})
	assert.ErrorIs(t, err, control.ErrConfig, "plaintext off loopback")
}

// A preference order: the Unix socket first, TCP with TLS when nobody
// listens at the socket. The fallback is taken, Transport says why, and
// one line is logged.
func TestTransportFallback(t *testing.T) {
	k := startKernelAt(t, freeTCPAddr(t), ServerConfig{}, func(s *Server) { s.Handle("echo", RightRequest, echo) })
	missing := filepath.Join(t.TempDir(), "k.sock") // nobody listens
	log := &inlineLog{}
	cfg := ClientConfig{DialConfig: control.DialConfig{Fallbacks: []string{"grpc://127.0.0.1:1", k.path},
		SessionConfig: control.SessionConfig{Logger: slog.New(log)}}}
	withTLS(t, k.path, &cfg)
	c := dialT(t, "unix://"+missing, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := c.Call(ctx, "echo", nil)
	require.NoError(t, err)
	info, err := c.Transport()
	require.NoError(t, err)
	assert.Equal(t, TransportTLS, info.Name)
	assert.Equal(t, k.path, info.Address)
	assert.Contains(t, info.Fallback, missing)
	assert.Contains(t, info.Fallback, "grpc is not built in this binary")
	assert.Equal(t, 1, log.count("sypas: connected at a fallback address"))
}

// With a kernel on the Unix socket the better transport is taken and the
// fallback never tried.
func TestTransportPreferenceTakesTheBest(t *testing.T) {
	k := startKernel(t, ServerConfig{}, func(s *Server) { s.Handle("echo", RightRequest, echo) })
	if isTCP(k.path) {
		t.Skip("needs a Unix socket")
	}
	c := dialT(t, k.path, ClientConfig{DialConfig: control.DialConfig{Fallbacks: []string{"tcp://127.0.0.1:1"},
		TLS: daemonTLS(t, "daemon", testtls.DaemonURI)}})
	info, err := c.Transport()
	require.NoError(t, err)
	want := TransportRings
	if forceInline.Load() {
		want = TransportInline // shared memory turned off: still the Unix socket
	}
	assert.Equal(t, want, info.Name)
	assert.Empty(t, info.Fallback)
}
