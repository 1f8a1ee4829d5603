package sypasgrpc

import (
	"context"
	"net"
	"slices"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/protobuf/types/known/wrapperspb"
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
	return newConn(st, end, st.CloseSend, addr(""), remote), nil
}

// serverConn returns the server's end of a Session stream as a Conn, and
// a channel closed when the Conn ends the stream: the handler returns
// then (or when the stream's context ends). A client that called with
// another codec than ours (application/grpc+proto: the same bytes) is
// read and answered through BytesValue messages.
func serverConn(ss grpc.ServerStream) (*Conn, <-chan struct{}) {
	done := make(chan struct{})
	var once sync.Once
	end := func() { once.Do(func() { close(done) }) }
	local, remote := addr(""), addr("")
	ctx := ss.Context()
	if p, ok := peer.FromContext(ctx); ok {
		local, remote = addrOf(p.LocalAddr, ""), addrOf(p.Addr, "")
	}
	var s msgStream = ss
	if md, _ := metadata.FromIncomingContext(ctx); !slices.Contains(md.Get("content-type"), contentType) {
		s = protoStream{ss}
	}
	return newConn(s, end, nil, local, remote), done
}

// contentType is the content type of a Session called with our codec.
const contentType = "application/grpc+" + CodecName

// protoStream carries a Conn's chunks as BytesValue messages, for a peer
// whose codec is protobuf's.
type protoStream struct{ s grpc.ServerStream }

func (p protoStream) SendMsg(m any) error {
	return p.s.SendMsg(&wrapperspb.BytesValue{Value: m.(*chunk).b})
}

func (p protoStream) RecvMsg(m any) error {
	var v wrapperspb.BytesValue
	if err := p.s.RecvMsg(&v); err != nil {
		return err
	}
	m.(*chunk).b = v.Value
	return nil
}
