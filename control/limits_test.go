package control

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/wire"
)

// serving is a Server running Serve in the background, every session
// handled by echo unless the test says otherwise; its audit records go to
// sink.
type serving struct {
	path string
	l    *Listener
	srv  *Server
	sink *auditSink
}

// startServe serves cfg at path (fresh if "") with lcfg for the Listener.
// When the test ends it stops Serve, which waits for every handler (the
// daemons' sessions, closed first, end them).
func startServe(t *testing.T, path string, lcfg Config, cfg ServerConfig, handle func(*Session)) *serving {
	t.Helper()
	if path == "" {
		path = sockPath(t)
	}
	if cfg.Keys == nil {
		cfg.Keys = testKeys(t)
	}
	sink, log := newAuditSink()
	cfg.Logger = log
	if handle == nil {
		handle = echo
	}
	l, err := Listen(path, lcfg)
	require.NoError(t, err)
	srv, err := NewServer(l, cfg)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, handle) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-served:
			assert.ErrorIs(t, err, context.Canceled)
		case <-time.After(10 * time.Second):
			t.Error("Serve did not return: a handler's session is still open")
		}
		l.Close()
	})
	return &serving{path: path, l: l, srv: srv, sink: sink}
}

// echo sends every record of the session's ring back until it ends.
func echo(s *Session) {
	buf := make([]byte, 4096)
	for {
		n, err := s.Consumer().ReadInto(buf)
		if err != nil {
			return
		}
		if _, err := s.Producer().Write(buf[:n]); err != nil {
			return
		}
	}
}

// exchange sends msg over d's ring and checks that the kernel echoes it.
func exchange(t *testing.T, d *Session, msg string) {
	t.Helper()
	_, err := d.Producer().Write([]byte(msg))
	require.NoError(t, err)
	assert.Equal(t, msg, readRecord(t, d.Consumer()))
}

// refusedWith checks that err is a limit refusal the daemon was told of:
// E_RESOURCE with a reason naming the limit, and a retry hint.
func refusedWith(t *testing.T, err error, field string) {
	t.Helper()
	require.ErrorIs(t, err, ErrHandshake)
	require.ErrorIs(t, err, wire.ErrResource, "%v", err)
	assert.ErrorIs(t, err, errPeerSent, "told by the kernel")
	var e *wire.Error
	require.True(t, errors.As(err, &e))
	assert.Contains(t, e.Message, field)
	assert.Positive(t, e.RetryAfter)
}

// Sessions beyond MaxSessionsPerUID or MaxSessions are refused with
// E_RESOURCE until one is closed; each refusal is one audit record. Before
// the limits, a daemon could open sessions until the kernel ran out of
// descriptors (5 each).
func TestSessionLimits(t *testing.T) {
	for _, tc := range []struct {
		field  string
		limits Limits
	}{
		{"MaxSessionsPerUID", Limits{MaxSessionsPerUID: 3}},
		{"MaxSessions", Limits{MaxSessions: 3}},
	} {
		t.Run(tc.field, func(t *testing.T) {
			sv := startServe(t, "", Config{}, ServerConfig{Limits: tc.limits}, nil)
			var ds []*Session
			for range 3 {
				d := dialT(t, sv.path, DialConfig{})
				exchange(t, d, "hello")
				ds = append(ds, d)
			}
			d, err := Dial(context.Background(), sv.path, DialConfig{})
			if d != nil {
				d.Close()
			}
			refusedWith(t, err, tc.field)
			r := sv.sink.one(t, EventLimit)
			assert.Equal(t, tc.field, r[LogKeyLimit])
			assert.Equal(t, "E_RESOURCE", r[LogKeyCode])
			assertSelf(t, r)

			// Closing a session frees its slot (once the kernel's handler
			// returned and Serve closed its end).
			require.NoError(t, ds[0].Close())
			require.Eventually(t, func() bool {
				d, err := Dial(context.Background(), sv.path, DialConfig{})
				if err != nil {
					return false
				}
				exchange(t, d, "again")
				d.Close()
				return true
			}, 10*time.Second, 20*time.Millisecond)
		})
	}
}

