package control

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/control/token"
	"github.com/sypas/go/frame"
	"github.com/sypas/go/ring"
	"github.com/sypas/go/wire"
)

func testKeys(t *testing.T) *token.Keyring {
	t.Helper()
	k := token.NewKeyring()
	require.NoError(t, k.Add(1, bytes.Repeat([]byte{7}, 32)))
	return k
}

// testServer listens at a fresh path and accepts sessions in the
// background, delivering each result on the returned channels.
type testServer struct {
	path string
	l    *Listener
	srv  *Server
	sess chan *Session
	errs chan error
	stop context.CancelFunc
	done chan struct{}
}

func startServer(t *testing.T, path string, cfg ServerConfig) *testServer {
	t.Helper()
	if path == "" {
		path = sockPath(t)
	}
	l, err := Listen(path, Config{})
	require.NoError(t, err)
	return serveT(t, l, path, cfg)
}

// serveT serves l (closed with the test), known to daemons as addr.
func serveT(t *testing.T, l *Listener, addr string, cfg ServerConfig) *testServer {
	t.Helper()
	if cfg.Keys == nil {
		cfg.Keys = testKeys(t)
	}
	srv, err := NewServer(l, cfg)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	ts := &testServer{path: addr, l: l, srv: srv, sess: make(chan *Session, 16), errs: make(chan error, 16), stop: cancel, done: make(chan struct{})}
	go func() {
		defer close(ts.done)
		for ctx.Err() == nil {
			s, err := srv.Accept(ctx)
			if err != nil {
				if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
					return
				}
				ts.errs <- err
				continue
			}
			ts.sess <- s
		}
	}()
	t.Cleanup(ts.Close)
	return ts
}

func (ts *testServer) Close() {
	ts.stop()
	ts.l.Close()
	<-ts.done
	for {
		select {
		case s := <-ts.sess:
			s.Close()
		default:
			return
		}
	}
}

func (ts *testServer) session(t *testing.T) *Session {
	t.Helper()
	select {
	case s := <-ts.sess:
		t.Cleanup(func() { s.Close() })
		return s
	case err := <-ts.errs:
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("no session accepted")
	}
	return nil
}

func (ts *testServer) acceptErr(t *testing.T) error {
	t.Helper()
	select {
	case s := <-ts.sess:
		s.Close()
		t.Fatal("handshake unexpectedly succeeded")
	case err := <-ts.errs:
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("no accept error")
	}
	return nil
}

func dialT(t *testing.T, path string, cfg DialConfig) *Session {
	t.Helper()
	s, err := Dial(context.Background(), path, cfg)
	require.NoError(t, err)
	t.Cleanup(func() { s.Close() })
	return s
}

func readRecord(t *testing.T, c *ring.Consumer) string {
	t.Helper()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 256)
	n, err := c.ReadInto(buf)
	require.NoError(t, err)
	return string(buf[:n])
}

