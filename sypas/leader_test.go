package sypas

import (
	"bytes"
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The callers waiting for the reader role are each listed once, and only
// while they wait: under a steady load with replies delivered by other
// callers, the list stays within max_in_flight (it grew by one entry per
// delivered reply, without bound, while some caller always waited).
func TestFollowersListBounded(t *testing.T) {
	k := startKernel(t, ServerConfig{}, func(s *Server) {
		s.Handle("echo", RightRequest, echo, Inline)
		s.Handle("echo.pool", RightRequest, echo)
	})
	c := dialT(t, k.path, ClientConfig{})
	cc := c.cur.Load()
	stop := make(chan struct{})
	var longest atomic.Int64
	go func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
			cc.mu.Lock()
			longest.Store(max(longest.Load(), int64(len(cc.waiters))))
			cc.mu.Unlock()
		}
	}()
	echoes(t, c, 32, 500, func(g int) string { return []string{"echo", "echo.pool"}[g%2] })
	close(stop)
	assert.LessOrEqual(t, longest.Load(), int64(len(cc.slots)))
	cc.mu.Lock()
	assert.Empty(t, cc.waiters, "nobody waits any more")
	cc.mu.Unlock()
}

// Calls whose deadline expires just as their reply arrives, into buffers
// the caller reuses at once: a reply never lands in the buffer of a call
// that has returned (the reader claims a slot before it writes into it),
// and a reply that won the race is returned as a success, fn included.
func TestExpiringCallsKeepTheirBuffers(t *testing.T) {
	k := startKernel(t, ServerConfig{}, func(s *Server) {
		s.Handle("echo", RightRequest, echo, Inline)
	})
	c := dialT(t, k.path, ClientConfig{MaxAttempts: 1})
	dur := time.Second
	if stressFull() {
		dur = 10 * time.Second
	}
	end := time.Now().Add(dur)
	var wg sync.WaitGroup
	var ok, expired atomic.Int64
	for g := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			body := bytes.Repeat([]byte{byte(g)}, 2048)
			dst := make([]byte, 0, 2048)
			wait := time.Duration(20+g*15) * time.Microsecond
			for i := 0; time.Now().Before(end); i++ {
				ctx, cancel := context.WithTimeout(context.Background(), wait)
				var err error
				var got []byte
				if i%2 == 0 {
					got, err = c.CallInto(ctx, "echo", body, dst[:0])
				} else {
					err = c.CallFunc(ctx, "echo", body, func(b []byte) error { got = append(dst[:0], b...); return nil })
				}
				cancel()
				if err != nil {
					expired.Add(1)
					// Ours again: a late reply must not write here.
					full := dst[:cap(dst)]
					for j := range full {
						full[j] = 0xEE
					}
					continue
				}
				ok.Add(1)
				if !bytes.Equal(got, body) {
					t.Errorf("caller %d: a reply of %d bytes that is not the request", g, len(got))
					return
				}
			}
		}()
	}
	wg.Wait()
	t.Logf("%d answered, %d expired", ok.Load(), expired.Load())
	require.Positive(t, ok.Load()+expired.Load())
}

// A caller alone reads its own reply: CallInto with a buffer of enough
// room allocates nothing (the kernel runs in another process, so that
// only the client's allocations count).
func TestCallIntoAllocatesNothing(t *testing.T) {
	h := startHelperKernel(t, sockPath(t))
	c := dialT(t, h.path, ClientConfig{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	body := makeBody(nil, 1, 1, 64, 0)
	dst := make([]byte, 0, 64)
	for _, ctx := range []context.Context{context.Background(), ctx} {
		allocs := testing.AllocsPerRun(200, func() {
			if _, err := c.CallInto(ctx, "chk", body, dst[:0]); err != nil {
				t.Fatal(err)
			}
		})
		assert.LessOrEqual(t, allocs, tlsReadAllocs(h.path), "crypto/tls's own, if on TLS")
	}
}
