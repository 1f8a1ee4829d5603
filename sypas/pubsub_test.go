package sypas

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/control"
	"github.com/sypas/go/frame"
	"github.com/sypas/go/wire"
)

// subscribeRaw subscribes the raw daemon to topic as id, and reads the
// kernel's acknowledgement.
func (d *rawDaemon) subscribe(corr, id uint64, topic string) {
	d.t.Helper()
	p, err := (&wire.Subscribe{SubscriptionID: id, Topic: []byte(topic)}).Append(nil)
	require.NoError(d.t, err)
	d.frame(frame.Header{Type: frame.TypeSubscribe, Correlation: corr}, p)
	d.expectResponse(corr)
}

// DropNewest never makes the publisher wait, not even for a subscriber
// whose ring is full of the answers the kernel is still trying to write
// (their writer holds the ring while it waits for room).
func TestPublishDropNewestNeverWaits(t *testing.T) {
	cfg := ServerConfig{WriteTimeout: time.Minute}
	k := startKernel(t, cfg, func(s *Server) {
		s.Handle("big", RightRequest, func(context.Context, *Request) ([]byte, error) {
			return make([]byte, 30<<10), nil
		}, Inline)
	})
	d := dialRaw(t, k.path, control.DialConfig{SessionConfig: control.SessionConfig{RxRingSize: 64 << 10}})
	d.subscribe(1, 7, "news")
	for corr := uint64(2); corr < 5; corr++ { // two answers fit, the third waits for room
		d.request(frame.Header{Correlation: corr}, "big", nil)
	}
	time.Sleep(50 * time.Millisecond) // let the third writer wait
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for i := range 3 {
		start := time.Now()
		require.NoError(t, k.srv.Publish(ctx, "news", []byte("e")), "DropNewest reports nothing")
		assert.Less(t, time.Since(start), promptly, "Publish %d waited for a full subscriber", i)
	}
	assert.Equal(t, uint64(3), k.srv.Stats().Dropped)
}

// eventBody is an event with index i (8 bytes) padded to size.
func eventBody(i, size int) []byte {
	b := make([]byte, max(size, 8))
	binary.LittleEndian.PutUint64(b, uint64(i))
	return b
}

