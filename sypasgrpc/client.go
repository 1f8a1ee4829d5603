package sypasgrpc

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"sync/atomic"

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
	w := &tlsWatch{TransportCredentials: credentials.NewTLS(tc), failed: new(atomic.Pointer[error])}
	cc, err := grpc.NewClient(where, grpc.WithTransportCredentials(w))
	if err != nil {
		return nil, fmt.Errorf("%w: grpc://%s: %w", control.ErrConfig, where, err)
	}
	c, err := openSession(ctx, cc, func() { cc.Close() })
	if err != nil {
		cc.Close()
		if p := w.failed.Load(); p != nil {
			// The kernel answered and TLS failed (its certificate, or
			// ours refused): not a reason to try a fallback, as on tcp://.
			return nil, fmt.Errorf("%w: TLS with grpc://%s: %w", control.ErrHandshake, where, *p)
		}
		return nil, fmt.Errorf("sypasgrpc: open a Session stream to %s: %w", where, err)
	}
	return c, nil
}

// tlsWatch is the client's TLS credentials, noting a TLS failure with a
// peer that answered: a handshake that failed (the kernel's certificate
// not verified...) or a connection the kernel ended before its HTTP/2
// preface (TLS 1.3: our certificate refused). grpc reports either only
// as Unavailable, as it does a host that does not answer.
type tlsWatch struct {
	credentials.TransportCredentials
	failed *atomic.Pointer[error] // shared with clones
}

func (w *tlsWatch) ClientHandshake(ctx context.Context, authority string, raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	c, ai, err := w.TransportCredentials.ClientHandshake(ctx, authority, raw)
	if err != nil {
		w.failed.CompareAndSwap(nil, &err)
		return nil, nil, err
	}
	return &alertConn{Conn: c, failed: w.failed}, ai, nil
}

func (w *tlsWatch) Clone() credentials.TransportCredentials {
	return &tlsWatch{TransportCredentials: w.TransportCredentials.Clone(), failed: w.failed}
}

// alertConn notes the end of a connection before the kernel sent a byte
// after the handshake: in TLS 1.3 the kernel verifies our certificate
// after our side of the handshake is done, and refuses it with an alert
// and a close, which we meet reading (the alert) or writing (a broken
// pipe) the HTTP/2 preface.
type alertConn struct {
	net.Conn
	failed *atomic.Pointer[error]
	got    atomic.Bool // a byte came from the kernel
}

func (c *alertConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.got.Store(true)
	}
	c.note(err)
	return n, err
}

func (c *alertConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.note(err)
	return n, err
}

func (c *alertConn) note(err error) {
	if err != nil && !c.got.Load() {
		err = fmt.Errorf("the kernel ended the connection after the TLS handshake (our certificate refused?): %w", err)
		c.failed.CompareAndSwap(nil, &err)
	}
}
