package sypas

import (
	"context"
	"errors"
	"math"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/frame"
	"github.com/sypas/go/wire"
)

// floodTransport is a kernel that keeps the daemon's ring busy with
// answers to requests it no longer has (forged, or very late), as fast as
// the daemon reads them, and answers nothing else: the daemon's reader is
// never short of a frame.
type floodTransport struct {
	transport
	stopped atomic.Bool
	fake    bool // recv returned a forged frame: release is ours
}

func (t *floodTransport) recv(deadline time.Time) (frame.Frame, error) {
	if t.stopped.Load() {
		return t.transport.recv(deadline)
	}
	t.fake = true
	// Slot 0, generation 1000: no call of this test has that id.
	return frame.Frame{Header: frame.Header{Type: frame.TypeResponse, Flags: frame.FlagEndStream, Correlation: 1000<<32 | 1}}, nil
}

func (t *floodTransport) release() {
	if t.fake {
		t.fake = false
		return
	}
	t.transport.release()
}

func (t *floodTransport) stop() {
	t.stopped.Store(true)
	t.transport.stop()
}

// A caller reading the ring for everyone returns at its deadline even
// when frames never stop coming (a kernel flooding stale answers, or a
// busy topic): it looked at its context only when the ring ran dry, so
// it read on for as long as the flood lasted.
func TestLeaderHonoursContextUnderFlood(t *testing.T) {
	k := startKernel(t, ServerConfig{}, func(s *Server) { s.Handle("echo", RightRequest, echo, Inline) })
	c := dialT(t, k.path, ClientConfig{MaxAttempts: 1})
	cc := c.cur.Load()
	require.NotNil(t, cc)
	cc.tr = &floodTransport{transport: cc.tr}

	for _, cancel := range []bool{false, true} {
		ctx, stop := context.WithTimeout(context.Background(), 100*time.Millisecond)
		if cancel { // a context cancelled, with no deadline
			ctx, stop = context.WithCancel(context.Background())
			time.AfterFunc(100*time.Millisecond, stop)
		}
		done := make(chan error, 1)
		go func() {
			_, err := c.Call(ctx, "echo", []byte("x"))
			done <- err
		}()
		select {
		case err := <-done:
			want := context.DeadlineExceeded
			if cancel {
				want = context.Canceled
			}
			assert.ErrorIs(t, err, want)
		case <-time.After(20 * time.Second):
			t.Fatalf("cancel %v: a call read the flood long past its context", cancel)
		}
		stop()
	}
}

// A caller that gives up (its context ends) just as the reader hands it
// the role, after handOff picked it and before handOff's wake-up arrives,
// passes the role on: to another parked caller, or to the background
// reader of the subscriptions. The role was lost, and with it every parked
// caller's reply (and every event) until some new caller came along.
func TestRoleHandedToLeavingCallerIsPassedOn(t *testing.T) {
	for _, next := range []string{"caller", "background"} {
		t.Run(next, func(t *testing.T) {
			c := &clientConn{}
			w := &slot{wake: make(chan struct{}, 1)}
			w.state.Store(slotWaiting)
			other := &slot{wake: make(chan struct{}, 1)}
			other.state.Store(slotWaiting)
			if next == "caller" {
				other.parked = true
				c.waiters = []*slot{other}
			} else {
				c.bg = other
			}
			// handOff under mu: it gave the role up and picked w (parked,
			// and the most recent)...
			c.leading = false
			// ... and released mu; before it sends w the wake-up, w's
			// context ends: await's ctx.Done case.
			c.unregister(w)
			c.abandon(w, context.Canceled, nil)
			select { // handOff's wake-up, now
			case w.wake <- struct{}{}:
			default:
			}
			select {
			case <-other.wake:
			default:
				t.Fatalf("nobody holds the reader role (leading %v), and the %s waiting for it was not woken", c.leading, next)
			}
		})
	}
}

