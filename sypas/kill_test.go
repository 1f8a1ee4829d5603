package sypas

import (
	"bytes"
	"context"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// promptly bounds what must happen "within the peer-death latency" (a few
// ms): loose, so that a loaded machine never fails it, yet far below any
// timeout that would hide a hang.
const promptly = 2 * time.Second

type callResult struct {
	reply []byte
	err   error
	at    time.Time
}

// The kernel is killed (SIGKILL) with calls in flight: each returns within
// the peer-death latency with an error matching ErrUnavailable; new calls
// fail fast the same way, or with WaitForReady wait for the next kernel
// (and end with their context when it comes too late); the client
// reconnects to the new kernel and restores its subscription there.
func TestCrossProcessKernelKill(t *testing.T) {
	path := sockPath(t)
	a := startHelperKernel(t, path, "SYPAS_K_TAG=A")
	c := dialT(t, path, ClientConfig{})
	bg := context.Background()
	ctx, cancel := context.WithTimeout(bg, time.Minute)
	defer cancel()

	sub, err := c.Subscribe(ctx, "news", SubscribeOptions{})
	require.NoError(t, err)
	awaitEvent(t, ctx, c, sub, "A")

	// In flight when the kernel dies: calls blocked in a handler, and
	// callers calling in a loop.
	const hung, busy = 6, 8
	results := make(chan callResult, hung+busy)
	for range hung {
		go func() {
			_, err := c.Call(ctx, "hang", nil)
			results <- callResult{err: err, at: time.Now()}
		}()
	}
	var started sync.WaitGroup
	for g := range busy {
		started.Add(1)
		go func() {
			var body []byte
			for seq := uint64(1); ; seq++ {
				body = makeBody(body, uint32(100+g), seq, 64, 0)
				_, err := c.Call(ctx, "chk", body)
				if seq == 1 {
					started.Done()
				}
				if err != nil {
					results <- callResult{err: err, at: time.Now()}
					return
				}
			}
		}()
	}
	started.Wait()
	require.Eventually(t, func() bool {
		b, err := c.Call(ctx, "hanging", nil)
		return err == nil && string(b) == strconv.Itoa(hung)
	}, 20*time.Second, 5*time.Millisecond)

	killed := time.Now()
	a.kill()
	for range hung + busy {
		select {
		case r := <-results:
			assert.ErrorIs(t, r.err, ErrUnavailable)
			assert.Less(t, r.at.Sub(killed), promptly, "a call in flight returned %v after the kill", r.at.Sub(killed))
		case <-time.After(20 * time.Second):
			t.Fatal("a call in flight never returned after the kernel died")
		}
	}

	// No kernel: calls fail fast, or wait for one with WaitForReady.
	body := makeBody(nil, 1, 1, 64, 0)
	start := time.Now()
	_, err = c.Call(ctx, "chk", body)
	assert.ErrorIs(t, err, ErrUnavailable)
	assert.Less(t, time.Since(start), promptly)

	short, cancelShort := context.WithTimeout(ctx, 50*time.Millisecond)
	_, err = c.Call(short, "chk", body, WaitForReady)
	cancelShort()
	assert.ErrorIs(t, err, context.DeadlineExceeded, "a WaitForReady call ends with its context")

	waiting := make(chan callResult, 1)
	go func() {
		reply, err := c.Call(ctx, "chk", body, WaitForReady)
		waiting <- callResult{reply: reply, err: err, at: time.Now()}
	}()
	time.Sleep(50 * time.Millisecond)
	select {
	case r := <-waiting:
		t.Fatalf("a WaitForReady call returned with no kernel: %v", r.err)
	default:
	}

	startHelperKernel(t, path, "SYPAS_K_TAG=B")
	select {
	case r := <-waiting:
		require.NoError(t, r.err)
		assert.Equal(t, body, r.reply)
	case <-time.After(30 * time.Second):
		t.Fatal("the WaitForReady call never reached the new kernel")
	}
	got, err := c.Health(ctx)
	require.NoError(t, err)
	assert.Equal(t, "SERVING", got)
	awaitEvent(t, ctx, c, sub, "B") // the subscription was restored
}

// awaitEvent has the kernel tagged tag publish on sub's topic until an
// event from it arrives on sub (a restored subscription may take a moment).
func awaitEvent(t *testing.T, ctx context.Context, c *Client, sub *Subscription, tag string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if _, err := publishOn(ctx, c, publishReq{Topic: sub.Topic(), N: 1}); err != nil {
			time.Sleep(5 * time.Millisecond)
			continue
		}
		timeout := time.After(100 * time.Millisecond)
		for {
			select {
			case ev, ok := <-sub.Events():
				require.True(t, ok, "the subscription ended")
				if len(ev.Body) >= 8 && bytes.HasPrefix(ev.Body[8:], []byte(tag)) {
					assert.Equal(t, sub.Topic(), ev.Topic)
					assert.False(t, ev.Time.IsZero())
					return
				}
				continue
			case <-timeout:
			}
			break
		}
	}
	t.Fatalf("no event from kernel %s arrived on %q", tag, sub.Topic())
}
