package sypas

import (
	"bytes"
	"context"
	"errors"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// kernelSpans is the spans in use in the kernel's bulk regions.
func kernelSpans(k *kernel) int64 { return k.srv.Stats().BulkSpans }

// A handler that AllocReply's its reply, fills it and returns it answers
// by descriptor: the daemon gets the bytes, whole or a prefix, and the
// kernel's span comes back with the daemon's ACK. Every other way out of
// the handler (another slice, an empty one, an error, a panic, a deadline)
// frees the span before the answer is written, and the answer is what it
// would have been without AllocReply.
func TestAllocReply(t *testing.T) {
	needRings(t, "bulk needs shared memory")
	other := bytes.Repeat([]byte("o"), 100)
	k := startKernel(t, ServerConfig{}, func(s *Server) {
		s.Handle("reply", RightRequest, func(ctx context.Context, r *Request) ([]byte, error) {
			mode, arg, _ := bytes.Cut(r.Body, []byte(" "))
			n, _ := strconv.Atoi(string(arg))
			b, err := r.AllocReply(ctx, n)
			if err != nil {
				return nil, err
			}
			fillBody(b, uint32(n), uint64(n))
			switch string(mode) {
			case "whole":
				return b, nil
			case "prefix":
				return b[:n/2], nil
			case "shifted":
				return b[1:], nil
			case "empty":
				return b[:0], nil
			case "other":
				return other, nil
			case "error":
				return b, errorf(CodeNotFound, "no such file")
			case "panic":
				panic("handler bug")
			case "wait":
				<-ctx.Done()
				return b, ctx.Err()
			}
			return nil, errors.New("bad mode")
		}, Inline)
		s.Handle("pooled", RightRequest, func(ctx context.Context, r *Request) ([]byte, error) {
			b, err := r.AllocReply(ctx, 1<<20)
			if err != nil {
				return nil, err
			}
			fillBody(b, 7, 7)
			return b, nil
		})
	})
	c := bulkClient(t, k.path, 4<<20)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	want := func(n int) []byte { return fillBody(make([]byte, n), uint32(n), uint64(n)) }

	for _, n := range []int{1 << 20, 100, 4 << 20} {
		got, err := c.Call(ctx, "reply", []byte("whole "+strconv.Itoa(n)))
		require.NoError(t, err, n)
		assert.True(t, bytes.Equal(want(n), got), "%d bytes", n)
		require.Eventually(t, func() bool { return kernelSpans(k) == 0 }, 5*time.Second, time.Millisecond, "released by the daemon's ACK")
	}
	got, err := c.Call(ctx, "pooled", nil)
	require.NoError(t, err)
	assert.True(t, bytes.Equal(fillBody(make([]byte, 1<<20), 7, 7), got), "a pool handler's reply")
	got, err = c.Call(ctx, "reply", []byte("prefix 300000"))
	require.NoError(t, err)
	assert.True(t, bytes.Equal(want(300000)[:150000], got), "a prefix")
	require.Eventually(t, func() bool { return kernelSpans(k) == 0 }, 5*time.Second, time.Millisecond)

	// Freed before the answer: no span is left once the call returns
	// (other than those of a reply copied into bulk, released by ACK).
	got, err = c.Call(ctx, "reply", []byte("shifted 200000"))
	require.NoError(t, err)
	assert.True(t, bytes.Equal(want(200000)[1:], got), "another slice is copied")
	got, err = c.Call(ctx, "reply", []byte("empty 1000"))
	require.NoError(t, err)
	assert.Empty(t, got)
	got, err = c.Call(ctx, "reply", []byte("other 1000"))
	require.NoError(t, err)
	assert.Equal(t, other, got)
	_, err = c.Call(ctx, "reply", []byte("error 1000"))
	assert.ErrorIs(t, err, ErrNotFound)
	_, err = c.Call(ctx, "reply", []byte("panic 1000"))
	assert.ErrorIs(t, err, ErrInternal)
	short, cancelShort := context.WithTimeout(ctx, 50*time.Millisecond)
	_, err = c.Call(short, "reply", []byte("wait 1000"))
	cancelShort()
	assert.True(t, errors.Is(err, ErrTimeout) || errors.Is(err, context.DeadlineExceeded), "%v", err)
	require.Eventually(t, func() bool { return kernelSpans(k) == 0 }, 5*time.Second, time.Millisecond)
	assert.Zero(t, k.srv.Stats().BulkRefused)
}

// AllocReply's refusals: a reply larger than the region, a second one, a
// zero length, a region held full (after the wait, ErrResource), a session
// without bulk (ErrTooLarge), and a one-way request. None leaks a span.
func TestAllocReplyRefused(t *testing.T) {
	needRings(t, "bulk needs shared memory")
	held, release := make(chan struct{}), make(chan struct{})
	errs := make(chan error, 4)
	k := startKernel(t, ServerConfig{}, func(s *Server) {
		s.Handle("misuse", RightRequest, func(ctx context.Context, r *Request) ([]byte, error) {
			_, err := r.AllocReply(ctx, 4<<20+1)
			errs <- err
			_, err = r.AllocReply(ctx, 0)
			errs <- err
			b, err := r.AllocReply(ctx, 10)
			require.NoError(t, err)
			_, err = r.AllocReply(ctx, 10)
			errs <- err
			copy(b, "ok")
			return b[:2], nil
		})
		s.Handle("hold", RightRequest, func(ctx context.Context, r *Request) ([]byte, error) {
			b, err := r.AllocReply(ctx, 4<<20) // the whole region
			if err != nil {
				return nil, err
			}
			close(held)
			<-release
			return b[:1], nil
		})
		s.Handle("short", RightRequest, func(ctx context.Context, r *Request) ([]byte, error) {
			short, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
			defer cancel()
			_, err := r.AllocReply(short, 1<<20)
			errs <- err
			return nil, err
		})
		s.Handle("oneway", RightRequest, func(ctx context.Context, r *Request) ([]byte, error) {
			_, err := r.AllocReply(ctx, 10)
			errs <- err
			return nil, nil
		})
		s.Handle("fallback", RightRequest, func(ctx context.Context, r *Request) ([]byte, error) {
			b, err := r.AllocReply(ctx, 5)
			if errors.Is(err, ErrTooLarge) {
				errs <- err
				b = make([]byte, 5)
			} else if err != nil {
				return nil, err
			}
			copy(b, "plain")
			return b, nil
		})
	})
	c := bulkClient(t, k.path, 4<<20)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	got, err := c.Call(ctx, "misuse", nil)
	require.NoError(t, err)
	assert.Equal(t, "ok", string(got))
	assert.ErrorIs(t, <-errs, ErrTooLarge, "larger than the region")
	assert.ErrorIs(t, <-errs, os.ErrInvalid, "0 bytes")
	assert.ErrorIs(t, <-errs, os.ErrInvalid, "a second AllocReply")

	hold := make(chan error, 1)
	go func() { _, err := c.Call(ctx, "hold", nil); hold <- err }()
	<-held
	_, err = c.Call(ctx, "short", nil)
	assert.ErrorIs(t, err, ErrResource, "the caller is told")
	assert.ErrorIs(t, <-errs, ErrResource, "region full")
	close(release)
	require.NoError(t, <-hold)

	require.NoError(t, c.Send(ctx, "oneway", nil))
	assert.ErrorIs(t, <-errs, os.ErrInvalid, "one-way")
	require.Eventually(t, func() bool { return kernelSpans(k) == 0 }, 5*time.Second, time.Millisecond)

	cfg := ClientConfig{}
	cfg.NoSharedMemory = true
	ci := dialT(t, k.path, cfg)
	got, err = ci.Call(ctx, "fallback", nil)
	require.NoError(t, err)
	assert.Equal(t, "plain", string(got))
	assert.ErrorIs(t, <-errs, ErrTooLarge, "no bulk region inline")
	_, err = (&Request{Correlation: 1}).AllocReply(ctx, 5)
	assert.ErrorIs(t, err, ErrTooLarge, "a Request made by hand")
}

// A zero-copy reply (AllocReply, filled, returned) allocates nothing on
// the kernel's side, nor on the daemon's with CallFunc: kernel and daemon
// share this process here, so the count covers both.
func TestAllocReplyAllocs(t *testing.T) {
	needRings(t, "bulk needs shared memory")
	k := startKernel(t, ServerConfig{}, func(s *Server) {
		s.Handle("file", RightRequest, func(ctx context.Context, r *Request) ([]byte, error) {
			b, err := r.AllocReply(ctx, 1<<20)
			if err != nil {
				return nil, err
			}
			b[0], b[len(b)-1] = 1, 2
			return b, nil
		}, Inline)
		own := make([]byte, 1<<20) // the handler's reusable memory
		own[0], own[len(own)-1] = 1, 2
		s.Handle("copied", RightRequest, func(context.Context, *Request) ([]byte, error) { return own, nil }, Inline)
	})
	c := bulkClient(t, k.path, 4<<20)
	ctx := context.Background()
	check := func(r []byte) error {
		if len(r) != 1<<20 || r[0] != 1 || r[len(r)-1] != 2 {
			return errors.New("bad reply")
		}
		return nil
	}
	allocs := func(op string) float64 {
		call := func() {
			if err := c.CallFunc(ctx, op, nil, check); err != nil {
				t.Fatal(err)
			}
		}
		for range 50 {
			call()
		}
		return testing.AllocsPerRun(200, call)
	}
	assert.Zero(t, allocs("file"), "AllocReply, CallFunc")
	// A reply over the limit copied into a span by the kernel: no timer
	// for the wait either while the region has room.
	assert.Zero(t, allocs("copied"), "a reply copied into a span, CallFunc")
	require.Eventually(t, func() bool { return kernelSpans(k) == 0 }, 5*time.Second, time.Millisecond)
}

// A session that ends while its handler holds a reply span: the handler
// still writes the slice (the region is closed: private memory, no
// fault) and returns it; nothing is sent, nothing leaks, and the next
// session is served.
func TestAllocReplySessionEnds(t *testing.T) {
	needRings(t, "bulk needs shared memory")
	holding := make(chan struct{})
	returned := make(chan error, 1)
	k := startKernel(t, ServerConfig{}, func(s *Server) {
		s.Handle("hold", RightRequest, func(ctx context.Context, r *Request) ([]byte, error) {
			b, err := r.AllocReply(ctx, 1<<20)
			if err != nil {
				return nil, err
			}
			close(holding)
			<-ctx.Done() // the session ends
			fillBody(b, 1, 1)
			returned <- nil
			return b, nil
		})
		s.Handle("reply", RightRequest, func(ctx context.Context, r *Request) ([]byte, error) {
			b, err := r.AllocReply(ctx, 1<<20)
			if err != nil {
				return nil, err
			}
			fillBody(b, 2, 2)
			return b, nil
		})
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c := bulkClient(t, k.path, 4<<20)
	called := make(chan error, 1)
	go func() { _, err := c.Call(ctx, "hold", nil); called <- err }()
	<-holding
	require.NoError(t, c.Close())
	assert.Error(t, <-called)
	require.NoError(t, <-returned)

	c2 := bulkClient(t, k.path, 4<<20)
	got, err := c2.Call(ctx, "reply", nil)
	require.NoError(t, err)
	assert.True(t, bytes.Equal(fillBody(make([]byte, 1<<20), 2, 2), got))
	require.Eventually(t, func() bool { return kernelSpans(k) == 0 && k.srv.Stats().Sessions == 1 }, 5*time.Second, time.Millisecond)
}

// wholeRegionReply is a handler whose reply takes the whole 4 MiB region
// (AllocReply), or "fallback" when the region stays full; for the body
// "first" it closes first and holds its span 100 ms, so that later
// requests are in the ring before its ACK.
func wholeRegionReply(first chan struct{}) Handler {
	return func(ctx context.Context, r *Request) ([]byte, error) {
		b, err := r.AllocReply(ctx, 4<<20)
		if errors.Is(err, ErrResource) {
			return []byte("fallback"), nil
		} else if err != nil {
			return nil, err
		}
		if string(r.Body) == "first" {
			close(first)
			time.Sleep(100 * time.Millisecond)
		}
		return b[:5], nil
	}
}

// An Inline handler runs on the session's reader, the goroutine that reads
// the daemon's ACKs: its AllocReply cannot wait for one. With the region
// held by a reply whose ACK is queued behind the request, it fails at once
// with ErrResource (the handler falls back to a plain reply) instead of
// waiting, for ever without a deadline, for an ACK nobody reads.
func TestAllocReplyInlineNoWait(t *testing.T) {
	needRings(t, "bulk needs shared memory")
	first := make(chan struct{})
	k := startKernel(t, ServerConfig{}, func(s *Server) {
		s.Handle("whole", RightRequest, wholeRegionReply(first), Inline)
	})
	c := bulkClient(t, k.path, 4<<20)
	ctx := context.Background() // no deadline: the handler's is the session's
	firstDone := make(chan error, 1)
	go func() { _, err := c.Call(ctx, "whole", []byte("first")); firstDone <- err }()
	<-first
	second := make(chan []byte, 1)
	go func() {
		got, err := c.Call(ctx, "whole", []byte("second"))
		assert.NoError(t, err)
		second <- got
	}()
	select {
	case got := <-second:
		assert.Contains(t, []string{"fallback", "\x00\x00\x00\x00\x00"}, string(got))
	case <-time.After(5 * time.Second):
		c.Close() // unblock the session
		t.Fatal("the Inline handler's AllocReply waits for an ACK its own reader must read")
	}
	require.NoError(t, <-firstDone)
	require.Eventually(t, func() bool { return kernelSpans(k) == 0 }, 5*time.Second, time.Millisecond)
}

// A pool handler's AllocReply waits for room at most WriteTimeout when its
// context has no deadline, as a reply copied into a span does: the ACKs
// that would make room may be queued behind requests the reader cannot
// hand to a busy worker, and it then waited for ever.
func TestAllocReplyPoolBounded(t *testing.T) {
	needRings(t, "bulk needs shared memory")
	first := make(chan struct{})
	k := startKernel(t, ServerConfig{Workers: 1, WriteTimeout: 200 * time.Millisecond}, func(s *Server) {
		s.Handle("whole", RightRequest, wholeRegionReply(first))
	})
	c := bulkClient(t, k.path, 4<<20)
	ctx := context.Background() // no deadline: the handler's is the session's
	done := make(chan error, 4)
	go func() { _, err := c.Call(ctx, "whole", []byte("first")); done <- err }()
	<-first
	for range 3 {
		go func() { _, err := c.Call(ctx, "whole", nil); done <- err }()
	}
	deadline := time.After(10 * time.Second)
	for range 4 {
		select {
		case err := <-done:
			assert.NoError(t, err)
		case <-deadline:
			c.Close() // unblock the session
			t.Fatal("a pool handler's AllocReply waits for an ACK behind the requests queued for it")
		}
	}
	require.Eventually(t, func() bool { return kernelSpans(k) == 0 }, 5*time.Second, time.Millisecond)
}
