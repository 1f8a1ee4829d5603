package sypas

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/frame"
	"github.com/sypas/go/wire"
)

// kernelAllocsPerCall is what the kernel allocates to serve one call to an
// Inline handler or one on the pool: nothing (the reader reuses its call,
// pool calls are recycled). A call with a deadline takes a context of its
// own, never reused, from a chunk of 64: 1/64 of an allocation.
const kernelAllocsPerCall = 0

// tlsReadAllocs is what crypto/tls allocates per frame a side receives
// when it waits for the network (readFromUntil's atLeastReader escapes,
// Go 1.26), twice that under the race detector (its sync.Pool drops
// buffers). It is the standard library's, not ours; on a Unix socket it
// is 0.
func tlsReadAllocs(addr string) float64 {
	switch {
	case !isTCP(addr):
		return 0
	case raceEnabled:
		return 2
	}
	return 1
}

// TestCallIntoAllocs: a CallInto with a buffer of enough capacity allocates
// nothing in the daemon, and a Call only the reply it returns. Kernel and
// daemon share this process, so the count includes what the kernel
// allocates to serve the call; bench/ measures each side in its own process
// (BenchmarkCall's allocs/op and kernel-allocs/op).
func TestCallIntoAllocs(t *testing.T) {
	k := startKernel(t, ServerConfig{}, func(s *Server) {
		s.Handle("echo", RightRequest, echo, Inline)
		s.Handle("echo.pool", RightRequest, echo)
	})
	c := dialT(t, k.path, ClientConfig{})
	ctx := context.Background()
	msg, buf := make([]byte, 64), make([]byte, 0, 64)
	callInto := func() {
		if out, err := c.CallInto(ctx, "echo", msg, buf[:0]); err != nil || len(out) != len(msg) {
			t.Fatalf("CallInto: %d bytes, %v", len(out), err)
		}
	}
	callPool := func() {
		if out, err := c.CallInto(ctx, "echo.pool", msg, buf[:0]); err != nil || len(out) != len(msg) {
			t.Fatalf("CallInto echo.pool: %d bytes, %v", len(out), err)
		}
	}
	dctx, cancel := context.WithTimeout(ctx, time.Hour)
	defer cancel()
	callDeadline := func() {
		if out, err := c.CallInto(dctx, "echo", msg, buf[:0]); err != nil || len(out) != len(msg) {
			t.Fatalf("CallInto with a deadline: %d bytes, %v", len(out), err)
		}
	}
	call := func() {
		if out, err := c.Call(ctx, "echo", msg); err != nil || len(out) != len(msg) {
			t.Fatalf("Call: %d bytes, %v", len(out), err)
		}
	}
	for range 100 { // warm up: first uses of the slots, the runtime's caches
		callInto()
		callPool()
		call()
	}
	// The average is floored: the session's rare background allocations
	// (heartbeats) spread over 1000 calls do not count.
	tls := 2 * tlsReadAllocs(k.path) // the request read by the kernel, the reply by the daemon
	assert.LessOrEqual(t, testing.AllocsPerRun(1000, callInto), float64(kernelAllocsPerCall)+tls, "CallInto")
	assert.LessOrEqual(t, testing.AllocsPerRun(1000, callPool), float64(kernelAllocsPerCall)+tls, "CallInto, a handler on the pool")
	assert.LessOrEqual(t, testing.AllocsPerRun(1000, callDeadline), float64(kernelAllocsPerCall)+tls, "CallInto with a deadline")
	assert.LessOrEqual(t, testing.AllocsPerRun(1000, call), float64(kernelAllocsPerCall+1)+tls, "Call")
}

