package sypas

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/control"
	"github.com/sypas/go/control/token"
)

func testKeys(t testing.TB) *token.Keyring {
	k := token.NewKeyring()
	require.NoError(t, k.Add(1, bytes.Repeat([]byte{7}, 32)))
	return k
}

var quiet = slog.New(slog.DiscardHandler)

// kernel is a Server serving on a fresh socket, closed with the test.
type kernel struct {
	srv  *Server
	l    *control.Listener
	path string
	done chan struct{} // closed when Serve has returned err
	err  error
}

// served waits for Serve to return (after Close or Shutdown) and returns
// its error.
func (k *kernel) served(t testing.TB) error {
	t.Helper()
	select {
	case <-k.done:
		return k.err
	case <-time.After(20 * time.Second):
		t.Fatal("Serve did not return")
	}
	return nil
}

func startKernel(t testing.TB, cfg ServerConfig, setup func(*Server)) *kernel {
	t.Helper()
	return startKernelAt(t, sockPath(t), cfg, setup)
}

// startKernelAt is startKernel on the socket path, which may be one a
// stopped kernel served on.
func startKernelAt(t testing.TB, path string, cfg ServerConfig, setup func(*Server)) *kernel {
	t.Helper()
	if cfg.Keys == nil {
		cfg.Keys = testKeys(t)
	}
	if cfg.Logger == nil {
		cfg.Logger = quiet
	}
	srv, err := NewServer(cfg)
	require.NoError(t, err)
	if setup != nil {
		setup(srv)
	}
	l, err := listenAt(path)
	require.NoError(t, err)
	k := &kernel{srv: srv, l: l, path: path, done: make(chan struct{})}
	go func() { k.err = srv.Serve(l); close(k.done) }()
	t.Cleanup(func() {
		srv.Close()
		if err := k.served(t); !t.Skipped() || !errors.Is(err, ErrClosed) { // a test skipped at once closes before Serve began
			assert.NoError(t, err)
		}
		l.Close()
	})
	return k
}

func dialT(t testing.TB, path string, cfg ClientConfig) *Client {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = quiet
	}
	if forceInline.Load() {
		cfg.NoSharedMemory = true
	}
	tcp := withTLS(t, path, &cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := Dial(ctx, path, cfg)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	if want := map[bool]string{true: TransportInline}[forceInline.Load()]; len(cfg.Fallbacks) == 0 && (tcp || want != "") {
		if tcp {
			want = TransportTLS
		}
		info, err := c.Transport()
		require.NoError(t, err)
		require.Equal(t, want, info.Name)
	}
	return c
}

func echo(_ context.Context, req *Request) ([]byte, error) { return req.Body, nil }

func TestCallEcho(t *testing.T) {
	k := startKernel(t, ServerConfig{}, func(s *Server) {
		s.Handle("echo", RightRequest, echo, Inline)
		s.Handle("echo.pool", RightRequest, echo)
	})
	c := dialT(t, k.path, ClientConfig{})
	ctx := context.Background()
	for _, op := range []string{"echo", "echo.pool"} {
		got, err := c.Call(ctx, op, []byte("hello "+op))
		require.NoError(t, err)
		assert.Equal(t, "hello "+op, string(got))
	}
	got, err := c.CallInto(ctx, "echo", []byte("b"), []byte("a"))
	require.NoError(t, err)
	assert.Equal(t, "ab", string(got))
	var seen string
	require.NoError(t, c.CallFunc(ctx, "echo", []byte("view"), func(b []byte) error { seen = string(b); return nil }))
	assert.Equal(t, "view", seen)
	h, err := c.Health(ctx)
	require.NoError(t, err)
	assert.Equal(t, "SERVING", h)
}

func TestCallErrors(t *testing.T) {
	k := startKernel(t, ServerConfig{}, func(s *Server) {
		s.Handle("fail", RightRequest, func(context.Context, *Request) ([]byte, error) {
			return nil, &Error{Code: CodeResource, Message: "busy"}
		}, Inline)
		s.Handle("secret", RightRequest, func(context.Context, *Request) ([]byte, error) {
			return nil, errors.New("database password is hunter2")
		})
		s.Handle("boom", RightRequest, func(context.Context, *Request) ([]byte, error) { panic("boom") })
		s.Handle("admin", RightAdmin, echo, Inline)
	})
	c := dialT(t, k.path, ClientConfig{MaxAttempts: 1})
	ctx := context.Background()
	_, err := c.Call(ctx, "nope", nil)
	assert.ErrorIs(t, err, ErrNotFound)
	_, err = c.Call(ctx, "fail", nil)
	assert.ErrorIs(t, err, ErrResource)
	assert.ErrorContains(t, err, "busy")
	_, err = c.Call(ctx, "secret", nil)
	assert.ErrorIs(t, err, ErrInternal)
	assert.NotContains(t, err.Error(), "hunter2")
	_, err = c.Call(ctx, "boom", nil)
	assert.ErrorIs(t, err, ErrInternal)
	_, err = c.Call(ctx, "admin", nil)
	assert.ErrorIs(t, err, ErrPermission)
	got, err := c.Call(ctx, HealthOp, nil)
	require.NoError(t, err, "the session survives every refusal")
	assert.Equal(t, "SERVING", string(got))
	st := k.srv.Stats()
	assert.Equal(t, uint64(1), st.Panics)
	assert.GreaterOrEqual(t, st.Denied, uint64(2))
}

func TestConcurrentCallers(t *testing.T) {
	k := startKernel(t, ServerConfig{}, func(s *Server) {
		s.Handle("echo", RightRequest, echo, Inline)
		s.Handle("slow", RightRequest, func(ctx context.Context, r *Request) ([]byte, error) {
			time.Sleep(time.Millisecond)
			return r.Body, nil
		})
	})
	c := dialT(t, k.path, ClientConfig{})
	echoes(t, c, 64, 200, func(g int) string {
		if g%4 == 0 {
			return "slow"
		}
		return "echo"
	})
}

// echoes has callers goroutines each call op(goroutine) n times with a body
// of its own, and checks every reply.
func echoes(t *testing.T, c *Client, callers, n int, op func(g int) string) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, callers)
	for g := range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			op := op(g)
			for i := range n {
				msg := fmt.Sprintf("%d/%d", g, i)
				got, err := c.Call(context.Background(), op, []byte(msg))
				if err != nil {
					errs <- fmt.Errorf("%s %s: %w", op, msg, err)
					return
				}
				if string(got) != msg {
					errs <- fmt.Errorf("got %q, want %q", got, msg)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestSubscribe(t *testing.T) {
	k := startKernel(t, ServerConfig{}, nil)
	c := dialT(t, k.path, ClientConfig{})
	ctx := context.Background()
	sub, err := c.Subscribe(ctx, "news", SubscribeOptions{})
	require.NoError(t, err)
	for i := range 10 {
		require.NoError(t, k.srv.Publish(ctx, "news", []byte(fmt.Sprint(i))))
	}
	for i := range 10 {
		select {
		case ev := <-sub.Events():
			assert.Equal(t, "news", ev.Topic)
			assert.Equal(t, fmt.Sprint(i), string(ev.Body))
		case <-time.After(5 * time.Second):
			t.Fatalf("event %d did not arrive", i)
		}
	}
	require.NoError(t, sub.Unsubscribe(ctx))
	_, open := <-sub.Events()
	assert.False(t, open)
}
