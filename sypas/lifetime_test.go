package sypas

import (
	"bytes"
	"context"
	"errors"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/control"
	"github.com/sypas/go/frame"
)

// gate is a handler that blocks until released (or its context ends),
// counting the calls inside it.
type gate struct {
	mu      sync.Mutex
	inside  int
	release chan struct{}
}

func newGate() *gate { return &gate{release: make(chan struct{})} }

func (g *gate) handle(ctx context.Context, r *Request) ([]byte, error) {
	g.mu.Lock()
	g.inside++
	g.mu.Unlock()
	defer func() {
		g.mu.Lock()
		g.inside--
		g.mu.Unlock()
	}()
	select {
	case <-g.release:
		return append([]byte("done:"), r.Body...), nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (g *gate) waitInside(t *testing.T, n int) {
	t.Helper()
	require.Eventually(t, func() bool {
		g.mu.Lock()
		defer g.mu.Unlock()
		return g.inside == n
	}, 20*time.Second, time.Millisecond, "want %d calls inside the handler", n)
}

// noLeak checks, at the end of the test, that the goroutines started since
// it was called have ended (with a small tolerance for the runtime's own).
func noLeak(t *testing.T) {
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		var now int
		ok := assert.Eventually(t, func() bool {
			now = runtime.NumGoroutine()
			return now <= before+2
		}, 20*time.Second, 10*time.Millisecond)
		if !ok {
			buf := make([]byte, 1<<20)
			t.Logf("%d goroutines before, %d after:\n%s", before, now, buf[:runtime.Stack(buf, true)])
		}
	})
}

type outcome struct {
	reply []byte
	err   error
	took  time.Duration
}

// goCall starts c.Call in a goroutine; its outcome arrives on the channel.
func goCall(c *Client, ctx context.Context, op string, body []byte, opts ...CallOption) <-chan outcome {
	ch := make(chan outcome, 1)
	go func() {
		start := time.Now()
		reply, err := c.Call(ctx, op, body, opts...)
		ch <- outcome{reply, err, time.Since(start)}
	}()
	return ch
}

func await(t *testing.T, ch <-chan outcome) outcome {
	t.Helper()
	select {
	case o := <-ch:
		return o
	case <-time.After(20 * time.Second):
		t.Fatal("a call never returned")
	}
	return outcome{}
}