// BenchmarkEnforcer is what the kernel's session reader checks to admit a
// REQUEST frame, on a live session: the sequence number advances, cap_ref
// names the session's valid token (Session.Admits), the payload is within
// max_payload, the token grants the operation's rights, and max_in_flight
// holds (the count taken and, as when the reply is sent, given back).
//
// Those checks sit inline in serverConn.serve and ringTransport.recv, among
// the REQUEST's decoding and dispatch, so "check" repeats their statements
// on the session's own state: keep the two in step. "decode+route" adds
// what serve does around them to find the route whose rights it checks:
// decoding the REQUEST payload and looking its op up.
func BenchmarkEnforcer(b *testing.B) {
	k := startKernel(b, ServerConfig{}, func(s *Server) { s.Handle("echo", RightRequest, echo, Inline) })
	dialT(b, k.path, ClientConfig{})
	c := serverConnOf(b, k.srv)
	rt := (*c.srv.routes.Load())["echo"]
	require.NotNil(b, rt)

	req := wire.Request{Method: []byte("echo"), Body: make([]byte, 64)}
	payload, err := req.Append(nil)
	require.NoError(b, err)
	f := frame.Frame{Payload: payload}
	f.Type, f.Correlation, f.CapRef, f.PayloadLen = frame.TypeRequest, 1, c.sess.CapRef(), uint32(len(payload))
	var rseq uint64 // the transport's, which its own reader goroutine owns

	check := func(f *frame.Frame, rt *route) bool {
		if f.Sequence != rseq+1 {
			return false
		}
		rseq++
		if !c.sess.Admits(f.CapRef) || int(f.PayloadLen) > c.maxPayload {
			return false
		}
		if need := rt.rights; need != 0 {
			if cp := c.sess.Capability(); cp == nil || cp.Rights&need != need {
				return false
			}
		}
		if f.Correlation != 0 {
			if c.admitted-c.done.Load() >= c.maxInFlight {
				return false
			}
			c.admitted++
		}
		return true
	}
	// "check" is the reader's check alone (the request then leaves the
	// count, as a plain store would); "check+answered" adds the atomic
	// count its answer makes, on the reply path.
	b.Run("check", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			f.Sequence = rseq + 1
			if !check(&f, rt) {
				b.Fatal("refused")
			}
			c.admitted--
		}
	})
	b.Run("check+answered", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			f.Sequence = rseq + 1
			if !check(&f, rt) {
				b.Fatal("refused")
			}
			c.done.Add(1)
		}
	})
	b.Run("decode+route+check", func(b *testing.B) {
		var m wire.Request
		b.ReportAllocs()
		for b.Loop() {
			f.Sequence = rseq + 1
			if err := m.Decode(f.Payload); err != nil {
				b.Fatal(err)
			}
			rt := (*c.srv.routes.Load())[string(m.Method)]
			if rt == nil || !check(&f, rt) {
				b.Fatal("refused")
			}
			c.done.Add(1)
		}
	})
}

// serverConnOf waits for srv's one session and returns it.
func serverConnOf(tb testing.TB, srv *Server) *serverConn {
	tb.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		srv.mu.Lock()
		for c := range srv.conns {
			srv.mu.Unlock()
			return c
		}
		srv.mu.Unlock()
	}
	tb.Fatal("no session")
	return nil
}

// TestPublishAllocs: Publish allocates nothing. The subscriber shares this
// process, and its copy of each event's body (Event.Body, the receiver's
// own) is the one allocation counted.
func TestPublishAllocs(t *testing.T) {
	k := startKernel(t, ServerConfig{Topics: map[string]SlowPolicy{"news": Block}}, nil)
	c := dialT(t, k.path, ClientConfig{})
	ctx := context.Background()
	sub, err := c.Subscribe(ctx, "news", SubscribeOptions{Pending: 4096})
	require.NoError(t, err)
	body := make([]byte, 64)
	publish := func() {
		require.NoError(t, k.srv.Publish(ctx, "news", body))
		<-sub.Events()
	}
	for range 100 {
		publish()
	}
	assert.LessOrEqual(t, testing.AllocsPerRun(1000, publish), 1.0+tlsReadAllocs(k.path))
}