// Accept and Handshake count against the same limits as Serve.
func TestAcceptHonoursLimits(t *testing.T) {
	ts := startServer(t, "", ServerConfig{Limits: Limits{MaxSessionsPerUID: 1}})
	dialT(t, ts.path, DialConfig{})
	ts.session(t)
	d, err := Dial(context.Background(), ts.path, DialConfig{})
	if d != nil {
		d.Close()
	}
	refusedWith(t, err, "MaxSessionsPerUID")
	kerr := ts.acceptErr(t)
	assert.ErrorIs(t, kerr, wire.ErrResource)
	assert.ErrorIs(t, kerr, ErrHandshake)

	l := listenFor(t, sockPath(t), nil)
	srv, err := NewServer(l, ServerConfig{Keys: testKeys(t), Limits: Limits{MaxSessionsPerUID: 1}})
	require.NoError(t, err)
	dials := make(chan error, 2)
	for range 2 {
		go func() {
			d, err := Dial(context.Background(), l.Path(), DialConfig{})
			if err == nil {
				t.Cleanup(func() { d.Close() })
			}
			dials <- err
		}()
		c, err := l.Accept()
		require.NoError(t, err)
		k, err := srv.Handshake(context.Background(), c)
		if k != nil {
			t.Cleanup(func() { k.Close() })
			continue
		}
		assert.ErrorIs(t, err, wire.ErrResource)
	}
	// Either Dial may return first: the first one may still be reading
	// TOKEN when the second is refused.
	errs := []error{<-dials, <-dials}
	if errs[0] != nil {
		errs[0], errs[1] = errs[1], errs[0]
	}
	assert.NoError(t, errs[0])
	refusedWith(t, errs[1], "MaxSessionsPerUID")
}

// waitHandshakes waits until srv has n handshakes in progress.
func waitHandshakes(t *testing.T, srv *Server, n int) {
	t.Helper()
	require.Eventually(t, func() bool {
		srv.adm.mu.Lock()
		defer srv.adm.mu.Unlock()
		return srv.adm.handshakes == n
	}, 10*time.Second, time.Millisecond, "want %d handshakes in progress", n)
}

// A daemon that connects and sends nothing holds at most
// MaxHandshakesPerUID slots: the next connection is refused at once (not
// after the handshake timeout), and the slots come back when the silent
// ones end. Meanwhile Serve goes on serving.
func TestHandshakeLimitPerUID(t *testing.T) {
	sv := startServe(t, "", Config{}, ServerConfig{Limits: Limits{MaxHandshakesPerUID: 2}}, nil)
	silent := []*net.UnixConn{rawDial(t, sv.path), rawDial(t, sv.path)}
	waitHandshakes(t, sv.srv, 2)
	start := time.Now()
	e := readError(t, rawDial(t, sv.path))
	assert.Equal(t, wire.CodeResource, e.Code)
	assert.Contains(t, e.Message, "MaxHandshakesPerUID")
	assert.Equal(t, retryHandshake, e.RetryAfter)
	assert.Less(t, time.Since(start), DefaultHandshakeTimeout/2, "refused at once, not at the handshake timeout")
	for _, c := range silent {
		c.Close()
	}
	waitHandshakes(t, sv.srv, 0)
	d := dialT(t, sv.path, DialConfig{})
	exchange(t, d, "in")
}

// Serve accepts no more than MaxHandshakes at once: the next connection
// waits in the backlog (it is not refused) and is served when one ends.
func TestServeWaitsForHandshakeRoom(t *testing.T) {
	sv := startServe(t, "", Config{}, ServerConfig{
		Limits:        Limits{MaxHandshakes: 1},
		SessionConfig: SessionConfig{HandshakeTimeout: 300 * time.Millisecond},
	}, nil)
	rawDial(t, sv.path) // silent: holds the one slot for 300 ms
	waitHandshakes(t, sv.srv, 1)
	d := dialT(t, sv.path, DialConfig{})
	exchange(t, d, "waited")
}