// The whole handshake in one process: both ends agree on the parameters,
// the rings carry data both ways, the daemon holds the token the kernel
// minted for its attested identity, and Shutdown ends both cleanly.
func TestSessionHappyPath(t *testing.T) {
	base := countFDs(t)
	ts := startServer(t, "", ServerConfig{Scope: "svc"})
	d := dialT(t, ts.path, DialConfig{SessionConfig: SessionConfig{Name: "test-daemon", TxRingSize: 8 << 10}})
	k := ts.session(t)

	assert.Equal(t, StateOperation, d.State())
	assert.Equal(t, StateOperation, k.State())
	assert.Equal(t, k.Params(), d.Params())
	p := d.Params()
	assert.EqualValues(t, wire.ProtocolVersion, p.Version)
	assert.EqualValues(t, 8<<10, p.TxRingSize)
	assert.EqualValues(t, DefaultRingSize, p.RxRingSize)
	assert.EqualValues(t, 1000, p.HeartbeatIntervalMs)
	assert.EqualValues(t, 3, p.HeartbeatMisses)
	assert.Equal(t, wire.FeatureTokenRefresh, p.Features)

	assert.Equal(t, os.Getpid(), k.Peer().PID)
	dt, kt := d.Token(), k.Token()
	assert.Equal(t, kt.ID, dt.ID)
	assert.Equal(t, kt.Bytes, dt.Bytes)
	c := k.Capability()
	require.NotNil(t, c)
	assert.Equal(t, kt.ID, c.ID)
	assert.Equal(t, k.Peer().Subject(), c.Subject)
	assert.NoError(t, c.Allows(token.RightRequest, "svc/x", time.Now()))
	assert.ErrorIs(t, c.Allows(token.RightAdmin, "svc", time.Now()), token.ErrPermission)

	_, err := d.Producer().Write([]byte("ping"))
	require.NoError(t, err)
	assert.Equal(t, "ping", readRecord(t, k.Consumer()))
	_, err = k.Producer().Write([]byte("pong"))
	require.NoError(t, err)
	assert.Equal(t, "pong", readRecord(t, d.Consumer()))

	kdone := make(chan error, 1)
	go func() {
		<-k.GoAway()
		kdone <- k.Shutdown(context.Background())
	}()
	require.NoError(t, d.Shutdown(context.Background()))
	require.NoError(t, <-kdone)
	assert.ErrorIs(t, d.Err(), ErrSessionClosed)
	assert.ErrorIs(t, k.Err(), ErrSessionClosed)
	assert.ErrorIs(t, k.Err(), net.ErrClosed)
	assert.Equal(t, StateClosed, d.State())
	assert.NoError(t, d.Close(), "Close after Shutdown")
	assert.NoError(t, d.Close(), "Close is idempotent")
	ts.Close()
	assert.Equal(t, base, countFDs(t), "every fd released")
}

// Shutdown drains: records the kernel published before its GOAWAY are still
// read by the daemon, which answers before its own GOAWAY.
func TestShutdownDrainsInFlight(t *testing.T) {
	ts := startServer(t, "", ServerConfig{})
	d := dialT(t, ts.path, DialConfig{})
	k := ts.session(t)
	for _, m := range []string{"a", "b", "c"} {
		_, err := k.Producer().Write([]byte(m))
		require.NoError(t, err)
	}
	kerr := make(chan error, 1)
	go func() { kerr <- k.Shutdown(context.Background()) }()
	select {
	case <-d.GoAway():
	case <-time.After(5 * time.Second):
		t.Fatal("no GOAWAY")
	}
	assert.Equal(t, StateDraining, d.State())
	for _, m := range []string{"a", "b", "c"} {
		assert.Equal(t, m, readRecord(t, d.Consumer()))
	}
	require.NoError(t, d.Shutdown(context.Background()))
	require.NoError(t, <-kerr)
	assert.ErrorIs(t, k.Err(), ErrSessionClosed)
}

// Drain is Shutdown without the Close: the GOAWAY exchange completes, and
// the rings are still the session's (a view stays readable) until Close.
func TestDrainLeavesTheRings(t *testing.T) {
	ts := startServer(t, "", ServerConfig{})
	d := dialT(t, ts.path, DialConfig{})
	k := ts.session(t)
	_, err := d.Producer().Write([]byte("in flight"))
	require.NoError(t, err)
	v, err := k.Consumer().Next()
	require.NoError(t, err)
	go d.Shutdown(context.Background())
	require.NoError(t, k.Drain(context.Background()))
	select {
	case <-k.GoAway():
	default:
		t.Fatal("Drain returned before the daemon's GOAWAY")
	}
	assert.Equal(t, "in flight", string(v), "the view is intact until Close")
	require.NoError(t, k.Close())
	assert.ErrorIs(t, k.Err(), ErrSessionClosed)
}

