package sypasgrpc

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/sypas/go/control"
)

// Importing the package makes grpc://host:port addresses work in
// control.Dial, control.Client and sypas.Dial/NewClient (and their
// DialConfig.Fallbacks).
func init() { control.RegisterTransport(Network, dialSession) }

// dialSession connects to the kernel's gRPC service at where with mutual
// TLS (cfg.TLS: the kernel's CAs and this daemon's certificate; TLS 1.3)
// and opens a Session stream, for control.Dial to run the handshake on.
// Each session has its own ClientConn, closed when the stream ends.
func dialSession(ctx context.Context, where string, cfg control.DialConfig) (net.Conn, error) {
	if cfg.TLS == nil {
		return nil, fmt.Errorf("%w: grpc://%s needs DialConfig.TLS (the kernel's CAs and a client certificate)", control.ErrConfig, where)
	}
	tc := cfg.TLS.Clone()
	tc.MinVersion = tls.VersionTLS13
	cc, err := grpc.NewClient(where, grpc.WithTransportCredentials(credentials.NewTLS(tc)))
	if err != nil {
		return nil, fmt.Errorf("%w: grpc://%s: %w", control.ErrConfig, where, err)
	}
	c, err := openSession(ctx, cc, func() { cc.Close() })
	if err != nil {
		cc.Close()
		return nil, fmt.Errorf("sypasgrpc: open a Session stream to %s: %w", where, err)
	}
	return c, nil
}
