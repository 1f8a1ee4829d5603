package control

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/sypas/go/control/token"
)

// monoNow is CLOCK_MONOTONIC, which every process of the machine shares.
func monoNow() time.Duration {
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return time.Duration(ts.Nano())
}

// listened parses the helper kernel's "LISTENING <monotonic ns>" line.
func listened(t testing.TB, h *helperProc) time.Duration {
	t.Helper()
	f := strings.Fields(h.expect(t, "LISTENING"))
	require.Len(t, f, 2)
	ns, err := strconv.ParseInt(f[1], 10, 64)
	require.NoError(t, err)
	return time.Duration(ns)
}

// reconnectDelay waits for the Client's next live session after a kernel
// helper started and returns it with the time from the kernel's Listen
// returning to the Client holding it.
func reconnectDelay(t testing.TB, c *Client, h *helperProc) (*Session, time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := c.Session(ctx)
	live := monoNow()
	require.NoError(t, err)
	return s, live - listened(t, h)
}

// A kernel that starts listening is dialed at once, not when the backoff
// runs out: the Client watches the socket while nobody listens there. The
// backoff base here is 5 s, so without the watch the session came about
// 5 s after the kernel's Listen; with it, milliseconds. Whether there was
// no socket file (ENOENT), a stale one left by a killed kernel
// (ECONNREFUSED), or not even a directory yet (no inotify: the poll).
func TestClientDialsWhenKernelListens(t *testing.T) {
	for _, tc := range []struct {
		name    string
		prepare func(t *testing.T, path string) // before the Client's first dial
		ready   func(t *testing.T, path string) // before the kernel starts
	}{
		{"no socket", nil, nil},
		{"stale socket", func(t *testing.T, path string) {
			fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			require.NoError(t, err)
			defer unix.Close(fd)
			require.NoError(t, unix.Bind(fd, &unix.SockaddrUnix{Name: path}))
		}, nil},
		{"no directory yet", nil, func(t *testing.T, path string) {
			require.NoError(t, os.Mkdir(filepath.Dir(path), 0o700))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "run", "k.sock")
			if tc.ready == nil {
				require.NoError(t, os.Mkdir(filepath.Dir(path), 0o700))
			}
			if tc.prepare != nil {
				tc.prepare(t, path)
			}
			const base = 5 * time.Second
			c := NewClient(path, DialConfig{Backoff: Backoff{Base: base, Jitter: -1}})
			defer c.Close()
			time.Sleep(50 * time.Millisecond) // the first dial fails; the Client waits
			if tc.ready != nil {
				tc.ready(t, path)
			}
			h := sessionHelperProc(t, "kernel", path)
			s, d := reconnectDelay(t, c, h)
			t.Logf("session %v after the kernel's Listen", d)
			assert.Less(t, d, base/2, "dialed when the backoff ran out, not when the kernel listened")
			h.expect(t, "READY")
			require.NoError(t, c.Close())
			assert.ErrorIs(t, s.Err(), ErrSessionClosed)
		})
	}
}

// The watch is for "nobody listening", not for "listening but failing". A
// kernel that crashes as soon as each session is up, or as soon as a
// daemon connects, and is restarted at once (its socket reappears every
// time) must still be redialed no faster than the backoff: a session that
// dies young and a failed handshake are failures, after which the Client
// waits the whole delay. A watch that cut it short would reconnect at every
// restart, dozens of times in the window.
func TestClientBacksOffFromAKernelThatKeepsDying(t *testing.T) {
	for _, handshake := range []bool{true, false} {
		t.Run(fmt.Sprintf("handshake=%v", handshake), func(t *testing.T) {
			path := sockPath(t)
			ctx, cancel := context.WithCancel(context.Background())
			var seen atomic.Int64
			done := make(chan error, 1)
			go func() { done <- crashingKernel(ctx, path, handshake, &seen) }()
			// Delays of 50, 100, then 200 ms: about 7 attempts in the window.
			c := newClient(path, DialConfig{Backoff: Backoff{Base: 50 * time.Millisecond, Multiplier: 2, Jitter: -1, Max: 200 * time.Millisecond}},
				func() float64 { return 0.5 })
			time.Sleep(time.Second)
			require.NoError(t, c.Close())
			cancel()
			require.NoError(t, <-done)
			n := seen.Load()
			t.Logf("%d attempts in 1 s", n)
			assert.GreaterOrEqual(t, n, int64(3), "the Client keeps trying")
			assert.LessOrEqual(t, n, int64(12))
		})
	}
}