// A session that receives GOAWAY and is never shut down by its owner ends
// by itself after DrainTimeout.
func TestGoAwayDrainTimeout(t *testing.T) {
	ts := startServer(t, "", ServerConfig{})
	d := dialT(t, ts.path, DialConfig{SessionConfig: SessionConfig{DrainTimeout: 50 * time.Millisecond}})
	k := ts.session(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	go k.Shutdown(ctx)
	select {
	case <-d.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("daemon did not end after its drain timeout")
	}
	assert.ErrorIs(t, d.Err(), ErrGoAway)
}

// The drain timer armed by a received GOAWAY is stopped when the session
// ends first, instead of firing DrainTimeout later on a dead session.
func TestDrainTimerStoppedOnClose(t *testing.T) {
	ts := startServer(t, "", ServerConfig{})
	d := dialT(t, ts.path, DialConfig{})
	k := ts.session(t)
	require.NoError(t, k.sendGoAway())
	<-d.GoAway()
	var timer *time.Timer
	require.Eventually(t, func() bool { timer = d.drainTimer.Load(); return timer != nil }, 5*time.Second, time.Millisecond)
	require.NoError(t, d.Close())
	assert.False(t, timer.Stop(), "already stopped by Close (DrainTimeout is %v)", DefaultDrainTimeout)
}

// Heartbeats keep an idle session alive well past interval×misses, and a
// peer that stops sending them is declared gone.
func TestHeartbeats(t *testing.T) {
	// 20 ms × 5: an idle session lives on heartbeats alone, with slack for
	// a loaded machine.
	ts := startServer(t, "", ServerConfig{SessionConfig: SessionConfig{HeartbeatInterval: 20 * time.Millisecond, HeartbeatMisses: 5}})
	d := dialT(t, ts.path, DialConfig{})
	k := ts.session(t)
	assert.EqualValues(t, 20, d.Params().HeartbeatIntervalMs)
	assert.EqualValues(t, 5, d.Params().HeartbeatMisses)
	time.Sleep(500 * time.Millisecond) // 5 × the silence bound
	require.NoError(t, d.Err())
	require.NoError(t, k.Err())

	// A kernel that goes silent after the handshake (socket still open).
	a, b := socketPair(t)
	go fakeKernel(t, b, fakeOpts{interval: 20, misses: 2, silent: true})
	start := time.Now()
	s, err := dialConn(context.Background(), a, DialConfig{})
	require.NoError(t, err)
	defer s.Close()
	s.Consumer().SetDeadline(time.Now().Add(5 * time.Second))
	_, err = s.Consumer().Next()
	assert.ErrorIs(t, err, ErrPeerGone)
	assert.ErrorIs(t, s.Err(), ErrPeerGone)
	assert.Contains(t, s.Err().Error(), "heartbeats missed")
	el := time.Since(start)
	assert.Less(t, el, 2*time.Second)
	t.Logf("silent kernel declared gone after %v (interval 20ms × 2)", el)
}

// The daemon refreshes its token at about 75 %% of its lifetime; the kernel
// answers with a new token for the same identity and accepts both ids as
// cap_ref during the switch.
func TestTokenRefresh(t *testing.T) {
	ts := startServer(t, "", ServerConfig{TokenTTL: 400 * time.Millisecond})
	d := dialT(t, ts.path, DialConfig{})
	k := ts.session(t)
	first := d.Token()
	require.Eventually(t, func() bool { return d.Token().ID != first.ID }, 5*time.Second, 5*time.Millisecond)
	second := d.Token()
	assert.Equal(t, k.Token().ID, second.ID)
	assert.True(t, second.Expiry.After(first.Expiry))
	assert.Equal(t, second.ID, k.Capability().ID)
	el := second.Issued.Sub(first.Issued)
	assert.InDelta(t, float64(300*time.Millisecond), float64(el), float64(100*time.Millisecond), "refreshed at %v", el)
	// Several refreshes in a row keep the session alive past the first expiry.
	time.Sleep(500 * time.Millisecond)
	assert.NoError(t, d.Err())
	assert.NoError(t, k.Err())
	assert.NotEqual(t, second.ID, d.Token().ID)
}

func TestBackoffDelay(t *testing.T) {
	mid := func() float64 { return 0.5 } // no jitter
	lo := func() float64 { return 0 }    // -20 %
	hi := func() float64 { return 1 }    // +20 % (exclusive bound)
	var b Backoff
	assert.Equal(t, time.Second, b.Delay(0, mid))
	assert.Equal(t, 1600*time.Millisecond, b.Delay(1, mid))
	assert.Equal(t, 2560*time.Millisecond, b.Delay(2, mid))
	assert.Equal(t, 800*time.Millisecond, b.Delay(0, lo))
	assert.Equal(t, 1200*time.Millisecond, b.Delay(0, hi))
	assert.Equal(t, 120*time.Second, b.Delay(20, mid), "capped")
	assert.Equal(t, 144*time.Second, b.Delay(1000, hi), "jitter applies after the cap, as in gRPC")
	assert.Equal(t, time.Second, b.Delay(-3, mid))
	c := Backoff{Base: 10 * time.Millisecond, Multiplier: 2, Jitter: -1, Max: 50 * time.Millisecond}
	assert.Equal(t, []time.Duration{10e6, 20e6, 40e6, 50e6}, []time.Duration{c.Delay(0, lo), c.Delay(1, lo), c.Delay(2, hi), c.Delay(3, hi)})
}

// The receive table: only HELLO first, nothing but control traffic later,
// ERROR always.
func TestStateMachineAccepts(t *testing.T) {
	assert.True(t, accepts(true, StateHandshake, frame.TypeHello))
	assert.False(t, accepts(true, StateHandshake, frame.TypeHeartbeat))
	assert.False(t, accepts(true, StateHandshake, frame.TypeTokenRefresh))
	assert.False(t, accepts(true, StateRegions, frame.TypeHello))
	assert.True(t, accepts(true, StateOperation, frame.TypeTokenRefresh))
	assert.True(t, accepts(true, StateDraining, frame.TypeTokenRefresh), "a refresh may cross our GOAWAY")
	assert.False(t, accepts(true, StateOperation, frame.TypeHello))
	assert.False(t, accepts(true, StateOperation, frame.TypeRequest), "data travels on the rings")
	assert.True(t, accepts(false, StateRegions, frame.TypeRegions))
	assert.False(t, accepts(false, StateOperation, frame.TypeRegions))
	assert.False(t, accepts(false, StateOperation, frame.TypeTokenRefresh))
	for st := StateConnect; st <= StateClosed; st++ {
		assert.True(t, accepts(st%2 == 0, st, frame.TypeError))
		assert.NotContains(t, st.String(), "State(")
	}
}

// A version range the kernel does not speak gets ERROR E_VERSION; a missing
// required feature gets E_PROTO naming it. Both sides report why.
func TestHandshakeNegotiationFailures(t *testing.T) {
	ts := startServer(t, "", ServerConfig{SessionConfig: SessionConfig{
		Features: wire.FeatureTokenRefresh | wire.FeatureBulk, RequireFeatures: wire.FeatureBulk}})

	// Feature set: the daemon does not offer BULK.
	_, err := Dial(context.Background(), ts.path, DialConfig{})
	require.ErrorIs(t, err, ErrHandshake)
	assert.ErrorIs(t, err, wire.ErrProto)
	assert.Contains(t, err.Error(), "required features")
	kerr := ts.acceptErr(t)
	assert.ErrorIs(t, kerr, wire.ErrProto)

	// Version: a raw daemon offering [2, 3].
	c := rawDial(t, ts.path)
	writeMsg(t, c, 1, &wire.Hello{MinVersion: 2, MaxVersion: 3, Features: wire.FeatureBulk})
	e := readError(t, c)
	assert.Equal(t, wire.CodeVersion, e.Code)
	assert.Contains(t, e.Message, "[2, 3]")
	assert.ErrorIs(t, ts.acceptErr(t), wire.ErrVersion)

	// And a daemon that requires a feature the kernel lacks refuses WELCOME.
	_, err = Dial(context.Background(), ts.path, DialConfig{SessionConfig: SessionConfig{
		Features: wire.FeatureBulk | wire.FeatureSubscribe, RequireFeatures: wire.FeatureSubscribe}})
	require.ErrorIs(t, err, ErrHandshake)
	assert.Contains(t, err.Error(), "kernel lacks required features")
	// The kernel does not wait for a verdict on WELCOME: its handshake may
	// complete, and then the session ends with the daemon's ERROR.
	select {
	case err = <-ts.errs:
	case k := <-ts.sess:
		<-k.Done()
		err = k.Err()
		k.Close()
	case <-time.After(10 * time.Second):
		t.Fatal("kernel did not see the daemon give up")
	}
	// Its ERROR, or the hang-up if the kernel was still writing.
	assert.True(t, errors.Is(err, wire.ErrProto) || errors.Is(err, ErrPeerGone), "kernel sees the daemon give up: %v", err)
}

func rawDial(t *testing.T, path string) *net.UnixConn {
	t.Helper()
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	return c
}

func encodeMsg(t *testing.T, seq uint64, m wire.Message) []byte {
	t.Helper()
	b, err := wire.AppendFrame(nil, frame.Header{Sequence: seq}, m)
	require.NoError(t, err)
	return b
}

func writeMsg(t *testing.T, c net.Conn, seq uint64, m wire.Message) {
	t.Helper()
	_, err := c.Write(encodeMsg(t, seq, m))
	require.NoError(t, err)
}

// readError reads frames until an ERROR, then expects the kernel to hang up.
func readError(t *testing.T, c net.Conn) *wire.Error {
	t.Helper()
	r := frame.NewReader(c, frame.Config{MaxPayload: frame.HardMaxPayload})
	for {
		f, err := r.ReadFrame()
		require.NoError(t, err, "expected an ERROR frame")
		if f.Type != frame.TypeError {
			continue
		}
		var m wire.ErrorMsg
		require.NoError(t, m.Decode(f.Payload))
		e := m.Err()
		_, err = r.ReadFrame()
		assert.ErrorIs(t, err, io.EOF, "closed after ERROR")
		return e
	}
}

// Garbage, truncated, oversized and malformed control messages from a raw
// client: the kernel answers ERROR where the framing allows, closes, and
// its Accept reports the violation without a panic or a leak.
func TestHandshakeHostileDaemon(t *testing.T) {
	ts := startServer(t, "", ServerConfig{})
	hello := encodeMsg(t, 1, &wire.Hello{MinVersion: 1, MaxVersion: 1})
	badReserved := bytes.Clone(hello)
	badReserved[frame.HeaderSize+4] = 1 // HELLO reserved bytes
	oversized := bytes.Clone(hello)
	oversized[12], oversized[13], oversized[14] = 0, 0, 0x10 // payload_len 1 MiB, never sent
	wrongVersion := bytes.Clone(hello)
	wrongVersion[4] = 2
	helloWith := func(h frame.Header) []byte {
		h.Sequence = 1
		b, err := wire.AppendFrame(nil, h, &wire.Hello{MinVersion: 1, MaxVersion: 1})
		require.NoError(t, err)
		return b
	}

	for _, tc := range []struct {
		name   string
		send   []byte
		code   wire.Code // expected ERROR; 0: just a close
		target error     // what the kernel's Accept reports
	}{
		{"garbage", []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), wire.CodeProto, frame.ErrBadMagic},
		{"framing-version", wrongVersion, wire.CodeVersion, frame.ErrVersion},
		{"oversized", oversized[:frame.HeaderSize], wire.CodeTooLarge, frame.ErrTooLarge},
		{"truncated-header", hello[:20], 0, ErrPeerGone},
		{"truncated-payload", hello[:len(hello)-3], 0, ErrPeerGone},
		{"malformed-hello", badReserved, wire.CodeProto, wire.ErrProto},
		{"heartbeat-first", encodeMsg(t, 1, &wire.Heartbeat{Nonce: 1}), wire.CodeProto, wire.ErrProto},
		{"regions-first", encodeMsg(t, 1, &wire.Regions{Entries: []wire.Region{{Role: 2, Size: 4096}}}), wire.CodeProto, wire.ErrProto},
		{"bad-sequence", encodeMsg(t, 7, &wire.Hello{MinVersion: 1, MaxVersion: 1}), wire.CodeProto, wire.ErrProto},
		// cap_ref and correlation are 0 before TOKEN (§6.1).
		{"hello-cap-ref", helloWith(frame.Header{CapRef: 7}), wire.CodeProto, wire.ErrProto},
		{"hello-correlation", helloWith(frame.Header{Correlation: 3}), wire.CodeProto, wire.ErrProto},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := rawDial(t, ts.path)
			_, err := c.Write(tc.send)
			require.NoError(t, err)
			if tc.code == 0 {
				c.CloseWrite()
			} else {
				e := readError(t, c)
				assert.Equal(t, tc.code, e.Code, "ERROR %v", e)
				assert.NotEmpty(t, e.Message, "every ERROR carries a reason")
			}
			err = ts.acceptErr(t)
			assert.ErrorIs(t, err, ErrHandshake)
			assert.ErrorIs(t, err, tc.target)
		})
	}

	t.Run("fds-with-hello", func(t *testing.T) {
		c := rawDial(t, ts.path)
		f := memfd(t, "x")
		require.NoError(t, SendFDs(c, hello, f))
		e := readError(t, c)
		assert.Equal(t, wire.CodeProto, e.Code)
		assert.ErrorIs(t, ts.acceptErr(t), ErrFDPassing)
	})
	t.Run("silent", func(t *testing.T) {
		ts := startServer(t, "", ServerConfig{SessionConfig: SessionConfig{HandshakeTimeout: 100 * time.Millisecond}})
		rawDial(t, ts.path)
		start := time.Now()
		err := ts.acceptErr(t)
		assert.ErrorIs(t, err, os.ErrDeadlineExceeded)
		assert.ErrorIs(t, err, context.DeadlineExceeded)
		assert.Less(t, time.Since(start), 2*time.Second)
	})
}

