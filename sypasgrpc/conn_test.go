package sypasgrpc

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"os"
	"runtime/pprof"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// connPair serves the Session method with handle (given the server's
// Conn) on loopback, and returns a client Conn to it.
func connPair(t *testing.T, handle func(*Conn)) *Conn {
	t.Helper()
	cc := sessionServer(t, handle)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := OpenSession(ctx, cc)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c
}

// sessionServer serves the Session method with handle on loopback and
// returns a client connection to it.
func sessionServer(t *testing.T, handle func(*Conn)) *grpc.ClientConn {
	t.Helper()
	gs := grpc.NewServer()
	gs.RegisterService(&grpc.ServiceDesc{
		ServiceName: ServiceName,
		HandlerType: (*any)(nil),
		Streams: []grpc.StreamDesc{{StreamName: MethodSession, ServerStreams: true, ClientStreams: true,
			Handler: func(_ any, ss grpc.ServerStream) error {
				c, done := serverConn(ss)
				go handle(c)
				select {
				case <-done:
				case <-ss.Context().Done():
				}
				c.Close()
				return endStatus(c)
			}}},
	}, nil)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	go gs.Serve(l)
	t.Cleanup(gs.Stop)
	cc, err := grpc.NewClient(l.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { cc.Close() })
	return cc
}

func echo(c *Conn) {
	io.Copy(c, c)
	c.Close()
}

func TestConnCarriesTheStreamInOrder(t *testing.T) {
	c := connPair(t, echo)
	want := make([]byte, 3*MaxChunk+12345) // several messages, one cut mid-way
	rand.Read(want)
	errc := make(chan error, 1)
	go func() {
		for p := want; len(p) > 0; {
			n := min(len(p), 1+len(p)/3)
			if _, err := c.Write(p[:n]); err != nil {
				errc <- err
				return
			}
			p = p[n:]
		}
		errc <- nil
	}()
	got := make([]byte, len(want))
	_, err := io.ReadFull(c, got)
	require.NoError(t, err)
	require.NoError(t, <-errc)
	assert.True(t, bytes.Equal(want, got), "the echoed bytes differ")
}

func TestConnCloseLosesNothingWritten(t *testing.T) {
	got := make(chan []byte, 1)
	c := connPair(t, func(s *Conn) {
		b, _ := io.ReadAll(s) // until the client's orderly end: io.EOF
		got <- b
		s.Close()
	})
	want := make([]byte, 200<<10)
	rand.Read(want)
	_, err := c.Write(want)
	require.NoError(t, err)
	require.NoError(t, c.Close())
	select {
	case b := <-got:
		assert.True(t, bytes.Equal(want, b), "the server read %d bytes of %d", len(b), len(want))
	case <-time.After(5 * time.Second):
		t.Fatal("the server never saw the client's end")
	}
	_, err = c.Write([]byte("x"))
	assert.ErrorIs(t, err, net.ErrClosed)
	_, err = c.Read(make([]byte, 1))
	assert.ErrorIs(t, err, net.ErrClosed)
}

func TestConnReadDeadline(t *testing.T) {
	c := connPair(t, echo)
	require.NoError(t, c.SetReadDeadline(time.Now().Add(20*time.Millisecond)))
	_, err := c.Read(make([]byte, 8))
	require.ErrorIs(t, err, os.ErrDeadlineExceeded)
	var ne net.Error
	require.ErrorAs(t, err, &ne)
	assert.True(t, ne.Timeout())

	// Still usable once the deadline moves; a past one wakes a blocked Read.
	require.NoError(t, c.SetReadDeadline(time.Time{}))
	_, err = c.Write([]byte("ping"))
	require.NoError(t, err)
	b := make([]byte, 4)
	_, err = io.ReadFull(c, b)
	require.NoError(t, err)
	assert.Equal(t, "ping", string(b))

	errc := make(chan error, 1)
	go func() {
		_, err := c.Read(b)
		errc <- err
	}()
	time.Sleep(10 * time.Millisecond)
	require.NoError(t, c.SetReadDeadline(time.Unix(1, 0)))
	select {
	case err := <-errc:
		assert.ErrorIs(t, err, os.ErrDeadlineExceeded)
	case <-time.After(5 * time.Second):
		t.Fatal("a past deadline did not wake the Read")
	}
}

// stuck is a server that never reads: the client's writes fill the
// stream's flow-control window and then wait.
func stuck(c *Conn) {}

func TestConnCloseWakesBlockedReadAndWrite(t *testing.T) {
	c := connPair(t, stuck)
	var wg sync.WaitGroup
	var rerr, werr error
	wg.Add(2)
	go func() {
		defer wg.Done()
		_, rerr = c.Read(make([]byte, 10))
	}()
	go func() {
		defer wg.Done()
		_, werr = c.Write(make([]byte, 64<<20)) // far beyond the window
	}()
	time.Sleep(50 * time.Millisecond)
	require.NoError(t, c.Close())
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		pprof.Lookup("goroutine").WriteTo(os.Stderr, 1)
		t.Fatal("Close did not wake the blocked Read and Write")
	}
	assert.ErrorIs(t, rerr, net.ErrClosed)
	assert.ErrorIs(t, werr, net.ErrClosed)
	assert.NoError(t, c.Close(), "idempotent")
}

