package sypas

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/control"
	"github.com/sypas/go/frame"
	"github.com/sypas/go/internal/shm"
	"github.com/sypas/go/wire"
)

// forceInline makes dialT's Clients turn shared memory off, so that the
// tests run over the inline transport. SYPAS_TRANSPORT=inline sets it for
// the whole package run; TestInlineConformance for a chosen set.
var forceInline atomic.Bool

func init() {
	switch os.Getenv("SYPAS_TRANSPORT") {
	case "inline":
		forceInline.Store(true)
	case "tls":
		forceTLS.Store(true)
	}
}

// conformance is the bridge's behaviour that every transport must keep:
// calls in every delivery mode, concurrent callers, errors and codes,
// subscriptions, a re-authentication after a refused token, a revoked
// token mid-call, in-flight limits, and a kernel killed and restarted in
// another process.
var conformance = []struct {
	name string
	fn   func(*testing.T)
	// rings: the test also plays a raw daemon that writes ring records
	// (dialRaw), so it needs a Unix socket beside the kernel: not on TCP.
	rings bool
}{
	{"CallEcho", TestCallEcho, false},
	{"CallErrors", TestCallErrors, false},
	{"ConcurrentCallers", TestConcurrentCallers, false},
	{"Subscribe", TestSubscribe, false},
	{"Unsubscribe", TestUnsubscribe, false},
	{"MaxInFlightCallersWait", TestMaxInFlightCallersWait, false},
	{"RetryReauthenticatesOnce", TestRetryReauthenticatesOnce, false},
	{"RevokedMidCall", TestRevokedMidCall, false},
	{"HandlerPanics", TestHandlerPanics, false},
	{"ClientCloseWhileBlocked", TestClientCloseWhileBlocked, false},
	{"ServerShutdownDrains", TestServerShutdownDrains, true},
	{"CrossProcessKernelKill", TestCrossProcessKernelKill, false},
}

// The bridge's behaviour (conformance) over the inline transport.
func TestInlineConformance(t *testing.T) {
	if forceInline.Load() {
		t.Skip("the whole run is inline already")
	}
	if forceTLS.Load() {
		t.Skip("the whole run is on TCP with TLS")
	}
	forceInline.Store(true)
	defer forceInline.Store(false)
	for _, tc := range conformance {
		t.Run(tc.name, tc.fn)
	}
}

// inlineLog records the log lines a Client or Server writes.
type inlineLog struct {
	mu    sync.Mutex
	lines []string
}

func (l *inlineLog) Enabled(context.Context, slog.Level) bool { return true }
func (l *inlineLog) WithAttrs([]slog.Attr) slog.Handler       { return l }
func (l *inlineLog) WithGroup(string) slog.Handler            { return l }
func (l *inlineLog) Handle(_ context.Context, r slog.Record) error {
	var b strings.Builder
	b.WriteString(r.Message)
	r.Attrs(func(a slog.Attr) bool {
		b.WriteString(" " + a.Key + "=" + a.Value.String())
		return true
	})
	l.mu.Lock()
	l.lines = append(l.lines, b.String())
	l.mu.Unlock()
	return nil
}

// count is the number of lines holding s.
func (l *inlineLog) count(s string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, line := range l.lines {
		if strings.Contains(line, s) {
			n++
		}
	}
	return n
}

const inlineMsg = "frames travel inline"

// checkInline calls through c and checks that its session is inline for
// reason, visible in Transport and logged once however many sessions.
func checkInline(t *testing.T, c *Client, log *inlineLog, reason string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	got, err := c.Call(ctx, "echo", []byte("inline"))
	require.NoError(t, err)
	assert.Equal(t, "inline", string(got))
	info, err := c.Transport()
	require.NoError(t, err)
	assert.Equal(t, TransportInline, info.Name)
	assert.Contains(t, info.Reason, reason)
	assert.Equal(t, 1, log.count(inlineMsg), "logged once")
}