// After the handshake the kernel still checks every frame: sequence,
// stream, type for the state, cap_ref, payload, size. The violation ends
// the session on both sides with the code the kernel sent.
func TestOperationHostileFrames(t *testing.T) {
	ts := startServer(t, "", ServerConfig{})
	for _, tc := range []struct {
		name string
		mod  func(h *frame.Header)
		msg  wire.Message
		code wire.Code
		// answered with an ERROR for the request only: the daemon gives
		// up, the kernel just sees it leave
		perRequest bool
	}{
		{"bad-cap-ref", func(h *frame.Header) { h.CapRef = 12345 }, &wire.Heartbeat{}, wire.CodeAuth, false},
		{"zero-cap-ref", func(h *frame.Header) { h.CapRef = 0 }, &wire.Heartbeat{}, wire.CodeAuth, false},
		{"sequence-gap", func(h *frame.Header) { h.Sequence += 5 }, &wire.Heartbeat{}, wire.CodeProto, false},
		{"stream-1", func(h *frame.Header) { h.StreamID = 1 }, &wire.Heartbeat{}, wire.CodeProto, false},
		{"request-on-socket", nil, &wire.Request{Method: []byte("m")}, wire.CodeProto, false},
		{"hello-again", nil, &wire.Hello{MinVersion: 1, MaxVersion: 1}, wire.CodeProto, false},
		{"refresh-wrong-token", func(h *frame.Header) { h.Correlation = 9 }, &wire.TokenRefresh{TokenID: 1}, wire.CodeAuth, true},
		{"refresh-no-correlation", nil, &wire.TokenRefresh{TokenID: 1}, wire.CodeProto, false},
		{"oversized", nil, &wire.Response{Body: make([]byte, controlMaxPayload+1)}, wire.CodeTooLarge, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base := countFDs(t)
			d := dialT(t, ts.path, DialConfig{})
			k := ts.session(t)
			d.corr.Store(9)
			d.wmu.Lock()
			d.wseq++
			h := frame.Header{Sequence: d.wseq, CapRef: d.capRef()}
			if tc.mod != nil {
				tc.mod(&h)
			}
			b, err := wire.AppendFrame(nil, h, tc.msg)
			require.NoError(t, err)
			_, err = d.conn.Write(b)
			d.wmu.Unlock()
			require.NoError(t, err)
			select {
			case <-d.Done():
			case <-time.After(5 * time.Second):
				t.Fatal("daemon session survived")
			}
			<-k.Done()
			if tc.perRequest {
				assert.ErrorIs(t, k.Err(), ErrPeerGone)
			} else {
				assert.Equal(t, tc.code, wire.CodeOf(k.Err()), "kernel: %v", k.Err())
			}
			assert.Equal(t, tc.code, wire.CodeOf(d.Err()), "daemon: %v", d.Err())
			assert.ErrorIs(t, d.Err(), errPeerSent)
			var w wake
			_, w.err = d.Consumer().Next()
			assert.Equal(t, tc.code, wire.CodeOf(w.err), "ring waiter gets the reason")
			d.Close()
			k.Close()
			assert.Equal(t, base, countFDs(t))
		})
	}
}

