package sypas

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/control"
	"github.com/sypas/go/control/token"
)

// flaky is a handler that fails its first N calls for each key (the
// request body "key/N/code") with code, then succeeds; it counts the calls
// and the tokens (sessions) they came with.
type flaky struct {
	mu     sync.Mutex
	calls  map[string]int
	tokens map[string]map[uint64]bool
}

func newFlaky() *flaky {
	return &flaky{calls: map[string]int{}, tokens: map[string]map[uint64]bool{}}
}

func (f *flaky) handle(_ context.Context, r *Request) ([]byte, error) {
	parts := strings.Split(string(r.Body), "/")
	n, _ := strconv.Atoi(parts[1])
	code, _ := strconv.Atoi(parts[2])
	f.mu.Lock()
	f.calls[parts[0]]++
	i := f.calls[parts[0]]
	if f.tokens[parts[0]] == nil {
		f.tokens[parts[0]] = map[uint64]bool{}
	}
	f.tokens[parts[0]][r.TokenID] = true
	f.mu.Unlock()
	switch {
	case i > n:
		return []byte("ok"), nil
	case code == 0:
		return nil, errors.New("a plain error: the database password is hunter2")
	case Code(code) == CodeResource:
		return nil, &Error{Code: CodeResource, Message: "busy", RetryAfter: 30 * time.Millisecond}
	}
	return nil, &Error{Code: Code(code), Message: "flaky"}
}

func (f *flaky) count(key string) (calls, tokens int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls[key], len(f.tokens[key])
}

// Transient errors from the kernel (E_RESOURCE, E_INTERNAL, E_TIMEOUT,
// E_UNAVAILABLE) are retried with backoff, honouring retry_after, up to
// MaxAttempts, but only for calls marked Idempotent: the kernel ran the
// others. Fatal codes are returned as they are, at once.
func TestRetryByClass(t *testing.T) {
	f := newFlaky()
	k := startKernel(t, ServerConfig{}, func(s *Server) {
		s.Handle("flaky", RightRequest, f.handle)
		s.Handle("flaky.inline", RightRequest, f.handle, Inline)
	})
	c := dialT(t, k.path, ClientConfig{MaxAttempts: 3})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	call := func(key string, n int, code Code, opts ...CallOption) error {
		op := "flaky"
		if len(key)%2 == 0 {
			op = "flaky.inline"
		}
		got, err := c.Call(ctx, op, fmt.Appendf(nil, "%s/%d/%d", key, n, code), opts...)
		if err == nil {
			assert.Equal(t, "ok", string(got))
		}
		return err
	}

	for _, code := range []Code{CodeResource, CodeInternal, CodeTimeout, CodeUnavailable} {
		t.Run(code.String(), func(t *testing.T) {
			key := "transient-" + code.String()
			start := time.Now()
			require.NoError(t, call(key+"-idem", 2, code, Idempotent))
			calls, _ := f.count(key + "-idem")
			assert.Equal(t, 3, calls)
			if code == CodeResource {
				assert.GreaterOrEqual(t, time.Since(start), 60*time.Millisecond, "retry_after (30 ms) is honoured")
			}

			err := call(key, 2, code)
			assert.ErrorIs(t, err, &Error{Code: code}, "a call that reached the kernel is not retried unless Idempotent")
			calls, _ = f.count(key)
			assert.Equal(t, 1, calls)

			err = call(key+"-many", 5, code, Idempotent)
			assert.ErrorIs(t, err, &Error{Code: code})
			calls, _ = f.count(key + "-many")
			assert.Equal(t, 3, calls, "MaxAttempts bounds the attempts")
		})
	}

	t.Run("plain-error", func(t *testing.T) {
		err := call("plain", 5, 0, Idempotent)
		assert.ErrorIs(t, err, ErrInternal)
		assert.NotContains(t, err.Error(), "hunter2", "a plain error's text stays in the kernel")
		calls, _ := f.count("plain")
		assert.Equal(t, 3, calls)
	})

	for _, code := range []Code{CodeNotFound, CodePermission, CodeProto, CodeTooLarge, CodeClosed, CodeVersion} {
		t.Run(code.String(), func(t *testing.T) {
			key := "fatal-" + code.String()
			err := call(key, 5, code, Idempotent)
			var e *Error
			require.ErrorAs(t, err, &e)
			assert.Equal(t, code, e.Code)
			assert.Equal(t, "flaky", e.Message)
			calls, _ := f.count(key)
			assert.Equal(t, 1, calls, "fatal codes are returned as they are")
		})
	}
}