// A kernel granting a huge max_in_flight (any u32 is a valid WELCOME: a
// hostile kernel's 2^32 − 1, or a misconfigured one) costs the daemon no
// more than maxSlots slots: it made one slot and one channel per granted
// request, up front (at 2^32 − 1, hundreds of GB: the daemon died of it);
// and the kernel counts in flight against it without overflowing.
func TestHugeMaxInFlight(t *testing.T) {
	for _, n := range []uint32{1 << 20, math.MaxUint32} {
		cfg := ServerConfig{}
		cfg.MaxInFlight = n
		k := startKernel(t, cfg, func(s *Server) { s.Handle("echo", RightRequest, echo, Inline) })
		c := dialT(t, k.path, ClientConfig{MaxAttempts: 1})
		p, err := c.Params()
		require.NoError(t, err)
		require.Equal(t, n, p.MaxInFlight, "the kernel granted it")
		assert.LessOrEqual(t, len(c.cur.Load().slots), maxSlots)
		got, err := c.Call(context.Background(), "echo", []byte("x"))
		require.NoError(t, err, "max_in_flight %d", n)
		assert.Equal(t, "x", string(got))
	}
}

// forgeTransport fails every send of an answered frame after the frame
// "went out" (the session failed during the Flush), while the reader, in
// another goroutine, delivers an answer carrying the frame's correlation:
// the kernel read the request and answered before the session went, or a
// hostile kernel forged the id (they are easy to guess). A one-way send
// succeeds, and gets a forged answer all the same.
type forgeTransport struct {
	transport
	c *clientConn
}

func (t *forgeTransport) send(ctx context.Context, h frame.Header, ext []byte, m wire.Message, noWait bool) error {
	corr := h.Correlation
	if corr == 0 { // one-way: the kernel forges the id of the slot it used
		corr = t.c.slots[0].id
	}
	f := frame.Frame{Header: frame.Header{Type: frame.TypeResponse, Flags: frame.FlagEndStream, Correlation: corr},
		Payload: []byte("forged")}
	go t.c.deliver(&f, &slot{}, nil)  // the reader, another goroutine
	time.Sleep(20 * time.Millisecond) // no synchronisation: only the slot's own
	if h.Correlation == 0 {
		return nil // a one-way Send succeeds
	}
	return &writtenErr{unavailable(errors.New("the session failed as the frame went out"))}
}

// A call whose send fails frees its slot only once no reader is writing
// into it, and a one-way send's slot takes no answer: both freed the slot
// at once, under a reader claiming it for an answer, which then wrote that
// answer into the slot (and the caller's buffer) of whichever call took
// the slot next, and marked that call answered. Run with -race, which
// reports the unordered accesses to the slot.
func TestFailedSendWaitsForAClaimingReader(t *testing.T) {
	cfg := ServerConfig{}
	cfg.MaxInFlight = 1 // every call takes the same slot
	k := startKernel(t, cfg, func(s *Server) { s.Handle("echo", RightRequest, echo, Inline) })
	c := dialT(t, k.path, ClientConfig{MaxAttempts: 1})
	cc := c.cur.Load()
	require.NotNil(t, cc)
	real := cc.tr
	cc.tr = &forgeTransport{transport: real, c: cc}
	dst := make([]byte, 0, 64)
	for range 3 {
		_, err := c.CallInto(context.Background(), "echo", []byte("x"), dst)
		require.ErrorIs(t, err, ErrUnavailable)
		require.NoError(t, c.Send(context.Background(), "echo", []byte("x")))
	}
	for i := range cc.slots {
		s := &cc.slots[i]
		assert.Eventually(t, func() bool { return s.state.Load() == slotIdle }, 10*time.Second, time.Millisecond,
			"slot %d is free, and stays so", i)
	}
}

