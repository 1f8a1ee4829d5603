package sypasgrpc

import (
	"bytes"
	"context"
	"crypto/tls"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/sypas/go/control"
	"github.com/sypas/go/control/token"
	"github.com/sypas/go/internal/testlog"
	"github.com/sypas/go/internal/testtls"
	"github.com/sypas/go/sypas"
)

// TestKernel is a sypas.Server served over gRPC with mutual TLS on
// loopback, for the tests of this package and of package sypasgrpc_test
// (the stock client's). Its TLS material is made per test; nothing is on
// disk.
type TestKernel struct {
	Addr string // host:port
	Srv  *sypas.Server
	GS   *grpc.Server
	Svc  *Service
	Rev  *token.Revocations
	Log  *testlog.Recorder

	// TLS configurations of clients: Daemon's certificate is admitted by
	// the Policy, Intruder's (same CA) is not, OtherCA's is signed by a CA
	// the kernel does not trust (with the admitted URI), NoCert has none.
	Daemon, Intruder, OtherCA, NoCert *tls.Config

	tls  *tls.Config  // the server's
	log  *slog.Logger // writes to Log
	stop func()       // stops GS
}

// Ops of the TestKernel: "echo" (RightRequest), "admin" (RightAdmin),
// "fail" (answers E_NOT_FOUND "no such key"), "who" (the caller's
// certificate subject).
const (
	IntruderURI = "spiffe://sypas.test/intruder"
)

// StartTestKernel starts a TestKernel with the default configuration,
// stopped with the test.
func StartTestKernel(t testing.TB) *TestKernel { return startTestKernel(t, sypas.ServerConfig{}) }

func startTestKernel(t testing.TB, cfg sypas.ServerConfig) *TestKernel {
	t.Helper()
	ca, err := testtls.NewCA("sypas grpc test CA")
	require.NoError(t, err)
	other, err := testtls.NewCA("another CA")
	require.NoError(t, err)
	serverTLS, err := ca.ServerConfig()
	require.NoError(t, err)
	// Certificates are verified when given, and the Policy refuses a
	// connection without one per call: the refusal is then audited.
	serverTLS.ClientAuth = tls.VerifyClientCertIfGiven
	daemon, err := ca.Client("daemon", testtls.DaemonURI)
	require.NoError(t, err)
	intruder, err := ca.Client("intruder", IntruderURI)
	require.NoError(t, err)
	foreign, err := other.Client("daemon", testtls.DaemonURI)
	require.NoError(t, err)

	k := &TestKernel{Rev: token.NewRevocations()}
	k.Log, k.log = testlog.New()
	k.Daemon, k.Intruder = ca.ClientConfig(daemon), ca.ClientConfig(intruder)
	k.OtherCA, k.NoCert = ca.ClientConfig(tls.Certificate{}), ca.ClientConfig(tls.Certificate{})
	// Presented whatever CAs the kernel asks for (crypto/tls would send
	// none, as it matches none of them).
	k.OtherCA.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &foreign, nil }

	if cfg.Keys == nil {
		cfg.Keys = token.NewKeyring()
		require.NoError(t, cfg.Keys.Add(1, bytes.Repeat([]byte{7}, 32)))
	}
	if cfg.Revoked == nil {
		cfg.Revoked = k.Rev
	}
	cfg.Logger = k.log
	k.Srv, err = sypas.NewServer(cfg)
	require.NoError(t, err)
	k.Srv.Handle("echo", sypas.RightRequest, func(_ context.Context, r *sypas.Request) ([]byte, error) { return r.Body, nil })
	k.Srv.Handle("admin", sypas.RightAdmin, func(_ context.Context, r *sypas.Request) ([]byte, error) { return r.Body, nil })
	k.Srv.Handle("fail", sypas.RightRequest, func(context.Context, *sypas.Request) ([]byte, error) {
		return nil, &sypas.Error{Code: sypas.CodeNotFound, Message: "no such key"}
	})
	k.Srv.Handle("who", 0, func(_ context.Context, r *sypas.Request) ([]byte, error) {
		if r.Peer.Cert == nil {
			return []byte("no certificate"), nil
		}
		return []byte(r.Peer.Cert.Subject), nil
	})

	k.tls = serverTLS
	k.serve(t, "127.0.0.1:0")
	t.Cleanup(func() {
		k.Srv.Close()
		k.stop()
	})
	return k
}

// serve serves k.Srv over gRPC on addr.
func (k *TestKernel) serve(t testing.TB, addr string) {
	t.Helper()
	k.GS = grpc.NewServer(grpc.Creds(credentials.NewTLS(k.tls)))
	var err error
	k.Svc, err = Register(k.GS, k.Srv, ServerConfig{Policy: &control.Policy{CertURIs: []string{testtls.DaemonURI}}, Logger: k.log})
	require.NoError(t, err)
	var l net.Listener
	require.Eventually(t, func() bool { l, err = net.Listen("tcp", addr); return err == nil }, 5*time.Second, 10*time.Millisecond)
	k.Addr = l.Addr().String()
	served, gs := make(chan struct{}), k.GS
	go func() { gs.Serve(l); close(served) }()
	k.stop = func() { gs.Stop(); <-served }
}

// restart stops the gRPC server at once (every connection closed, as if
// the kernel died) and serves again on the same address.
func (k *TestKernel) restart(t testing.TB) {
	k.stop()
	k.serve(t, k.Addr)
}