// A retry_after longer than what is left of the call's context is not
// slept: the call fails at once with the kernel's error (a u32 of
// milliseconds reaches 49 days).
func TestRetryAfterBeyondDeadline(t *testing.T) {
	var calls atomic.Int32
	k := startKernel(t, ServerConfig{}, func(s *Server) {
		s.Handle("busy", RightRequest, func(context.Context, *Request) ([]byte, error) {
			calls.Add(1)
			return nil, &Error{Code: CodeResource, Message: "come back later", RetryAfter: time.Hour}
		}, Inline)
	})
	c := dialT(t, k.path, ClientConfig{})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	start := time.Now()
	_, err := c.Call(ctx, "busy", nil, Idempotent)
	assert.ErrorIs(t, err, ErrResource)
	assert.NotErrorIs(t, err, context.DeadlineExceeded, "returned before the deadline, not at it")
	assert.Less(t, time.Since(start), 10*time.Second)
	assert.EqualValues(t, 1, calls.Load())
}

// E_AUTH makes the Client attest again (a new session, a new token) and
// retry once; if the kernel still refuses, the call fails with E_AUTH.
func TestRetryReauthenticatesOnce(t *testing.T) {
	f := newFlaky()
	k := startKernel(t, ServerConfig{}, func(s *Server) {
		s.Handle("flaky", RightRequest, f.handle)
	})
	// A session younger than the backoff's base that ends counts as a
	// failed dial: a short base keeps the re-attestation quick.
	cfg := ClientConfig{}
	cfg.Backoff = control.Backoff{Base: 20 * time.Millisecond}
	c := dialT(t, k.path, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	got, err := c.Call(ctx, "flaky", fmt.Appendf(nil, "once/1/%d", CodeAuth))
	require.NoError(t, err)
	assert.Equal(t, "ok", string(got))
	calls, tokens := f.count("once")
	assert.Equal(t, 2, calls)
	assert.Equal(t, 2, tokens, "the retry came with a new token")

	_, err = c.Call(ctx, "flaky", fmt.Appendf(nil, "always/9/%d", CodeAuth))
	assert.ErrorIs(t, err, ErrAuth)
	calls, tokens = f.count("always")
	assert.Equal(t, 2, calls, "re-authenticated once, then gave up")
	assert.Equal(t, 2, tokens)

	h, err := c.Health(ctx)
	require.NoError(t, err)
	assert.Equal(t, "SERVING", h)
}

// Handler panics are answered E_INTERNAL and counted; the session, the
// kernel and the calls of other goroutines go on.
func TestHandlerPanics(t *testing.T) {
	log, l := newAuditLog()
	cfg := ServerConfig{}
	cfg.Logger = l
	k := startKernel(t, cfg, func(s *Server) {
		s.Handle("boom", RightRequest, func(context.Context, *Request) ([]byte, error) { panic("boom") })
		s.Handle("boom.inline", RightRequest, func(context.Context, *Request) ([]byte, error) { panic("boom") }, Inline)
		s.Handle("echo", RightRequest, echo, Inline)
	})
	c := dialT(t, k.path, ClientConfig{MaxAttempts: 1})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 20 {
				op := []string{"boom", "boom.inline", "echo"}[(g+i)%3]
				got, err := c.Call(ctx, op, []byte("x"))
				if op == "echo" {
					assert.NoError(t, err)
					assert.Equal(t, "x", string(got))
				} else {
					assert.ErrorIs(t, err, ErrInternal)
				}
			}
		}()
	}
	wg.Wait()
	st := k.srv.Stats()
	assert.Positive(t, st.Panics)
	assert.Equal(t, st.Panics, st.Failed)
	assert.Equal(t, int64(1), st.Sessions, "the session survived")
	assert.NotNil(t, log.find(map[string]string{"msg": "sypas: handler panicked", "op": "boom"}))
	h, err := c.Health(ctx)
	require.NoError(t, err)
	assert.Equal(t, "SERVING", h)
}

