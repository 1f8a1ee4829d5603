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

// Network is the network of a Conn's addresses: control.Session.Network
// reports it, and a Client's Transport with it.
const Network = "grpc"

// addr is an address of a Conn: grpc's (host:port), on network "grpc".
type addr string

func (addr) Network() string  { return Network }
func (a addr) String() string { return string(a) }

func addrOf(a net.Addr, unknown string) addr {
	if a == nil {
		return addr(unknown)
	}
	return addr(a.String())
}

// OpenSession opens a Session stream on cc and returns it as a Conn (the
// client's end), with the raw codec. The stream lives until the Conn is
// closed, not within ctx, which bounds only its opening. cc stays the
// caller's.
func OpenSession(ctx context.Context, cc grpc.ClientConnInterface) (*Conn, error) {
	return openSession(ctx, cc, func() {})
}

// openSession is OpenSession, with after called once the stream has ended
// (Dial's: it closes its own ClientConn).
func openSession(ctx context.Context, cc grpc.ClientConnInterface, after func()) (*Conn, error) {
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
	remote := addr("")
	if t, ok := cc.(interface{ Target() string }); ok {
		remote = addr(t.Target())
	}
	var once sync.Once
	end := func() {
		cancel()
		once.Do(after)
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
		end()
	}
	c = newConn(st, end, finish, addr(""), remote)
	return c, nil
}

// serverConn returns the server's end of a Session stream as a Conn, and
// a channel closed when the Conn ends the stream: the handler returns
// then (or when the stream's context ends).
func serverConn(ss grpc.ServerStream) (*Conn, <-chan struct{}) {
	done := make(chan struct{})
	var once sync.Once
	end := func() { once.Do(func() { close(done) }) }
	local, remote := addr(""), addr("")
	if p, ok := peer.FromContext(ss.Context()); ok {
		local, remote = addrOf(p.LocalAddr, ""), addrOf(p.Addr, "")
	}
	return newConn(ss, end, nil, local, remote), done
}