// A CallFunc whose fn panics (on a reply it cannot parse, say) panics in
// its caller and leaves the Client usable. As the reader, fn ran holding
// the reader role and the ring's view: the panic kept both, so every later
// call parked for ever (or until its context) and Close hung. As a
// follower, fn's panic skipped freeing the slot: each such call lost one
// of max_in_flight for good.
func TestCallFuncPanicLeavesClientUsable(t *testing.T) {
	for _, as := range []string{"reader", "follower"} {
		t.Run(as, func(t *testing.T) {
			g := newGate()
			cfg := ServerConfig{}
			cfg.MaxInFlight = 2
			k := startKernel(t, cfg, func(s *Server) {
				s.Handle("echo", RightRequest, echo, Inline)
				s.Handle("gate", RightRequest, g.handle)
			})
			c := dialT(t, k.path, ClientConfig{MaxAttempts: 1})
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			waiting := make(chan error, 1)
			if as == "follower" { // a caller reads the ring, waiting for its reply
				go func() { _, err := c.Call(ctx, "gate", nil); waiting <- err }()
				g.waitInside(t, 1)
				cc := c.cur.Load()
				require.Eventually(t, func() bool {
					cc.mu.Lock()
					defer cc.mu.Unlock()
					return cc.leading
				}, 10*time.Second, time.Millisecond)
			}
			for i := range 3 { // more than the free slots
				func() {
					short, cancel := context.WithTimeout(ctx, 5*time.Second)
					defer cancel()
					defer func() { assert.Equal(t, "bad reply", recover(), "call %d", i) }()
					c.CallFunc(short, "echo", []byte("x"), func([]byte) error { panic("bad reply") })
				}()
			}
			short, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			got, err := c.Call(short, "echo", []byte("y"))
			require.NoError(t, err, "a call after the panics")
			assert.Equal(t, "y", string(got))
			if as == "follower" {
				close(g.release)
				require.NoError(t, <-waiting)
			}
			closed := make(chan struct{})
			go func() { c.Close(); close(closed) }()
			select {
			case <-closed:
			case <-time.After(10 * time.Second):
				t.Fatal("Close hung")
			}
		})
	}
}

// The background reader hands the reader role to a caller, and the caller
// finishes its call and gives the role up before the background reader
// has registered to get it back: the role must not be lost (nobody would
// read, and events would stop for good).
func TestBackgroundReaderGetsTheRoleBack(t *testing.T) {
	k := startKernel(t, ServerConfig{}, func(s *Server) { s.Handle("echo", RightRequest, echo, Inline) })
	c := dialT(t, k.path, ClientConfig{})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	sub, err := c.Subscribe(ctx, "news", SubscribeOptions{})
	require.NoError(t, err)
	pause := func() { time.Sleep(5 * time.Millisecond) } // the caller finishes meanwhile
	afterBgHandOff.Store(&pause)
	defer afterBgHandOff.Store(nil)
	for i := range 20 {
		_, err := c.Call(ctx, "echo", nil)
		require.NoError(t, err)
		require.NoError(t, k.srv.Publish(ctx, "news", nil))
		select {
		case <-sub.Events():
		case <-time.After(5 * time.Second):
			t.Fatalf("call %d: the event after it never came: nobody reads the ring", i)
		}
	}
}

// Unsubscribe while a re-subscription on a new session holds the
// subscription's lock (it waits for the kernel's answer, up to the drain
// timeout): Events closes at once and Unsubscribe returns with its
// context, not after the re-subscription.
func TestUnsubscribeHonoursItsContext(t *testing.T) {
	k := startKernel(t, ServerConfig{}, nil)
	c := dialT(t, k.path, ClientConfig{})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	sub, err := c.Subscribe(ctx, "news", SubscribeOptions{})
	require.NoError(t, err)
	sub.subMu <- struct{}{} // as subscribeOn does while a restore waits for the kernel
	defer func() { <-sub.subMu }()

	short, cancelShort := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancelShort()
	done := make(chan error, 1)
	go func() { done <- sub.Unsubscribe(short) }()
	select {
	case err := <-done:
		assert.ErrorIs(t, err, context.DeadlineExceeded)
	case <-time.After(10 * time.Second):
		t.Fatal("Unsubscribe waited past its context for the re-subscription")
	}
	_, open := <-sub.Events()
	assert.False(t, open, "Events is closed at once")
}