// A handler that gives up with its context's error answers E_TIMEOUT
// (deadline) or E_UNAVAILABLE (cancelled: the session or the server is
// closing), never E_INTERNAL, and without its text.
func TestHandlerContextErrors(t *testing.T) {
	k := startKernel(t, ServerConfig{}, func(s *Server) {
		s.Handle("deadline", RightRequest, func(context.Context, *Request) ([]byte, error) {
			return nil, fmt.Errorf("query hunter2: %w", context.DeadlineExceeded)
		})
		s.Handle("canceled", RightRequest, func(context.Context, *Request) ([]byte, error) {
			return nil, fmt.Errorf("query hunter2: %w", context.Canceled)
		}, Inline)
	})
	c := dialT(t, k.path, ClientConfig{MaxAttempts: 1})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := c.Call(ctx, "deadline", nil)
	assert.ErrorIs(t, err, ErrTimeout)
	assert.NotContains(t, err.Error(), "hunter2")
	_, err = c.Call(ctx, "canceled", nil)
	assert.ErrorIs(t, err, ErrUnavailable)
	assert.NotContains(t, err.Error(), "hunter2")
}

// A token revoked under a call in flight ends the session with E_AUTH: the
// call may have run, so it is sent again on the new session (a new
// attestation and token) only if Idempotent; else it fails.
func TestRevokedMidCall(t *testing.T) {
	rev := token.NewRevocations()
	var mu sync.Mutex
	calls := map[string]int{}
	inFlight := make(chan uint64, 2) // the token of a call that hangs
	release := make(chan struct{})
	cfg := ServerConfig{}
	cfg.Revoked = rev
	k := startKernel(t, cfg, func(s *Server) {
		// The first call of each key hangs, and never answers: its caller
		// learns only that the session ended.
		s.Handle("first-hangs", RightRequest, func(ctx context.Context, r *Request) ([]byte, error) {
			mu.Lock()
			calls[string(r.Body)]++
			n := calls[string(r.Body)]
			mu.Unlock()
			if n == 1 {
				inFlight <- r.TokenID
				<-release
				return nil, ctx.Err()
			}
			return []byte("ok"), nil
		})
	})
	t.Cleanup(func() { close(release) }) // before the kernel's: Close waits for its handlers
	ccfg := ClientConfig{}
	ccfg.Backoff = control.Backoff{Base: 20 * time.Millisecond}
	c := dialT(t, k.path, ccfg)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	count := func(key string) int {
		mu.Lock()
		defer mu.Unlock()
		return calls[key]
	}
	for _, tc := range []struct {
		key  string
		opts []CallOption
	}{{"plain", nil}, {"idempotent", []CallOption{Idempotent}}} {
		require.Eventually(t, func() bool { _, err := c.Health(ctx); return err == nil }, 20*time.Second, time.Millisecond)
		done := make(chan outcome, 1)
		go func() {
			b, err := c.Call(ctx, "first-hangs", []byte(tc.key), tc.opts...)
			done <- outcome{reply: b, err: err}
		}()
		select {
		case id := <-inFlight:
			rev.Revoke(id, time.Now().Add(time.Hour))
		case <-time.After(20 * time.Second):
			t.Fatal("the call never reached the handler")
		}
		o := await(t, done)
		if tc.opts == nil {
			assert.ErrorIs(t, o.err, ErrAuth)
			assert.Equal(t, 1, count(tc.key), "sent again although it may have run")
		} else {
			require.NoError(t, o.err)
			assert.Equal(t, "ok", string(o.reply))
			assert.Equal(t, 2, count(tc.key))
		}
	}
}
