package sypas_test

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/sypas/go/control"
	"github.com/sypas/go/control/token"
	"github.com/sypas/go/internal/testtls"
	"github.com/sypas/go/sypas"
)

// A kernel for daemons on other hosts: TCP with TLS 1.3, where the
// daemon's verified client certificate is its identity and the policy
// admits it by its URI SAN. The daemon prefers the local Unix socket and
// falls back to TCP only because nothing listens there. (The CA and
// certificates are made on the spot; in production they come from your
// PKI, e.g. SPIFFE.)
func ExampleDial_tls() {
	ca, err := testtls.NewCA("example CA")
	if err != nil {
		panic(err)
	}
	serverTLS, err := ca.ServerConfig() // the kernel's certificate; ca signs the daemons'
	if err != nil {
		panic(err)
	}
	daemonCert, err := ca.Client("daemon", "spiffe://example.org/daemon")
	if err != nil {
		panic(err)
	}

	keys := token.NewKeyring()
	if _, err := keys.Rotate(); err != nil {
		panic(err)
	}
	quiet := slog.New(slog.DiscardHandler)
	srv, err := sypas.NewServer(sypas.ServerConfig{ServerConfig: control.ServerConfig{Keys: keys, SessionConfig: control.SessionConfig{Logger: quiet}}})
	if err != nil {
		panic(err)
	}
	srv.Handle("greet", sypas.RightRequest, func(ctx context.Context, req *sypas.Request) ([]byte, error) {
		return fmt.Appendf(nil, "hello, %s", req.Body), nil
	})
	l, err := control.ListenTLS("127.0.0.1:0", serverTLS, control.Config{
		Policy: &control.Policy{CertURIs: []string{"spiffe://example.org/daemon"}}, // no rule, no peer
	})
	if err != nil {
		panic(err)
	}
	defer l.Close()
	go srv.Serve(l)
	defer srv.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := sypas.Dial(ctx, "unix:///nonexistent/sypas.sock", sypas.ClientConfig{DialConfig: control.DialConfig{
		TLS:           ca.ClientConfig(daemonCert), // the kernel's CA, and this daemon's certificate
		Fallbacks:     []string{l.URL()},           // tcp://127.0.0.1:port
		SessionConfig: control.SessionConfig{Logger: quiet},
	}})
	if err != nil {
		panic(err)
	}
	defer c.Close()
	reply, err := c.Call(ctx, "greet", []byte("remote daemon"))
	if err != nil {
		panic(err)
	}
	fmt.Println(string(reply))
	info, _ := c.Transport()
	fmt.Println(info.Name, info.Fallback != "")
	tok, _ := c.Token()
	fmt.Println(tok.Subject.UID == control.NoUID) // bound to the certificate, not to a uid
	// Output:
	// hello, remote daemon
	// tcp+tls true
	// true
}