// waitBlocked waits until a Write of c has been in one SendMsg for 50 ms:
// held back by flow control.
func waitBlocked(t *testing.T, c *Conn) {
	t.Helper()
	since := time.Now()
	require.Eventually(t, func() bool {
		c.wdlMu.Lock()
		w := c.writing
		c.wdlMu.Unlock()
		if !w {
			since = time.Now()
		}
		return time.Since(since) > 50*time.Millisecond
	}, 10*time.Second, time.Millisecond, "the Write never waited")
}

func TestConnWriteDeadlineBreaksTheConn(t *testing.T) {
	c := connPair(t, stuck)
	type result struct {
		n   int
		err error
	}
	done := make(chan result, 1)
	go func() {
		n, err := c.Write(make([]byte, 64<<20)) // waits for flow control soon
		done <- result{n, err}
	}()
	waitBlocked(t, c)
	require.NoError(t, c.SetWriteDeadline(time.Unix(1, 0))) // passes now, under the waiting Write
	var r result
	select {
	case r = <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("a past deadline did not wake the Write")
	}
	require.ErrorIs(t, r.err, os.ErrDeadlineExceeded)
	assert.Less(t, r.n, 64<<20, "flow control held the writer back: nothing unbounded was buffered")
	require.Error(t, c.broken(), "the deadline passed inside SendMsg")
	require.NoError(t, c.SetWriteDeadline(time.Time{}))
	_, err := c.Write([]byte("x"))
	assert.ErrorIs(t, err, os.ErrDeadlineExceeded, "a broken Conn stays broken")
	_, err = c.Read(make([]byte, 1))
	assert.Error(t, err)
}

func TestConnServerEndIsEOF(t *testing.T) {
	c := connPair(t, func(s *Conn) {
		s.Write([]byte("bye"))
		s.Close()
	})
	b, err := io.ReadAll(c)
	require.NoError(t, err, "the server's orderly end reads as io.EOF")
	assert.Equal(t, "bye", string(b))
	_, err = c.Read(make([]byte, 1))
	assert.True(t, errors.Is(err, io.EOF))
}

// A peer that speaks the Session stream with protobuf's codec (plain
// application/grpc) sends and receives the same bytes.
func TestConnProtoCodecPeer(t *testing.T) {
	cc := sessionServer(t, echo)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := cc.NewStream(ctx, &sessionDesc, FullSession)
	require.NoError(t, err)
	require.NoError(t, st.SendMsg(wrapperspb.Bytes([]byte("hel"))))
	require.NoError(t, st.SendMsg(wrapperspb.Bytes(nil)))
	require.NoError(t, st.SendMsg(wrapperspb.Bytes([]byte("lo"))))
	require.NoError(t, st.CloseSend())
	var got []byte
	for {
		var m wrapperspb.BytesValue
		if err := st.RecvMsg(&m); err != nil {
			require.ErrorIs(t, err, io.EOF)
			break
		}
		got = append(got, m.GetValue()...)
	}
	assert.Equal(t, "hello", string(got))
}

// The server's end of a stream whose client never reads: a Write past its
// deadline returns, and the stream ends (ABORTED, a hang-up to the client,
// if the deadline broke a SendMsg in progress), so nothing stays blocked
// on flow control.
func TestConnServerWriteDeadlineEndsTheStream(t *testing.T) {
	errc, broken := make(chan error, 1), make(chan bool, 1)
	c := connPair(t, func(s *Conn) {
		s.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
		_, err := s.Write(make([]byte, 64<<20))
		broken <- s.broken() != nil
		errc <- err
		s.Close() // as a session does when a write fails
	})
	select {
	case err := <-errc:
		assert.ErrorIs(t, err, os.ErrDeadlineExceeded)
	case <-time.After(5 * time.Second):
		t.Fatal("the server's Write stayed blocked")
	}
	copied := make(chan error, 1)
	go func() { _, err := io.Copy(io.Discard, c); copied <- err }()
	select {
	case err := <-copied:
		if <-broken {
			assert.Error(t, err, "a broken stream is no orderly end")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the stream did not end")
	}
}

// Close lingers for the server's end in the background: a Write or Read
// after it fails at once, not after Linger.
func TestConnCloseDoesNotHoldWriters(t *testing.T) {
	c := connPair(t, stuck) // never ends its side: Close lingers
	require.NoError(t, c.Close())
	start := time.Now()
	_, err := c.Write([]byte("x"))
	assert.ErrorIs(t, err, net.ErrClosed)
	_, err = c.Read(make([]byte, 1))
	assert.ErrorIs(t, err, net.ErrClosed)
	assert.Less(t, time.Since(start), time.Second)
}