// Shared memory turned off in the daemon's configuration, or in the
// kernel's: the session is inline, the Client says so and why, both sides
// log it once (not once per session), and the Server counts it.
func TestInlineFallbackByConfig(t *testing.T) {
	skipOnTLS(t, "the fallback from the rings to inline on a Unix socket")
	if forceInline.Load() {
		t.Skip("the whole run is inline already")
	}
	for _, tc := range []struct {
		name         string
		kernel, daem bool
		reason       string
	}{
		{"daemon", false, true, "daemon's configuration turns shared memory off"},
		{"kernel", true, false, "kernel chose it"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			klog := new(inlineLog)
			cfg := ServerConfig{}
			cfg.NoSharedMemory = tc.kernel
			cfg.Logger = slog.New(klog)
			k := startKernel(t, cfg, func(s *Server) { s.Handle("echo", RightRequest, echo, Inline) })
			dlog := new(inlineLog)
			ccfg := ClientConfig{}
			ccfg.NoSharedMemory = tc.daem
			ccfg.Logger = slog.New(dlog)
			c := dialT(t, k.path, ccfg)
			checkInline(t, c, dlog, tc.reason)
			log2 := new(inlineLog)
			ccfg.Logger = slog.New(log2)
			c2 := dialT(t, k.path, ccfg)
			checkInline(t, c2, log2, tc.reason)
			assert.Equal(t, 1, klog.count(inlineMsg), "the kernel logs it once")
			assert.EqualValues(t, 2, k.srv.Stats().Inline)

			// A session with the rings says so.
			if !tc.kernel {
				r := dialT(t, k.path, ClientConfig{})
				info, err := r.Transport()
				require.NoError(t, err)
				assert.Equal(t, TransportInfo{Name: TransportRings, Address: k.path}, info)
			}
		})
	}
}

// memfd_create refused on the kernel's side: the session falls back to
// inline with the failure as its reason; so does a daemon whose mmap of
// the kernel's rings fails.
func TestInlineFallbackWhenSharedMemoryFails(t *testing.T) {
	skipOnTLS(t, "the fallback from the rings to inline on a Unix socket")
	if forceInline.Load() {
		t.Skip("the whole run is inline already")
	}
	klog := new(inlineLog)
	kcfg := ServerConfig{}
	kcfg.Logger = slog.New(klog)
	k := startKernel(t, kcfg, func(s *Server) { s.Handle("echo", RightRequest, echo, Inline) })
	t.Run("memfd_create", func(t *testing.T) {
		defer shm.InjectFaults(errors.New("memfd_create: operation not permitted (test)"), nil)()
		log := new(inlineLog)
		cfg := ClientConfig{}
		cfg.Logger = slog.New(log)
		c := dialT(t, k.path, cfg)
		// WELCOME has no room for the kernel's reason: the kernel logs it.
		checkInline(t, c, log, "the kernel chose it")
		assert.Equal(t, 1, klog.count("memfd_create: operation not permitted (test)"))
	})
	t.Run("mmap", func(t *testing.T) {
		defer shm.InjectFaults(nil, errors.New("mmap: cannot allocate memory (test)"))()
		log := new(inlineLog)
		cfg := ClientConfig{}
		cfg.Logger = slog.New(log)
		c := dialT(t, k.path, cfg)
		checkInline(t, c, log, "mmap: cannot allocate memory (test)")
	})
	// And back on the rings once shared memory works again.
	c := dialT(t, k.path, ClientConfig{})
	info, err := c.Transport()
	require.NoError(t, err)
	assert.Equal(t, TransportRings, info.Name)
}