// A daemon checks the kernel's uid before it sends anything: a kernel of
// the wrong uid never sees a HELLO.
func TestDialChecksServerUID(t *testing.T) {
	ts := startServer(t, "", ServerConfig{})
	_, err := Dial(context.Background(), ts.path, DialConfig{ServerUIDs: []uint32{12345}})
	require.ErrorIs(t, err, ErrHandshake)
	assert.ErrorIs(t, err, ErrPeerRejected)
	assert.Contains(t, err.Error(), "state attest")
	kerr := ts.acceptErr(t)
	assert.ErrorIs(t, kerr, ErrPeerGone, "the kernel got no byte: %v", kerr)
	assert.Contains(t, kerr.Error(), "connection closed in state handshake: EOF")
}

// The zero Config values are the documented defaults; bad values are
// refused up front, before any socket is touched.
func TestSessionConfigDefaultsAndValidation(t *testing.T) {
	c := SessionConfig{}.withDefaults()
	assert.Equal(t, 5*time.Second, c.HandshakeTimeout)
	assert.Equal(t, time.Second, c.HeartbeatInterval)
	assert.Equal(t, 3, c.HeartbeatMisses)
	assert.Equal(t, 5*time.Second, c.DrainTimeout)
	assert.Equal(t, wire.FeatureTokenRefresh, c.Features)
	assert.EqualValues(t, 16<<20, c.MaxRingSize)
	assert.EqualValues(t, frame.DefaultMaxPayload, c.MaxPayload)
	require.NoError(t, c.validate("DialConfig"))

	for _, tc := range []struct {
		bad   SessionConfig
		field string
	}{
		{SessionConfig{TxRingSize: 5000}, "DialConfig.TxRingSize"},
		{SessionConfig{RxRingSize: 1 << 31}, "DialConfig.RxRingSize"},
		{SessionConfig{MaxPayload: frame.HardMaxPayload + 1}, "DialConfig.MaxPayload"},
		{SessionConfig{HeartbeatMisses: 1 << 16}, "DialConfig.HeartbeatMisses"},
		{SessionConfig{HeartbeatInterval: 2 * time.Hour}, "DialConfig.HeartbeatInterval"},
		{SessionConfig{Name: string(make([]byte, wire.MaxNameLen+1))}, "DialConfig.Name"},
		{SessionConfig{Features: wire.FeatureBulk, RequireFeatures: wire.FeatureSubscribe}, "DialConfig.RequireFeatures"},
		{SessionConfig{TxRingSize: 1 << 20, MaxRingSize: 64 << 10}, "DialConfig.TxRingSize"},
		// Negative values used to become the defaults silently.
		{SessionConfig{HeartbeatInterval: -time.Second}, "DialConfig.HeartbeatInterval"},
		{SessionConfig{HeartbeatMisses: -1}, "DialConfig.HeartbeatMisses"},
		{SessionConfig{HandshakeTimeout: -1}, "DialConfig.HandshakeTimeout"},
		{SessionConfig{DrainTimeout: -1}, "DialConfig.DrainTimeout"},
	} {
		_, err := Dial(context.Background(), "/nonexistent", DialConfig{SessionConfig: tc.bad})
		require.Error(t, err, "%+v", tc.bad)
		assert.ErrorIs(t, err, ErrConfig)
		assert.Contains(t, err.Error(), tc.field+" ")
		assert.NotContains(t, err.Error(), "dial", "refused before dialing")
	}
	for _, tc := range []struct {
		cfg   DialConfig
		field string
	}{
		{DialConfig{MaxHeartbeatTimeout: -1}, "DialConfig.MaxHeartbeatTimeout"},
		{DialConfig{Backoff: Backoff{Base: -time.Second}}, "DialConfig.Backoff.Base"},
		{DialConfig{Backoff: Backoff{Max: -time.Second}}, "DialConfig.Backoff.Max"},
	} {
		_, err := Dial(context.Background(), "/nonexistent", tc.cfg)
		assert.ErrorIs(t, err, ErrConfig)
		assert.Contains(t, err.Error(), tc.field+" ")
	}

	l := listenFor(t, sockPath(t), nil)
	_, err := NewServer(nil, ServerConfig{Keys: testKeys(t)})
	assert.ErrorIs(t, err, ErrConfig, "a nil Listener used to be accepted, then Accept panicked")
	assert.Contains(t, err.Error(), "Listener")
	for _, tc := range []struct {
		cfg   ServerConfig
		field string
	}{
		{ServerConfig{}, "ServerConfig.Keys"},
		{ServerConfig{Keys: token.NewKeyring()}, "ServerConfig.Keys"}, // no current key
		// An invalid Scope used to make every handshake fail with E_INTERNAL.
		{ServerConfig{Keys: testKeys(t), Scope: "/a//b"}, "ServerConfig.Scope"},
		{ServerConfig{Keys: testKeys(t), Rights: 1 << 40}, "ServerConfig.Rights"},
		{ServerConfig{Keys: testKeys(t), TokenTTL: -time.Hour}, "ServerConfig.TokenTTL"},
		{ServerConfig{Keys: testKeys(t), SessionConfig: SessionConfig{HeartbeatInterval: -1}}, "ServerConfig.HeartbeatInterval"},
		{ServerConfig{Keys: testKeys(t), SessionConfig: SessionConfig{HeartbeatMisses: -3}}, "ServerConfig.HeartbeatMisses"},
	} {
		_, err := NewServer(l, tc.cfg)
		require.Error(t, err, "%s", tc.field)
		assert.ErrorIs(t, err, ErrConfig)
		assert.Contains(t, err.Error(), tc.field+" ")
	}
	// A default ring size never exceeds an explicit MaxRingSize.
	srv, err := NewServer(l, ServerConfig{Keys: testKeys(t), SessionConfig: SessionConfig{MaxRingSize: 64 << 10}})
	require.NoError(t, err)
	assert.EqualValues(t, 64<<10, srv.cfg.TxRingSize)
	srv, err = NewServer(l, ServerConfig{Keys: testKeys(t)})
	require.NoError(t, err)
	assert.EqualValues(t, DefaultRingSize, srv.cfg.TxRingSize)
	assert.Equal(t, time.Hour, srv.tokenTTL())
}