// Client.Close with calls in flight (leader and followers), callers
// waiting for a slot and a subscription: everything returns promptly,
// calls in flight with ErrUnavailable, later ones with ErrClosed, and no
// goroutine is left behind.
func TestClientCloseWhileBlocked(t *testing.T) {
	g := newGate()
	cfg := ServerConfig{}
	cfg.MaxInFlight = 4
	k := startKernel(t, cfg, func(s *Server) { s.Handle("gate", RightRequest, g.handle) })
	noLeak(t)
	c := dialT(t, k.path, ClientConfig{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	sub, err := c.Subscribe(ctx, "news", SubscribeOptions{})
	require.NoError(t, err)
	var calls []<-chan outcome
	for range 3 { // 3 in the handler, 1 slot for the subscription's answer
		calls = append(calls, goCall(c, ctx, "gate", nil))
	}
	g.waitInside(t, 3)
	var waiting []<-chan outcome
	for range 3 {
		waiting = append(waiting, goCall(c, ctx, "gate", nil))
	}
	time.Sleep(10 * time.Millisecond) // let them block for a slot
	start := time.Now()
	require.NoError(t, c.Close())
	assert.Less(t, time.Since(start), promptly, "Close stalled")
	for _, ch := range append(calls, waiting...) {
		o := await(t, ch)
		assert.Error(t, o.err)
		assert.True(t, errors.Is(o.err, ErrUnavailable) || errors.Is(o.err, ErrClosed), "%v", o.err)
	}
	_, open := <-sub.Events()
	assert.False(t, open, "Close ends the subscriptions")
	_, err = c.Call(ctx, "gate", nil)
	assert.ErrorIs(t, err, ErrClosed)
	_, err = c.Subscribe(ctx, "news", SubscribeOptions{})
	assert.ErrorIs(t, err, ErrClosed)
	require.NoError(t, c.Close(), "idempotent")
	require.Eventually(t, func() bool { return k.srv.Stats().Sessions == 0 }, 20*time.Second, time.Millisecond)
}

// Server.Close with calls in flight, some blocking the session's reader
// (Inline): every call returns promptly with ErrUnavailable, handlers see
// their context end, Serve returns, and no goroutine is left behind.
func TestServerCloseWhileBlocked(t *testing.T) {
	g := newGate()
	k := startKernel(t, ServerConfig{}, func(s *Server) {
		s.Handle("gate", RightRequest, g.handle)
		s.Handle("gate.inline", RightRequest, g.handle, Inline)
	})
	srv := k.srv
	noLeak(t)
	c := dialT(t, k.path, ClientConfig{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	calls := []<-chan outcome{goCall(c, ctx, "gate", nil), goCall(c, ctx, "gate", nil)}
	g.waitInside(t, 2)
	calls = append(calls, goCall(c, ctx, "gate.inline", nil))
	g.waitInside(t, 3)
	calls = append(calls, goCall(c, ctx, "gate", nil)) // behind the Inline one

	closed := make(chan struct{})
	go func() { srv.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(20 * time.Second):
		t.Fatal("Server.Close stalled")
	}
	assert.NoError(t, k.served(t))
	for _, ch := range calls {
		o := await(t, ch)
		assert.ErrorIs(t, o.err, ErrUnavailable)
	}
	g.waitInside(t, 0)
	_, err := c.Call(ctx, "gate", nil)
	assert.ErrorIs(t, err, ErrUnavailable, "no kernel: fail fast")
	require.NoError(t, srv.Close(), "idempotent")
	c.Close()
}

// Server.Shutdown lets calls in flight finish, their callers get the
// replies, and Health answers NOT_SERVING meanwhile; then every session
// ends and Serve returns.
func TestServerShutdownDrains(t *testing.T) {
	g := newGate()
	k := startKernel(t, ServerConfig{}, func(s *Server) {
		s.Handle("gate", RightRequest, g.handle)
		s.Handle("echo", RightRequest, echo, Inline)
	})
	srv := k.srv
	c := dialT(t, k.path, ClientConfig{})
	d := dialRaw(t, k.path, control.DialConfig{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	slow := goCall(c, ctx, "gate", []byte("slow"))
	g.waitInside(t, 1)
	// Callers in a loop: the drain must not wait for them to pause.
	stop := make(chan struct{})
	var busy sync.WaitGroup
	for range 4 {
		busy.Add(1)
		go func() {
			defer busy.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if _, err := c.Call(ctx, "echo", []byte("x")); err != nil {
					assert.ErrorIs(t, err, ErrUnavailable, "a call refused by a draining kernel")
					time.Sleep(time.Millisecond)
				}
			}
		}()
	}
	shut := make(chan error, 1)
	go func() {
		sctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		shut <- srv.Shutdown(sctx)
	}()
	// A daemon still asking (the raw one ignores GOAWAY) hears NOT_SERVING.
	require.Eventually(t, func() bool {
		d.request(frame.Header{Correlation: d.seq + 1}, HealthOp, nil)
		return string(d.expectResponse(d.seq)) == "NOT_SERVING"
	}, 20*time.Second, time.Millisecond)
	go func() { // the raw daemon answers GOAWAY when it comes
		select {
		case <-d.s.GoAway():
			d.s.Shutdown(ctx)
		case <-d.s.Done():
		}
	}()
	select {
	case err := <-shut:
		t.Fatalf("Shutdown returned (%v) with a call in flight", err)
	default:
	}
	close(g.release)
	o := await(t, slow)
	require.NoError(t, o.err, "the call in flight is answered")
	assert.Equal(t, "done:slow", string(o.reply))
	select {
	case err := <-shut:
		assert.NoError(t, err)
	case <-time.After(20 * time.Second):
		t.Fatal("Shutdown never returned")
	}
	close(stop)
	busy.Wait()
	assert.NoError(t, k.served(t))
	_, err := c.Call(ctx, "echo", nil)
	assert.ErrorIs(t, err, ErrUnavailable)
	c.Close()
}

// A daemon that ends its session in order (Shutdown: GOAWAY, then wait for
// the kernel's) does not stall: the kernel answers GOAWAY at once when
// nothing is in flight, or once its calls in flight are answered.
func TestDaemonShutdownIsAnswered(t *testing.T) {
	g := newGate()
	k := startKernel(t, ServerConfig{}, func(s *Server) { s.Handle("gate", RightRequest, g.handle) })
	d := dialRaw(t, k.path, control.DialConfig{})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	start := time.Now()
	require.NoError(t, d.s.Shutdown(ctx))
	assert.Less(t, time.Since(start), promptly, "the kernel answered GOAWAY")

	d = dialRaw(t, k.path, control.DialConfig{})
	d.request(frame.Header{Correlation: 1}, "gate", []byte("x"))
	g.waitInside(t, 1)
	answered := k.srv.Stats().OK
	done := make(chan error, 1)
	go func() { done <- d.s.Shutdown(ctx) }()
	time.Sleep(20 * time.Millisecond)
	close(g.release)
	select {
	case err := <-done:
		assert.NoError(t, err)
	case <-time.After(promptly):
		t.Fatal("the daemon's Shutdown stalled")
	}
	// The daemon closes the moment the kernel's GOAWAY comes: the answer
	// must be in its ring by then.
	assert.Equal(t, answered+1, k.srv.Stats().OK, "the kernel sent GOAWAY before the answer")
}

// Server.Shutdown under a steady load: the daemons start no new calls
// (GOAWAY), the calls in flight finish, and Shutdown returns long before
// its context ends, rather than waiting for a pause that never comes.
func TestServerShutdownUnderLoad(t *testing.T) {
	k := startKernel(t, ServerConfig{}, func(s *Server) {
		s.Handle("work", RightRequest, func(_ context.Context, r *Request) ([]byte, error) {
			time.Sleep(time.Millisecond)
			return r.Body, nil
		})
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var busy sync.WaitGroup
	var ok, refused sync.Map
	for d := range 2 {
		c := dialT(t, k.path, ClientConfig{})
		for g := range 48 {
			busy.Add(1)
			go func() {
				defer busy.Done()
				for {
					_, err := c.Call(ctx, "work", []byte("x"))
					if err != nil {
						refused.Store(d*100+g, err)
						return
					}
					ok.Store(d*100+g, true)
				}
			}()
		}
	}
	require.Eventually(t, func() bool {
		n := 0
		ok.Range(func(any, any) bool { n++; return true })
		return n == 96
	}, 20*time.Second, time.Millisecond)
	sctx, scancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer scancel()
	start := time.Now()
	assert.NoError(t, k.srv.Shutdown(sctx))
	t.Logf("Shutdown took %v", time.Since(start))
	assert.Less(t, time.Since(start), 5*time.Second, "Shutdown waited for the load to pause")
	busy.Wait()
	refused.Range(func(_, v any) bool {
		assert.ErrorIs(t, v.(error), ErrUnavailable)
		return true
	})
	assert.NoError(t, k.served(t))
}

// A kernel that closes its end of the daemon's ring under a live session:
// a call whose frame went out as it closed fails promptly with
// ErrUnavailable and is not sent again, even WaitForReady (the kernel may
// have run it), and the Client goes on with a new session.
func TestRingClosedUnderLiveSession(t *testing.T) {
	if forceInline.Load() || forceTLS.Load() {
		t.Skip("an inline session has no ring to close")
	}
	var calls atomic.Int64
	k := startKernel(t, ServerConfig{}, func(s *Server) {
		s.Handle("count", RightRequest, func(context.Context, *Request) ([]byte, error) {
			calls.Add(1)
			return []byte("ok"), nil
		}, Inline)
	})
	cfg := ClientConfig{}
	cfg.Backoff = control.Backoff{Base: 20 * time.Millisecond}
	c := dialT(t, k.path, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := c.Call(ctx, "count", nil)
	require.NoError(t, err)
	first := c.cur.Load()
	k.srv.mu.Lock()
	for sc := range k.srv.conns {
		sc.sess.Consumer().Close()
	}
	k.srv.mu.Unlock()

	start := time.Now()
	_, err = c.Call(ctx, "count", nil, WaitForReady)
	assert.ErrorIs(t, err, ErrUnavailable)
	assert.Less(t, time.Since(start), promptly)
	// The kernel may have read it as its end closed (and the Client's
	// Flush saw the close after publishing it): at most once.
	assert.LessOrEqual(t, calls.Load(), int64(2), "a call that may have been sent was sent again")
	require.Eventually(t, func() bool {
		_, err := c.Call(ctx, "count", nil)
		return err == nil
	}, 20*time.Second, time.Millisecond, "the Client never left the broken session")
	assert.NotSame(t, first, c.cur.Load())
}

// Closing a Client (or losing its session) while callers read replies in
// place: Close swaps the rings' shared memory for private pages, so a
// reader holding a view across it would decode zeros. Every call returns
// its own intact reply, or an error matching ErrUnavailable or ErrClosed;
// never E_PROTO, never a reply of zeros.
func TestCloseUnderReaders(t *testing.T) {
	h := startHelperKernel(t, sockPath(t))
	rounds := 10
	if stressFull() {
		rounds = 100
	}
	for round := range rounds {
		c := dialT(t, h.path, ClientConfig{})
		var wg sync.WaitGroup
		var answered atomic.Int64
		for g := range 16 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				id := uint32(1000*round + g)
				var body, dst []byte
				for seq := uint64(1); ; seq++ {
					body = makeBody(body, id, seq, 16+int(seq%4096), byte(seq))
					var got []byte
					var err error
					if seq%2 == 0 {
						got, err = c.CallInto(context.Background(), "chk", body, dst[:0])
						dst = got
					} else {
						got, err = c.Call(context.Background(), "chk.pool", body)
					}
					if err != nil {
						if !errors.Is(err, ErrUnavailable) && !errors.Is(err, ErrClosed) {
							t.Errorf("round %d: %v", round, err)
						}
						return
					}
					if !bytes.Equal(got, body) {
						t.Errorf("round %d: a reply of %d bytes that is not the request's %d", round, len(got), len(body))
						return
					}
					answered.Add(1)
				}
			}()
		}
		require.Eventually(t, func() bool { return answered.Load() > 100 }, 20*time.Second, time.Millisecond)
		c.Close()
		wg.Wait()
		if t.Failed() {
			return
		}
	}
}

// A call waiting for room in a full ring (the kernel reads nothing: its
// reader is stuck in an Inline handler) honours its context: its deadline
// (context.DeadlineExceeded, not E_RESOURCE) or its cancellation.
func TestCallHonoursContextOnFullRing(t *testing.T) {
	g := newGate()
	k := startKernel(t, ServerConfig{}, func(s *Server) {
		s.Handle("stuck", RightRequest, g.handle, Inline)
		s.Handle("echo", RightRequest, echo, Inline)
	})
	t.Cleanup(func() { close(g.release) })
	cfg := ClientConfig{MaxAttempts: 1}
	cfg.TxRingSize = 64 << 10
	c := dialT(t, k.path, cfg)
	bg := context.Background()
	stuck := goCall(c, bg, "stuck", nil)
	g.waitInside(t, 1)
	big := make([]byte, 16<<10)
	var fill []<-chan outcome
	for range 3 { // fill the 64 KiB ring (the kernel reads none): a 4th waits for room
		fill = append(fill, goCall(c, bg, "echo", big))
	}
	time.Sleep(20 * time.Millisecond)

	for range 5 {
		ctx, cancel := context.WithTimeout(bg, 20*time.Millisecond)
		_, err := c.Call(ctx, "echo", big)
		cancel()
		assert.ErrorIs(t, err, context.DeadlineExceeded)
	}
	ctx, cancel := context.WithCancel(bg)
	call := goCall(c, ctx, "echo", big)
	time.Sleep(20 * time.Millisecond)
	cancel()
	o := await(t, call)
	assert.ErrorIs(t, o.err, context.Canceled)
	assert.Less(t, o.took, 20*time.Millisecond+promptly)

	g.release <- struct{}{} // the kernel reads again
	require.NoError(t, await(t, stuck).err)
	for _, ch := range fill {
		assert.NoError(t, await(t, ch).err)
	}
}

// A request's body stays what it was until the handler returns, even an
// Inline handler's (a view into the ring) whose session is closed under it
// (Server.Close, Shutdown): closing swaps the ring's memory for private
// pages, and waits for the handler to be done with its view.
func TestServerCloseKeepsInlineViews(t *testing.T) {
	var bad atomic.Int64
	inside := make(chan struct{}, 4)
	view := func(ctx context.Context, r *Request) ([]byte, error) {
		want := bytes.Clone(r.Body)
		inside <- struct{}{}
		<-ctx.Done()
		time.Sleep(10 * time.Millisecond) // Close is under way
		if !bytes.Equal(r.Body, want) {
			bad.Add(1)
		}
		return nil, ctx.Err()
	}
	for _, stop := range []string{"close", "shutdown"} {
		t.Run(stop, func(t *testing.T) {
			k := startKernel(t, ServerConfig{}, func(s *Server) { s.Handle("view", RightRequest, view, Inline) })
			d := dialRaw(t, k.path, control.DialConfig{})
			d.request(frame.Header{}, "view", bytes.Repeat([]byte("body"), 1000)) // one-way: the daemon waits for nothing
			<-inside
			if stop == "close" {
				k.srv.Close()
			} else {
				go d.s.Shutdown(context.Background()) // the daemon answers GOAWAY at once
				ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
				k.srv.Shutdown(ctx)
				cancel()
			}
			k.served(t)
			assert.Zero(t, bad.Load(), "the handler's view changed under it")
		})
	}
}