// The kernel keeps FDReserve descriptors for itself: with RLIMIT_NOFILE
// lowered to a few dozen above what is open, daemons are refused with
// E_RESOURCE before the process runs out, and the reserve is still there
// to open files. Before, the sessions took every descriptor and accept(2),
// memfd_create and everything else in the process failed with EMFILE.
func TestFDReserveKept(t *testing.T) {
	sv := startServe(t, "", Config{}, ServerConfig{Limits: Limits{FDReserve: 32}}, nil)
	var old syscall.Rlimit
	require.NoError(t, syscall.Getrlimit(syscall.RLIMIT_NOFILE, &old))
	lowered := old
	lowered.Cur = uint64(countFDs(t) + 120)
	require.NoError(t, syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lowered))
	restored := false
	restore := func() {
		if !restored {
			restored = true
			require.NoError(t, syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old))
		}
	}
	defer restore()

	var err error
	n := 0
	for ; n < 100; n++ {
		var d *Session
		if d, err = Dial(context.Background(), sv.path, DialConfig{}); err != nil {
			break
		}
		t.Cleanup(func() { d.Close() })
		exchange(t, d, "fd")
	}
	require.Error(t, err, "refused before the limit")
	refusedWith(t, err, "FDReserve")
	t.Logf("%d sessions (each 5 descriptors in the kernel and 3 in the in-process daemon) before the refusal: %v", n, err)
	assert.Greater(t, n, 3)
	// The reserve is intact: the process can still open files.
	var files []*os.File
	for range 24 {
		f, err := os.Open("/dev/null")
		require.NoError(t, err, "the reserve was kept")
		files = append(files, f)
	}
	for _, f := range files {
		f.Close()
	}
	restore()
	assert.Equal(t, "FDReserve", sv.sink.one(t, EventLimit)[LogKeyLimit])
}

// fdHeadroom counts what /proc/self/fd lists, and changes by one per
// descriptor opened; so does the getdents fallback for kernels before 6.2.
func TestFDHeadroom(t *testing.T) {
	buf := make([]byte, 256) // small: several getdents calls
	var rl syscall.Rlimit
	require.NoError(t, syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl))
	free, err := fdHeadroom(buf)
	require.NoError(t, err)
	open := countFDs(t) - 1 // ReadDir's own descriptor
	assert.Equal(t, int(min(rl.Cur, 1<<31-1))-open, free)
	n, err := countOpenFDs(buf)
	require.NoError(t, err)
	assert.Equal(t, open, n)
	f, err := os.Open("/dev/null")
	require.NoError(t, err)
	free2, err := fdHeadroom(buf)
	require.NoError(t, err)
	n2, err := countOpenFDs(buf)
	require.NoError(t, err)
	f.Close()
	assert.Equal(t, free-1, free2)
	assert.Equal(t, n+1, n2)
}

// More TOKEN_REFRESH than MaxRefreshes per RefreshInterval are answered
// ERROR E_RESOURCE with the time until the next is allowed: each refresh
// costs the kernel two HMACs, and a daemon could send tens of thousands a
// second.
func TestRefreshRateLimited(t *testing.T) {
	sv := startServe(t, "", Config{}, ServerConfig{Limits: Limits{MaxRefreshes: 3, RefreshInterval: time.Hour}}, nil)
	d := dialT(t, sv.path, DialConfig{})
	tok := d.Token()
	served := 0
	for served < 50 {
		sendRaw(t, d, &wire.TokenRefresh{TokenID: d.Token().ID}, d.corr.Add(1))
		select {
		case <-d.tokenUp:
			served++
			continue
		case <-d.Done():
		case <-time.After(10 * time.Second):
			t.Fatal("no answer to TOKEN_REFRESH")
		}
		break
	}
	assert.Equal(t, 3, served, "the burst is served")
	assert.NotEqual(t, tok.ID, d.Token().ID)
	err := d.Err()
	require.ErrorIs(t, err, wire.ErrResource, "%v", err)
	var e *wire.Error
	require.True(t, errors.As(err, &e))
	assert.Contains(t, e.Message, "MaxRefreshes")
	assert.InDelta(t, float64(20*time.Minute), float64(e.RetryAfter), float64(time.Minute), "one refresh per 20 min")
	r := sv.sink.one(t, EventLimit)
	assert.Equal(t, "MaxRefreshes", r[LogKeyLimit])
	assert.Equal(t, hexID(d.Token().ID), r[LogKeyTokenID])
}