// A large request and reply cross the socket whole, above the control
// frames' 8 KiB limit; one above max_payload fails locally.
func TestInlineLargePayloads(t *testing.T) {
	k := startKernel(t, ServerConfig{}, func(s *Server) { s.Handle("echo", RightRequest, echo) })
	cfg := ClientConfig{}
	cfg.NoSharedMemory = true
	c := dialT(t, k.path, cfg)
	p, err := c.Params()
	require.NoError(t, err)
	body := make([]byte, int(p.MaxPayload)-20)
	for i := range body {
		body[i] = byte(i)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	got, err := c.Call(ctx, "echo", body)
	require.NoError(t, err)
	assert.Equal(t, body, got)
	_, err = c.Call(ctx, "echo", make([]byte, p.MaxPayload))
	assert.ErrorIs(t, err, ErrTooLarge)
	stillServes(t, c)
}

// DropNewest never waits on the inline transport either: a subscriber that
// reads nothing fills its queue and the socket, then each event is dropped
// and counted at once, and the subscriber's session lives on.
func TestInlinePublishDropNewestNeverWaits(t *testing.T) {
	cfg := ServerConfig{}
	cfg.HeartbeatInterval = 5 * time.Second // the subscriber stays alive throughout
	k := startKernel(t, cfg, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dc := ClientConfig{DialConfig: control.DialConfig{SessionConfig: control.SessionConfig{
		NoSharedMemory: true, Features: control.DefaultFeatures | wire.FeatureSubscribe | wire.FeatureInline,
		RxRingSize: 64 << 10, Logger: quiet}}}
	withTLS(t, k.path, &dc) // SYPAS_TRANSPORT=tls: the same over TLS
	s, err := control.Dial(ctx, k.path, dc.DialConfig)
	require.NoError(t, err)
	defer s.Close()
	in := s.Inline()
	require.NotNil(t, in)
	sub := wire.Subscribe{SubscriptionID: 7, Topic: []byte("news")}
	require.NoError(t, in.Write(frame.Header{Type: frame.TypeSubscribe, Correlation: 1}, nil, &sub, true))
	f, err := in.Next(time.Now().Add(10 * time.Second))
	require.NoError(t, err)
	require.Equal(t, frame.TypeResponse, f.Type)
	in.Release() // and never read again

	body := make([]byte, 32<<10)
	// 2 MiB: more than the queue and a Unix socket's buffers; TCP's grow
	// to several MiB, so on TLS go on until the drops begin.
	for i := 0; i < 64 || k.srv.Stats().Dropped == 0 && i < 1024; i++ {
		start := time.Now()
		require.NoError(t, k.srv.Publish(ctx, "news", body))
		require.Less(t, time.Since(start), promptly, "Publish %d waited for a full subscriber", i)
	}
	assert.NotZero(t, k.srv.Stats().Dropped)
	assert.NoError(t, s.Err(), "the subscriber's session lives on")
}

// Both directions of the socket full at once, while heartbeats come: 64
// callers send bodies near max_payload to an Inline echo, so the kernel's
// reader waits to write answers the daemon has not read while the daemon's
// senders wait to write requests the kernel has not read. The daemon's
// reader must go on reading meanwhile; when it waited to write a
// HEARTBEAT's answer behind the blocked senders, both sides waited for
// each other until the write timeout ended the session (seen as "data-plane
// write: i/o timeout" or a broken pipe). A short heartbeat interval makes
// the HEARTBEATs land in those moments.
func TestInlineBothDirectionsFull(t *testing.T) {
	scfg := ServerConfig{}
	scfg.HeartbeatInterval = 5 * time.Millisecond
	scfg.HeartbeatMisses = 200 // 1 s of liveness: room for -race on 2 busy CPUs
	k := startKernel(t, scfg, func(s *Server) { s.Handle("echo", RightRequest, echo, Inline) })
	cfg := ClientConfig{}
	cfg.NoSharedMemory = true
	c := dialT(t, k.path, cfg)
	p, err := c.Params()
	require.NoError(t, err)
	body := make([]byte, int(p.MaxPayload)-64)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	end := time.Now().Add(2 * time.Second)
	if testing.Short() {
		end = time.Now().Add(500 * time.Millisecond)
	}
	var wg sync.WaitGroup
	var calls atomic.Int64
	errs := make(chan error, 64)
	for range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			reply := make([]byte, 0, len(body))
			for time.Now().Before(end) {
				got, err := c.CallInto(ctx, "echo", body, reply[:0])
				if err != nil {
					errs <- err
					return
				}
				if len(got) != len(body) {
					errs <- errors.New("a short reply")
					return
				}
				calls.Add(1)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	t.Logf("%d calls of %d bytes each way", calls.Load(), len(body))
}
