package sypasgrpc_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/sypas/go/control"
	"github.com/sypas/go/control/token"
	"github.com/sypas/go/internal/testtls"
	"github.com/sypas/go/sypas"
	"github.com/sypas/go/sypasgrpc"
)

// A kernel served over gRPC with mutual TLS, and a daemon calling it at a
// grpc:// address. (The TLS material is made on the spot; a deployment
// loads its own.)
func Example() {
	ca, _ := testtls.NewCA("example CA")
	serverTLS, _ := ca.ServerConfig()
	serverTLS.ClientAuth, serverTLS.MinVersion = tls.RequireAndVerifyClientCert, tls.VersionTLS13
	daemonCert, _ := ca.Client("daemon", "spiffe://example.org/daemon")

	// The kernel: a sypas.Server, served by a grpc.Server.
	keys := token.NewKeyring()
	keys.Add(1, make([]byte, 32)) // a real kernel draws its key from crypto/rand
	cfg := sypas.ServerConfig{}
	cfg.Keys, cfg.Logger = keys, slog.New(slog.DiscardHandler)
	srv, _ := sypas.NewServer(cfg)
	srv.Handle("greet", sypas.RightRequest, func(_ context.Context, r *sypas.Request) ([]byte, error) {
		return []byte("hello, " + r.Peer.Cert.Subject), nil
	})
	gs := grpc.NewServer(grpc.Creds(credentials.NewTLS(serverTLS)))
	if _, err := sypasgrpc.Register(gs, srv, sypasgrpc.ServerConfig{
		Policy: &control.Policy{CertURIs: []string{"spiffe://example.org/daemon"}},
		Logger: cfg.Logger,
	}); err != nil {
		panic(err)
	}
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	go gs.Serve(l)
	defer gs.Stop()
	defer srv.Close()

	// The daemon: importing sypasgrpc makes grpc:// addresses dialable.
	dcfg := sypas.ClientConfig{DialConfig: control.DialConfig{TLS: ca.ClientConfig(daemonCert)}}
	dcfg.Logger = cfg.Logger
	c, err := sypas.Dial(context.Background(), "grpc://"+l.Addr().String(), dcfg)
	if err != nil {
		panic(err)
	}
	defer c.Close()
	reply, err := c.Call(context.Background(), "greet", nil)
	fmt.Println(string(reply), err)
	info, _ := c.Transport()
	fmt.Println(info.Name)
	// Output:
	// hello, CN=daemon <nil>
	// grpc
}