// publishEnd publishes END on topic until the subscriber helper h takes it
// and ends (an END that finds the subscriber's ring full is dropped too).
func publishEnd(t *testing.T, srv *Server, h *helperProc, topic string) {
	t.Helper()
	for start := time.Now(); time.Since(start) < 30*time.Second; {
		srv.Publish(context.Background(), topic, []byte("END"))
		for range 20 {
			if strings.Contains(h.out.String(), "}") {
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	t.Fatalf("the subscriber never took END: %s", h.out.String())
}

// Events fan out to every subscriber of their topic, each in its own
// process, in order, and to nobody else.
func TestCrossProcessPublishFanOut(t *testing.T) {
	k := startKernel(t, ServerConfig{}, nil)
	var subs []*helperProc
	for range 3 {
		subs = append(subs, startSubscriber(t, k.path, "news"))
	}
	other := startSubscriber(t, k.path, "other")
	ctx := context.Background()
	const n = 200
	for i := range n {
		require.NoError(t, k.srv.Publish(ctx, "news", eventBody(i, 64)))
	}
	assert.Zero(t, k.srv.Stats().Dropped) // (an END published as a subscriber leaves may be)
	for _, h := range subs {
		publishEnd(t, k.srv, h, "news")
		r := h.report(t)
		assert.Equal(t, subReport{Received: n, InOrder: true}, r)
	}
	publishEnd(t, k.srv, other, "other")
	assert.Equal(t, subReport{InOrder: true}, other.report(t))
	assert.GreaterOrEqual(t, k.srv.Stats().Published, uint64(3*n))
}

// A subscriber that stops reading (SIGSTOP) under DropNewest: the
// publisher never waits, the kernel counts what it drops, and the
// subscriber learns the count with the next event it gets (the EVENT's
// header extension): its Dropped is the kernel's.
func TestCrossProcessSlowSubscriberDropNewest(t *testing.T) {
	skipOnTLS(t, "a ring of the subscriber's size bounds what waits for it; on TCP the socket buffers hold much more")
	k := startKernel(t, ServerConfig{}, nil)
	h := startSubscriber(t, k.path, "slow", fmt.Sprintf("SYPAS_RXRING=%d", wire.MinRingSize))
	stop(t, h)
	defer h.cmd.Process.Signal(syscall.SIGCONT)
	ctx := context.Background()
	const n = 200
	start := time.Now()
	for i := range n {
		require.NoError(t, k.srv.Publish(ctx, "slow", eventBody(i, 100)))
	}
	assert.Less(t, time.Since(start), promptly, "DropNewest never waits")
	dropped := k.srv.Stats().Dropped
	assert.Greater(t, dropped, uint64(n/2), "a %d-byte ring holds fewer than %d events", wire.MinRingSize, n/2)
	assert.Equal(t, dropped, k.srv.Stats().DroppedByTopic["slow"])
	require.NoError(t, h.cmd.Process.Signal(syscall.SIGCONT))
	publishEnd(t, k.srv, h, "slow")
	r := h.report(t)
	assert.True(t, r.InOrder)
	assert.Equal(t, n, r.Received+int(dropped), "every event received or counted")
	// Its count is the kernel's: the events above, and any END dropped
	// before the one it took (an END published as it left is the
	// kernel's alone).
	assert.GreaterOrEqual(t, r.Dropped, dropped, "the subscriber sees the kernel's count")
	assert.LessOrEqual(t, r.Dropped, k.srv.Stats().Dropped)
}

// Under Block, Publish waits for a stopped subscriber up to its deadline,
// then drops the event, counts it and says so (ErrResource); once the
// subscriber reads again, events flow and it learns of the loss.
func TestCrossProcessSlowSubscriberBlock(t *testing.T) {
	skipOnTLS(t, "a ring of the subscriber's size bounds what waits for it; on TCP the socket buffers hold much more")
	k := startKernel(t, ServerConfig{Topics: map[string]SlowPolicy{"block": Block}}, nil)
	h := startSubscriber(t, k.path, "block", fmt.Sprintf("SYPAS_RXRING=%d", wire.MinRingSize))
	stop(t, h)
	defer h.cmd.Process.Signal(syscall.SIGCONT)
	const wait = 100 * time.Millisecond
	var i int
	for ; ; i++ {
		start := time.Now() // before the deadline is set: took is then at least wait
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		err := k.srv.Publish(ctx, "block", eventBody(i, 100))
		took := time.Since(start)
		cancel()
		if err != nil {
			assert.ErrorIs(t, err, ErrResource)
			assert.GreaterOrEqual(t, took, wait, "Block waits up to the deadline")
			assert.Less(t, took, wait+promptly)
			break
		}
		require.Less(t, i, 1000, "a stopped subscriber's ring never filled")
	}
	assert.Equal(t, uint64(1), k.srv.Stats().Dropped)
	require.NoError(t, h.cmd.Process.Signal(syscall.SIGCONT))
	publishEnd(t, k.srv, h, "block")
	r := h.report(t)
	assert.Equal(t, subReport{Received: i, InOrder: true, Dropped: 1}, r)
}

// A subscription that is not read keeps at most Pending events; the rest
// are dropped and counted (Dropped), never queued without bound.
func TestSubscriptionPendingBounded(t *testing.T) {
	k := startKernel(t, ServerConfig{}, nil)
	c := dialT(t, k.path, ClientConfig{})
	ctx := context.Background()
	sub, err := c.Subscribe(ctx, "news", SubscribeOptions{Pending: 8})
	require.NoError(t, err)
	for i := range 50 {
		require.NoError(t, k.srv.Publish(ctx, "news", eventBody(i, 16)))
	}
	require.Eventually(t, func() bool { return sub.Dropped() == 42 }, 20*time.Second, time.Millisecond)
	assert.Len(t, sub.Events(), 8)
	for i := range 8 {
		ev := <-sub.Events()
		assert.Equal(t, uint64(i), binary.LittleEndian.Uint64(ev.Body), "the oldest are kept")
	}
	assert.Zero(t, k.srv.Stats().Dropped, "the kernel delivered them all")
}

// Two subscriptions of one client to one topic each get every event;
// unsubscribing one leaves the other; the kernel forgets the topic when
// its last subscriber leaves.
func TestUnsubscribe(t *testing.T) {
	k := startKernel(t, ServerConfig{}, nil)
	c := dialT(t, k.path, ClientConfig{})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	a, err := c.Subscribe(ctx, "news", SubscribeOptions{})
	require.NoError(t, err)
	b, err := c.Subscribe(ctx, "news", SubscribeOptions{})
	require.NoError(t, err)
	require.NoError(t, k.srv.Publish(ctx, "news", eventBody(1, 8)))
	for _, s := range []*Subscription{a, b} {
		ev := <-s.Events()
		assert.Equal(t, uint64(1), binary.LittleEndian.Uint64(ev.Body))
	}
	require.NoError(t, a.Unsubscribe(ctx))
	require.NoError(t, a.Unsubscribe(ctx), "idempotent")
	_, open := <-a.Events()
	assert.False(t, open)
	require.NoError(t, k.srv.Publish(ctx, "news", eventBody(2, 8)))
	ev := <-b.Events()
	assert.Equal(t, uint64(2), binary.LittleEndian.Uint64(ev.Body))
	require.NoError(t, b.Unsubscribe(ctx))
	assert.Empty(t, k.srv.topics.list("news"))
	published := k.srv.Stats().Published
	require.NoError(t, k.srv.Publish(ctx, "news", eventBody(3, 8)))
	assert.Equal(t, published, k.srv.Stats().Published, "nobody left to publish to")
}

// stop stops the helper with SIGSTOP and waits until every one of its
// threads is stopped (kill returns before a running thread is).
func stop(t *testing.T, h *helperProc) {
	t.Helper()
	require.NoError(t, h.cmd.Process.Signal(syscall.SIGSTOP))
	dir := fmt.Sprintf("/proc/%d/task", h.cmd.Process.Pid)
	require.Eventually(t, func() bool {
		tasks, err := os.ReadDir(dir)
		if err != nil {
			return false
		}
		for _, task := range tasks {
			b, err := os.ReadFile(filepath.Join(dir, task.Name(), "stat"))
			// The state follows the command name, which ends with ')'.
			if i := bytes.LastIndexByte(b, ')'); err != nil || i < 0 || i+2 >= len(b) || b[i+2] != 'T' {
				return false
			}
		}
		return true
	}, 20*time.Second, time.Millisecond, "the helper never stopped")
}

// A subscription is subscribed once per session, though the Client's
// restore on a new session can run while (or after) the user's Subscribe
// gets there first: a second SUBSCRIBE with its id would be refused, and
// would stop the restore of the others.
func TestRestoreSubscribesOnce(t *testing.T) {
	k := startKernel(t, ServerConfig{}, nil)
	c := dialT(t, k.path, ClientConfig{})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	a, err := c.Subscribe(ctx, "a", SubscribeOptions{})
	require.NoError(t, err)
	_, err = c.Subscribe(ctx, "b", SubscribeOptions{})
	require.NoError(t, err)
	c.subs.restore(c.cur.Load()) // as if the session had just come up
	assert.Zero(t, k.srv.Stats().Denied, "a subscription was sent twice on one session")
	require.NoError(t, a.Unsubscribe(ctx))
	c.subs.restore(c.cur.Load())
	require.NoError(t, k.srv.Publish(ctx, "a", []byte("e")))
	assert.Zero(t, k.srv.Stats().Published, "an unsubscribed subscription came back")
}

// A subscription that the kernel of a new session refuses to restore (it
// allows fewer subscriptions) ends: Events is closed and Err says why.
// The one it accepts goes on receiving events.
func TestSubscriptionRefusedAfterReconnect(t *testing.T) {
	path := filepath.Join(t.TempDir(), "k.sock")
	a := startKernelAt(t, path, ServerConfig{}, nil)
	cfg := ClientConfig{}
	cfg.Backoff = control.Backoff{Base: 20 * time.Millisecond}
	c := dialT(t, path, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	subs := map[string]*Subscription{}
	for _, topic := range []string{"one", "two"} {
		s, err := c.Subscribe(ctx, topic, SubscribeOptions{})
		require.NoError(t, err)
		subs[topic] = s
	}
	a.srv.Close()
	require.NoError(t, a.served(t))
	a.l.Close()
	b := startKernelAt(t, path, ServerConfig{MaxSubscriptions: 1}, nil)

	var ended, live *Subscription
	select {
	case _, open := <-subs["one"].Events():
		require.False(t, open, "no event was published")
		ended, live = subs["one"], subs["two"]
	case _, open := <-subs["two"].Events():
		require.False(t, open, "no event was published")
		ended, live = subs["two"], subs["one"]
	case <-ctx.Done():
		t.Fatal("neither subscription ended")
	}
	assert.ErrorIs(t, ended.Err(), ErrResource)
	assert.Contains(t, ended.Err().Error(), ended.Topic())
	assert.NoError(t, live.Err())
	for {
		require.NoError(t, b.srv.Publish(ctx, live.Topic(), []byte("after")))
		select {
		case ev := <-live.Events():
			assert.Equal(t, "after", string(ev.Body))
			return
		case <-time.After(10 * time.Millisecond):
		case <-ctx.Done():
			t.Fatal("the restored subscription received nothing")
		}
	}
}
