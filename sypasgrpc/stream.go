package sypasgrpc

import (
	"context"
	"net"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/peer"
)

// sessionDesc is the Session method as a stream.
var sessionDesc = grpc.StreamDesc{StreamName: MethodSession, ServerStreams: true, ClientStreams: true}

// addr is a gRPC peer's address as a Conn reports it when grpc does not
// know a better one.
type addr string

func (addr) Network() string  { return "grpc" }
func (a addr) String() string { return string(a) }

// OpenSession opens a Session stream on cc and returns it as a Conn (the
// client's end), with the raw codec. The stream lives until the Conn is
// closed, not within ctx, which bounds only its opening.
func OpenSession(ctx context.Context, cc grpc.ClientConnInterface) (*Conn, error) {
	sctx, cancel := context.WithCancel(context.Background())
	stop := context.AfterFunc(ctx, cancel)
	st, err := cc.NewStream(sctx, &sessionDesc, FullSession, grpc.CallContentSubtype(CodecName))
	if !stop() || err != nil {
		cancel()
		if err == nil {
			err = ctx.Err()
		}
		return nil, err
	}
	var remote net.Addr = addr("grpc")
	if t, ok := cc.(interface{ Target() string }); ok {
		remote = addr(t.Target())
	}
	var c *Conn
	finish := func() {
		if st.CloseSend() == nil {
			t := time.NewTimer(Linger)
			select {
			case <-c.rdone: // the server ended the stream
			case <-t.C:
			}
			t.Stop()
		}
		cancel()
	}
	c = newConn(st, cancel, finish, addr("grpc-client"), remote)
	return c, nil
}

// serverConn returns the server's end of a Session stream as a Conn, and
// a channel closed when the Conn ends the stream: the handler returns
// then (or when the stream's context ends).
func serverConn(ss grpc.ServerStream) (*Conn, <-chan struct{}) {
	done := make(chan struct{})
	var once sync.Once
	end := func() { once.Do(func() { close(done) }) }
	var local, remote net.Addr = addr("grpc-server"), addr("grpc-client")
	if p, ok := peer.FromContext(ss.Context()); ok {
		if p.Addr != nil {
			remote = p.Addr
		}
		if p.LocalAddr != nil {
			local = p.LocalAddr
		}
	}
	return newConn(ss, end, nil, local, remote), done
}
