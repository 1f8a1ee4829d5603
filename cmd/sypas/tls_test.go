package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

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

// "sypas serve -tcp" and "sypas call tcp://": one kernel serves its Unix
// socket and TCP with TLS; a daemon of another host calls with a
// certificate the kernel admits by its URI SAN; one it does
// not admit is refused (E_PERMISSION); and the TLS flags are refused where
// they mean nothing. The certificates are made for the test.
func TestServeAndCallTCP(t *testing.T) {
	dir := t.TempDir()
	ca, err := testtls.NewCA("cmd test CA")
	require.NoError(t, err)
	caFile := filepath.Join(dir, "ca.crt")
	require.NoError(t, os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Cert.Raw}), 0o600))
	server, err := ca.Server()
	require.NoError(t, err)
	kcert, kkey := writePEM(t, dir, "kernel", server)
	daemon, err := ca.Client("daemon", testtls.DaemonURI)
	require.NoError(t, err)
	dcert, dkey := writePEM(t, dir, "daemon", daemon)
	stranger, err := ca.Client("stranger", "spiffe://sypas.test/stranger")
	require.NoError(t, err)
	scert, skey := writePEM(t, dir, "stranger", stranger)

	l, err := net.Listen("tcp", "127.0.0.1:0") // a port free a moment ago
	require.NoError(t, err)
	addr := l.Addr().String()
	l.Close()
	serve := sypasCmd(t, "serve", "-socket", filepath.Join(dir, "k.sock"), "-tcp", addr,
		"-cert", kcert, "-key", kkey, "-ca", caFile, "-allow-uri", testtls.DaemonURI)
	var log lockedBuffer
	serve.Stderr = &log
	require.NoError(t, serve.Start())
	require.Eventually(t, func() bool { return strings.Contains(log.String(), `msg="sypas: serving"`) },
		30*time.Second, 10*time.Millisecond, "serve did not start: %s", log.String())
	assert.Contains(t, log.String(), "tcp="+addr)

	r := runSypas(t, "", "call", "-socket", "tcp://"+addr, "-cert", dcert, "-key", dkey, "-ca", caFile, "echo", "over TLS")
	assert.Equal(t, 0, r.code, "stderr: %s", r.stderr)
	assert.Equal(t, "over TLS\n", r.stdout)
	r = runSypas(t, "", "call", "-socket", "tcp://"+addr, "-cert", dcert, "-key", dkey, "-ca", caFile, "whoami")
	assert.Equal(t, 0, r.code, "stderr: %s", r.stderr)

	r = runSypas(t, "", "call", "-socket", filepath.Join(dir, "k.sock"), "echo", "and on the Unix socket")
	assert.Equal(t, 0, r.code, "one kernel serves both: stderr: %s", r.stderr)
	assert.Equal(t, "and on the Unix socket\n", r.stdout)

	r = runSypas(t, "", "call", "-socket", "tcp://"+addr, "-cert", scert, "-key", skey, "-ca", caFile, "echo", "x")
	assert.Equal(t, exitError, r.code)
	assert.Contains(t, r.stderr, "E_PERMISSION")
	assert.Contains(t, log.String(), `msg="sypas: refused" event=attestation`, "the refusal is audited")

	r = runSypas(t, "", "call", "-socket", "tcp://"+addr, "echo", "x")
	assert.Equal(t, exitError, r.code)
	assert.Contains(t, r.stderr, "needs -cert, -key and -ca")
	r = runSypas(t, "", "call", "-socket", filepath.Join(dir, "k.sock"), "-cert", dcert, "echo", "x")
	assert.Equal(t, exitError, r.code)
	assert.Contains(t, r.stderr, "for a tcp:// kernel")
	r = runSypas(t, "", "serve", "-socket", filepath.Join(dir, "other.sock"), "-tcp", "127.0.0.1:0", "-cert", kcert, "-key", kkey, "-ca", caFile)
	assert.Equal(t, exitError, r.code)
	assert.Contains(t, r.stderr, "-tcp needs -allow-uri")

	stopServe(t, serve, &log)
}