// Both sides honour their context: a cancelled Dial stops mid-handshake,
// a cancelled Accept stops waiting, and both leave nothing behind.
func TestContextCancellation(t *testing.T) {
	base := countFDs(t)
	path := sockPath(t)
	mute, err := net.Listen("unix", path) // accepts, never answers
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(50*time.Millisecond, cancel)
	start := time.Now()
	_, err = Dial(ctx, path, DialConfig{})
	assert.ErrorIs(t, err, ErrHandshake)
	assert.ErrorIs(t, err, context.Canceled)
	assert.Less(t, time.Since(start), 2*time.Second)
	mute.Close()

	ts := startServer(t, "", ServerConfig{})
	ts.stop() // the background loop exits; Accept directly
	<-ts.done
	ctx, cancel = context.WithCancel(context.Background())
	time.AfterFunc(50*time.Millisecond, cancel)
	_, err = ts.srv.Accept(ctx)
	assert.ErrorIs(t, err, context.Canceled)
	ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	dc := make(chan *Session, 1)
	go func() { d, _ := Dial(ctx, ts.path, DialConfig{}); dc <- d }()
	k, err := ts.srv.Accept(ctx)
	require.NoError(t, err, "the listener is still usable")
	k.Close()
	if d := <-dc; d != nil {
		d.Close()
	}
	ts.Close()
	require.Eventually(t, func() bool { return countFDs(t) == base }, 5*time.Second, 10*time.Millisecond)
}

// A refresh is answered once: a second TOKEN (or ERROR) carrying the
// correlation of a refresh already answered is E_PROTO, not a new token
// (PROTOCOL.md §6.1). Only a hostile kernel sends one.
func TestRefreshAnswerTakenOnce(t *testing.T) {
	ts := startServer(t, "", ServerConfig{TokenTTL: 400 * time.Millisecond})
	d := dialT(t, ts.path, DialConfig{})
	first := d.Token()
	require.Eventually(t, func() bool { return d.Token().ID != first.ID }, 5*time.Second, 5*time.Millisecond)
	answered := d.corr.Load()
	tok := d.Token()
	p, err := (&wire.Token{TokenID: tok.ID, ExpiryUnix: tok.Expiry.UnixNano(), Token: tok.Bytes}).Append(nil)
	require.NoError(t, err)
	f := &frame.Frame{Header: frame.Header{Type: frame.TypeToken, Correlation: answered}, Payload: p}
	err = d.takeRefreshed(f)
	assert.ErrorIs(t, err, wire.ErrProto, "a second answer to refresh %d", answered)
}
