package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/control"
	"github.com/sypas/go/internal/testtls"
)

// writePEM writes cert and its key as PEM files in dir; it returns their
// paths.
func writePEM(t *testing.T, dir, name string, cert tls.Certificate) (certFile, keyFile string) {
	t.Helper()
	certFile, keyFile = filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key")
	require.NoError(t, os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Certificate[0]}), 0o600))
	der, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600))
	return certFile, keyFile
}

// pki is the TLS material of a test, as PEM files in its temporary
// directory: a CA, the kernel's certificate, a daemon's the kernel admits
// (testtls.DaemonURI) and a stranger's it does not (same CA).
type pki struct {
	ca                        string
	kernelCert, kernelKey     string
	daemonCert, daemonKey     string
	strangerCert, strangerKey string
}

func newPKI(t *testing.T, dir string) pki {
	t.Helper()
	ca, err := testtls.NewCA("cmd test CA")
	require.NoError(t, err)
	p := pki{ca: filepath.Join(dir, "ca.crt")}
	require.NoError(t, os.WriteFile(p.ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Cert.Raw}), 0o600))
	server, err := ca.Server()
	require.NoError(t, err)
	p.kernelCert, p.kernelKey = writePEM(t, dir, "kernel", server)
	daemon, err := ca.Client("daemon", testtls.DaemonURI)
	require.NoError(t, err)
	p.daemonCert, p.daemonKey = writePEM(t, dir, "daemon", daemon)
	stranger, err := ca.Client("stranger", "spiffe://sypas.test/stranger")
	require.NoError(t, err)
	p.strangerCert, p.strangerKey = writePEM(t, dir, "stranger", stranger)
	return p
}

// serverFlags are serve's TLS flags for p, admitting the daemon.
func (p pki) serverFlags() []string {
	return []string{"-cert", p.kernelCert, "-key", p.kernelKey, "-ca", p.ca, "-allow-uri", testtls.DaemonURI}
}

// freeAddr is a loopback address whose port was free a moment ago.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().String()
}

// "sypas serve -tcp" and "sypas call tcp://": one kernel serves its Unix
// socket and TCP with TLS; a daemon of another host calls with a
// certificate the kernel admits by its URI SAN; one it does
// not admit is refused (E_PERMISSION); and the TLS flags are refused where
// they mean nothing. The certificates are made for the test.
func TestServeAndCallTCP(t *testing.T) {
	dir := t.TempDir()
	p := newPKI(t, dir)
	addr := freeAddr(t)
	serve, log := startServe(t, append([]string{"-socket", filepath.Join(dir, "k.sock"), "-tcp", addr}, p.serverFlags()...)...)
	assert.Contains(t, log.String(), "tcp="+addr)

	r := runSypas(t, "", "call", "-socket", "tcp://"+addr, "-cert", p.daemonCert, "-key", p.daemonKey, "-ca", p.ca, "echo", "over TLS")
	assert.Equal(t, 0, r.code, "stderr: %s", r.stderr)
	assert.Equal(t, "over TLS\n", r.stdout)
	r = runSypas(t, "", "call", "-socket", "tcp://"+addr, "-cert", p.daemonCert, "-key", p.daemonKey, "-ca", p.ca, "whoami")
	assert.Equal(t, 0, r.code, "stderr: %s", r.stderr)

	r = runSypas(t, "", "call", "-socket", filepath.Join(dir, "k.sock"), "echo", "and on the Unix socket")
	assert.Equal(t, 0, r.code, "one kernel serves both: stderr: %s", r.stderr)
	assert.Equal(t, "and on the Unix socket\n", r.stdout)

	r = runSypas(t, "", "call", "-socket", "tcp://"+addr, "-cert", p.strangerCert, "-key", p.strangerKey, "-ca", p.ca, "echo", "x")
	assert.Equal(t, exitError, r.code)
	assert.Contains(t, r.stderr, "E_PERMISSION")
	assert.Contains(t, log.String(), `msg="sypas: refused" event=attestation`, "the refusal is audited")

	r = runSypas(t, "", "call", "-socket", "tcp://"+addr, "echo", "x")
	assert.Equal(t, exitError, r.code)
	assert.Contains(t, r.stderr, "needs -cert, -key and -ca")
	r = runSypas(t, "", "call", "-socket", filepath.Join(dir, "k.sock"), "-cert", p.daemonCert, "echo", "x")
	assert.Equal(t, exitError, r.code)
	assert.Contains(t, r.stderr, "for a tcp:// or grpc:// kernel")
	r = runSypas(t, "", "serve", "-socket", filepath.Join(dir, "other.sock"), "-tcp", "127.0.0.1:0", "-cert", p.kernelCert, "-key", p.kernelKey, "-ca", p.ca)
	assert.Equal(t, exitError, r.code)
	assert.Contains(t, r.stderr, "need -allow-uri")

	stopServe(t, serve, log)
}