// crashingKernel listens at path until ctx ends, and "crashes" (closes its
// listener, removing the socket) after each connection, which it first
// takes through the handshake if handshake is set; then it listens again
// at once. seen counts the connections.
func crashingKernel(ctx context.Context, path string, handshake bool, seen *atomic.Int64) error {
	keys := token.NewKeyring()
	keys.Rotate()
	for ctx.Err() == nil {
		l, err := Listen(path, Config{})
		if err != nil {
			return err
		}
		srv, err := NewServer(l, ServerConfig{Keys: keys})
		if err != nil {
			l.Close()
			return err
		}
		stop := context.AfterFunc(ctx, func() { l.Close() })
		if handshake {
			if s, err := srv.Accept(ctx); err == nil {
				seen.Add(1)
				s.Close()
			}
		} else if c, err := l.Accept(); err == nil {
			seen.Add(1)
			c.Close()
		}
		stop()
		l.Close()
	}
	return nil
}

// BenchmarkClientReconnect: a kernel in another process is killed and
// restarted, b.N times; reported is the time from the new kernel's Listen
// returning to the daemon's Client holding a live session (p50, p99), with
// the default Backoff. Each session is held past the backoff base first so
// that the kill is a kernel restart, not a session that died young.
//
//	go test -run '^$' -bench ClientReconnect -benchtime 20x ./control/
func BenchmarkClientReconnect(b *testing.B) {
	path := sockPath(b)
	h := sessionHelperProc(b, "kernel", path)
	h.expect(b, "LISTENING")
	c := NewClient(path, DialConfig{})
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := c.Session(ctx)
	require.NoError(b, err)
	born := time.Now()
	minLife := Backoff{}.withDefaults().Base
	var delays []time.Duration
	for b.Loop() {
		time.Sleep(minLife + 100*time.Millisecond - time.Since(born))
		h.kill(b)
		h.cmd.Wait()
		<-s.Done()
		s.Close()
		h = sessionHelperProc(b, "kernel", path)
		var d time.Duration
		s, d = reconnectDelay(b, c, h)
		born = time.Now()
		delays = append(delays, d)
	}
	slices.Sort(delays)
	pct := func(p float64) float64 {
		return float64(delays[int(p*float64(len(delays)-1))]) / float64(time.Millisecond)
	}
	b.ReportMetric(pct(0.5), "p50-ms")
	b.ReportMetric(pct(0.99), "p99-ms")
	b.ReportMetric(0, "ns/op") // the hold dominates: meaningless
}

// waitSocket waits the whole delay while nothing appears at the path, and
// ends early when a socket does, whether it can watch the directory or has
// to poll (the directory does not exist yet).
func TestWaitSocket(t *testing.T) {
	for _, watched := range []bool{true, false} {
		t.Run(fmt.Sprintf("watched=%v", watched), func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "run")
			if watched {
				require.NoError(t, os.Mkdir(dir, 0o700))
			}
			path := filepath.Join(dir, "k.sock")
			before := idOf(path)
			const d = 100 * time.Millisecond
			start := time.Now()
			waitSocket(context.Background(), path, before, d)
			assert.GreaterOrEqual(t, time.Since(start), d, "nothing appeared: the whole delay")

			listened := make(chan *Listener, 1)
			go func() {
				time.Sleep(20 * time.Millisecond)
				if !watched {
					os.Mkdir(dir, 0o700)
				}
				l, _ := Listen(path, Config{})
				listened <- l
			}()
			start = time.Now()
			waitSocket(context.Background(), path, before, time.Minute)
			assert.Less(t, time.Since(start), 30*time.Second, "the socket appeared")
			l := <-listened
			require.NotNil(t, l)
			defer l.Close()

			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			start = time.Now()
			waitSocket(ctx, path, idOf(path), time.Minute)
			assert.Less(t, time.Since(start), 30*time.Second, "ctx ended")
		})
	}
}