// A daemon that floods the socket (here with heartbeats, each of which the
// kernel would answer) is cut off after MaxControlFrames per heartbeat
// interval with E_RESOURCE; other sessions are untouched.
func TestControlFrameFlood(t *testing.T) {
	sv := startServe(t, "", Config{}, ServerConfig{}, nil)
	good := dialT(t, sv.path, DialConfig{})
	d := dialT(t, sv.path, DialConfig{})
	for i := range 10 * DefaultMaxControlFrames {
		if trySendRaw(d, &wire.Heartbeat{Nonce: uint64(i)}, 0) != nil {
			break // cut off
		}
	}
	waitDone(t, d, "flooding daemon")
	require.ErrorIs(t, d.Err(), wire.ErrResource, "%v", d.Err())
	assert.ErrorContains(t, d.Err(), "MaxControlFrames")
	assert.Equal(t, "MaxControlFrames", sv.sink.one(t, EventLimit)[LogKeyLimit])
	exchange(t, good, "still here")
	assert.NoError(t, good.Err())
}

// The bucket refills evenly and never beyond its burst.
func TestBucket(t *testing.T) {
	b := newBucket(2, time.Second)
	t0 := time.Unix(100, 0)
	for range 2 {
		ok, _ := b.take(t0)
		require.True(t, ok)
	}
	ok, wait := b.take(t0)
	assert.False(t, ok)
	assert.Equal(t, 500*time.Millisecond, wait)
	ok, _ = b.take(t0.Add(500 * time.Millisecond))
	assert.True(t, ok)
	for range 2 {
		ok, _ = b.take(t0.Add(time.Hour)) // a long idle gives back the burst only
		assert.True(t, ok)
	}
	ok, _ = b.take(t0.Add(time.Hour))
	assert.False(t, ok)
}

// BenchmarkFDHeadroom is the cost per accept of the descriptor check, with
// 10, 1000 and 10000 open; "getdents" is the fallback for kernels before
// 6.2.
func BenchmarkFDHeadroom(b *testing.B) {
	buf := make([]byte, 32<<10)
	for _, n := range []int{10, 1000, 10000} {
		var files []*os.File
		for len(files)+10 < n {
			f, err := os.Open("/dev/null")
			require.NoError(b, err)
			files = append(files, f)
		}
		for _, fn := range []struct {
			name string
			f    func([]byte) (int, error)
		}{{"stat", fdHeadroom}, {"getdents", countOpenFDs}} {
			b.Run(fn.name+"/"+strconv.Itoa(n), func(b *testing.B) {
				b.ReportAllocs()
				for b.Loop() {
					if _, err := fn.f(buf); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
		for _, f := range files {
			f.Close()
		}
	}
}

// Limits that every well-behaved daemon would hit are refused up front,
// naming the field, rather than left to end healthy sessions.
func TestLimitsBelowWhatDaemonsNeedRefused(t *testing.T) {
	l, err := Listen(filepath.Join(t.TempDir(), "k.sock"), Config{})
	require.NoError(t, err)
	defer l.Close()
	for _, tc := range []struct {
		field string
		cfg   ServerConfig
	}{
		{"MaxControlFrames", ServerConfig{Limits: Limits{MaxControlFrames: 2}}},
		{"MaxRefreshes", ServerConfig{Limits: Limits{MaxRefreshes: 1}}},
		{"MaxRefreshes", ServerConfig{TokenTTL: time.Minute, Limits: Limits{MaxRefreshes: 3, RefreshInterval: 2 * time.Minute}}},
	} {
		tc.cfg.Keys = testKeys(t)
		_, err := NewServer(l, tc.cfg)
		require.ErrorIs(t, err, ErrConfig, tc.field)
		assert.Contains(t, err.Error(), "ServerConfig.Limits."+tc.field)
	}
	tc := ServerConfig{Keys: testKeys(t), Limits: Limits{MaxControlFrames: minControlFrames, MaxRefreshes: 2}}
	_, err = NewServer(l, tc)
	assert.NoError(t, err, "the least limits that serve a daemon")
}