// "sypas serve -grpc" and "sypas call/watch grpc://": the same kernel
// serves the gRPC service (package sypasgrpc) beside its Unix socket, with
// the TLS flags and -allow-uri of -tcp; our client calls and subscribes
// through it, a certificate the kernel does not admit is refused and
// audited, and the kernel stops cleanly on SIGTERM. TestGRPCurl calls the
// same listener with a stock client.
func TestServeAndCallGRPC(t *testing.T) {
	dir := t.TempDir()
	p := newPKI(t, dir)
	addr := freeAddr(t)
	serve, log := startServe(t, append([]string{"-socket", filepath.Join(dir, "k.sock"), "-grpc", addr, "-tick", "20ms"}, p.serverFlags()...)...)
	assert.Contains(t, log.String(), "grpc="+addr)
	daemon := []string{"-socket", "grpc://" + addr, "-cert", p.daemonCert, "-key", p.daemonKey, "-ca", p.ca}

	r := runSypas(t, "", append(append([]string{"call"}, daemon...), "echo", "over gRPC")...)
	assert.Equal(t, 0, r.code, "stderr: %s", r.stderr)
	assert.Equal(t, "over gRPC\n", r.stdout)
	r = runSypas(t, "", append(append([]string{"watch"}, daemon...), "-n", "2", "ticks")...)
	assert.Equal(t, 0, r.code, "stderr: %s", r.stderr)
	assert.Equal(t, 2, strings.Count(r.stdout, " ticks tick "), "stdout: %s", r.stdout)

	r = runSypas(t, "", "call", "-socket", "grpc://"+addr, "-cert", p.strangerCert, "-key", p.strangerKey, "-ca", p.ca, "echo", "x")
	assert.Equal(t, exitError, r.code)
	assert.Contains(t, r.stderr, "E_PERMISSION")
	assert.Contains(t, log.String(), `msg="sypas: refused" event=attestation`, "the refusal is audited")

	r = runSypas(t, "", append([]string{"serve", "-socket", filepath.Join(dir, "other.sock"), "-grpc", addr}, p.serverFlags()...)...)
	assert.Equal(t, exitError, r.code)
	assert.Contains(t, r.stderr, "address already in use")
	r = runSypas(t, "", "serve", "-socket", filepath.Join(dir, "other.sock"), "-grpc", "127.0.0.1:0", "-cert", p.kernelCert, "-key", p.kernelKey, "-ca", p.ca)
	assert.Equal(t, exitError, r.code)
	assert.Contains(t, r.stderr, "-grpc need -allow-uri")
	r = runSypas(t, "", "serve", "-socket", filepath.Join(dir, "other.sock"), "-grpc", "127.0.0.1:0", "-allow-uri", testtls.DaemonURI)
	assert.Equal(t, exitError, r.code)
	assert.Contains(t, r.stderr, "needs -cert, -key and -ca")

	stopServe(t, serve, log)
	assert.Contains(t, log.String(), `msg="sypas: stopped"`)
}

// A kernel told to stop as soon as it serves (SIGTERM right after start)
// stops cleanly: a listener whose Serve had not yet begun when Shutdown
// came says only that the server was stopped (sypas.ErrClosed,
// grpc.ErrServerStopped), which is no failure of serve's. And a listener
// that cannot listen is named by its flag, without that noise.
func TestServeStopsAtOnce(t *testing.T) {
	ca, err := testtls.NewCA("cmd test CA")
	require.NoError(t, err)
	cfg, err := ca.ServerConfig()
	require.NoError(t, err)
	o := kernelOptions{tick: time.Second, tls: cfg, policy: &control.Policy{CertURIs: []string{testtls.DaemonURI}},
		tcp: "127.0.0.1:0", grpc: "127.0.0.1:0"}
	stopped := make(chan struct{})
	close(stopped)
	for i := range 20 {
		o.socket, o.stop = filepath.Join(t.TempDir(), "k.sock"), stopped
		require.NoError(t, runKernel(o, io.Discard), "stop %d", i)
	}
	o.socket, o.grpc = filepath.Join(t.TempDir(), "k.sock"), "nope"
	err = runKernel(o, io.Discard)
	require.Error(t, err)
	assert.Equal(t, "-grpc nope: listen tcp: address nope: missing port in address", err.Error())
	o.socket, o.tcp = filepath.Join(t.TempDir(), "k.sock"), "nope"
	err = runKernel(o, io.Discard)
	require.Error(t, err)
	assert.Equal(t, "-tcp nope: control: listen tcp nope: listen tcp: address nope: missing port in address", err.Error())
}
