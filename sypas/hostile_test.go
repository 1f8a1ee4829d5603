package sypas

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/control"
	"github.com/sypas/go/control/token"
	"github.com/sypas/go/frame"
	"github.com/sypas/go/internal/testlog"
	"github.com/sypas/go/ring"
	"github.com/sypas/go/wire"
)

// auditLog is a slog.Handler that keeps every record, flattened to key →
// value strings.
// auditLog keeps the records of the kernel's Logger.
type auditLog struct{ *testlog.Recorder }

func newAuditLog() (*auditLog, *slog.Logger) {
	r, l := testlog.New()
	return &auditLog{r}, l
}

func (a *auditLog) find(want map[string]string) map[string]string { return a.Find(want) }

// expect waits for a record holding want (the kernel may record a refusal
// just after the daemon learns of it).
func (a *auditLog) expect(t *testing.T, want map[string]string) map[string]string {
	t.Helper()
	var r map[string]string
	if !assert.Eventually(t, func() bool { r = a.find(want); return r != nil }, 10*time.Second, time.Millisecond, "no audit record with %v", want) {
		for _, r := range a.Records() {
			t.Logf("audit record: %v", r)
		}
	}
	return r
}

// rawDaemon is a daemon that writes frames into its ring by hand: it can
// break every rule the Client keeps. With conn set, its session is inline
// (§8.6) and it writes the frames' bytes on the socket itself.
type rawDaemon struct {
	t    *testing.T
	s    *control.Session
	seq  uint64 // sequence of the last frame written
	rseq uint64 // sequence of the last frame read
	conn net.Conn
}

// dialRawInline is dialRaw for a session inline on the Unix socket: the
// raw daemon's frames go on the socket it dialed, numbered after its HELLO
// in the socket's one sequence, and it reads the kernel's data frames from
// the session's queue. The kernel must send heartbeats rarely
// (rawInlineKernel): the session's pongs would take sequence numbers too.
func dialRawInline(t *testing.T, path string, cfg control.DialConfig) *rawDaemon {
	t.Helper()
	return rawDial(t, path, cfg, true)
}

// rawInlineKernel is hostileKernel with heartbeats a raw inline daemon's
// session does not answer while a test runs.
func rawInlineKernel(t *testing.T) (*kernel, *auditLog) {
	cfg := ServerConfig{}
	cfg.HeartbeatInterval = 15 * time.Second
	return hostileKernel(t, cfg)
}

func dialRaw(t *testing.T, path string, cfg control.DialConfig) *rawDaemon {
	t.Helper()
	return rawDial(t, path, cfg, false)
}

func rawDial(t *testing.T, path string, cfg control.DialConfig, inline bool) *rawDaemon {
	t.Helper()
	if isTCP(path) {
		t.Skip("the raw daemon dials a Unix socket")
	}
	if cfg.Logger == nil {
		cfg.Logger = quiet
	}
	if cfg.Features == 0 {
		cfg.Features = control.DefaultFeatures | wire.FeatureSubscribe
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if !inline {
		s, err := control.Dial(ctx, path, cfg)
		require.NoError(t, err)
		t.Cleanup(func() { s.Close() })
		return &rawDaemon{t: t, s: s}
	}
	cfg.NoSharedMemory = true
	c, err := net.Dial("unix", path)
	require.NoError(t, err)
	// The raw frames go through a descriptor of our own on the same
	// socket: the session owns c, and takes its socket out of the
	// runtime's poller after the handshake (closing c).
	f, err := c.(*net.UnixConn).File()
	require.NoError(t, err)
	raw, err := net.FileConn(f)
	f.Close()
	require.NoError(t, err)
	t.Cleanup(func() { raw.Close() })
	s, err := control.DialConn(ctx, c, cfg)
	require.NoError(t, err)
	require.NotNil(t, s.Inline())
	t.Cleanup(func() { s.Close() })
	return &rawDaemon{t: t, s: s, conn: raw, seq: 1} // HELLO was 1
}

// frame writes one frame with payload p. Unless h sets them, the stream is
// 1, the sequence the next one and cap_ref the session's token.
func (d *rawDaemon) frame(h frame.Header, p []byte) {
	d.t.Helper()
	if h.Sequence == 0 {
		h.Sequence = d.seq + 1
	}
	if h.CapRef == 0 {
		h.CapRef = d.s.CapRef()
	}
	if h.StreamID == 0 {
		h.StreamID = 1
	}
	h.HeaderLen, h.PayloadLen = frame.HeaderSize, uint32(len(p))
	rec := make([]byte, frame.HeaderSize+len(p))
	require.NoError(d.t, h.Put(rec))
	copy(rec[frame.HeaderSize:], p)
	d.record(rec)
	d.seq = h.Sequence
}

// record writes rec as one ring record, frame or not; inline, as bytes on
// the socket.
func (d *rawDaemon) record(rec []byte) {
	d.t.Helper()
	if d.conn != nil {
		_, err := d.conn.Write(rec)
		require.NoError(d.t, err)
		return
	}
	_, err := d.s.Producer().Write(rec)
	if errors.Is(err, ring.ErrPeerClosed) {
		return // published: the kernel read it and closed before Write looked
	}
	require.NoError(d.t, err)
}

// request writes a REQUEST for op; h gives its correlation (and may break
// its other fields).
func (d *rawDaemon) request(h frame.Header, op string, body []byte) {
	d.t.Helper()
	h.Type = frame.TypeRequest
	p, err := (&wire.Request{Method: []byte(op), Body: body}).Append(nil)
	require.NoError(d.t, err)
	d.frame(h, p)
}

// next reads the kernel's next frame, a private copy.
func (d *rawDaemon) next(timeout time.Duration) (frame.Frame, error) {
	if in := d.s.Inline(); in != nil {
		// One sequence for the socket: the control frames the session
		// read took numbers too, so only the order is checked.
		f, err := in.Next(time.Now().Add(timeout))
		if err != nil {
			return f, err
		}
		defer in.Release()
		f.Payload = append([]byte(nil), f.Payload...)
		f.Extension = append([]byte(nil), f.Extension...)
		if f.Sequence <= d.rseq {
			d.t.Errorf("the kernel's %v has sequence %d, after %d", f.Type, f.Sequence, d.rseq)
		}
		d.rseq = f.Sequence
		return f, nil
	}
	c := d.s.Consumer()
	c.SetWaitDeadline(time.Now().Add(timeout))
	v, err := c.Next()
	if err != nil {
		return frame.Frame{}, err
	}
	defer c.Release()
	var f frame.Frame
	if _, err := f.Decode(v, frame.Config{MaxPayload: frame.HardMaxPayload}); err != nil {
		return f, err
	}
	f.Payload = append([]byte(nil), f.Payload...)
	f.Extension = append([]byte(nil), f.Extension...)
	if f.Sequence != d.rseq+1 {
		d.t.Errorf("the kernel's %v has sequence %d, want %d", f.Type, f.Sequence, d.rseq+1)
	}
	d.rseq = f.Sequence
	return f, nil
}

// expectError reads the kernel's next frame, which must be ERROR code for
// corr.
func (d *rawDaemon) expectError(corr uint64, code Code) wire.ErrorMsg {
	d.t.Helper()
	f, err := d.next(10 * time.Second)
	require.NoError(d.t, err)
	require.Equal(d.t, frame.TypeError, f.Type, "want ERROR %v for %d, got %v (correlation %d, %q)", code, corr, f.Type, f.Correlation, f.Payload)
	var m wire.ErrorMsg
	require.NoError(d.t, m.Decode(f.Payload))
	assert.Equal(d.t, corr, f.Correlation)
	assert.Equal(d.t, code, m.Code, "%s", m.Message)
	assert.NotEmpty(d.t, m.Message, "a refusal says why")
	return m
}

// expectResponse reads the kernel's next frame, which must be the final
// RESPONSE for corr.
func (d *rawDaemon) expectResponse(corr uint64) []byte {
	d.t.Helper()
	f, err := d.next(10 * time.Second)
	require.NoError(d.t, err)
	require.Equal(d.t, frame.TypeResponse, f.Type, "want RESPONSE for %d, got %v (correlation %d, %q)", corr, f.Type, f.Correlation, f.Payload)
	assert.Equal(d.t, corr, f.Correlation)
	assert.True(d.t, f.Flags.Has(frame.FlagEndStream))
	return f.Payload
}

// expectEnded waits for the kernel to end the session and returns why, as
// the daemon learned it.
func (d *rawDaemon) expectEnded() error {
	d.t.Helper()
	select {
	case <-d.s.Done():
	case <-time.After(10 * time.Second):
		d.t.Fatal("the kernel did not end the session")
	}
	return d.s.Err()
}

// hostileKernel serves echo, an admin-only op and a call that hangs, with
// max_in_flight 2, and records its audit trail.
func hostileKernel(t *testing.T, cfg ServerConfig) (*kernel, *auditLog) {
	log, l := newAuditLog()
	cfg.Logger = l
	cfg.MaxInFlight = 2
	k := startKernel(t, cfg, func(s *Server) {
		s.Handle("echo", RightRequest, echo, Inline)
		s.Handle("admin", RightAdmin, echo, Inline)
		s.Handle("hang", RightRequest, func(ctx context.Context, _ *Request) ([]byte, error) {
			<-ctx.Done()
			return nil, ctx.Err()
		})
	})
	return k, log
}

// stillServes checks that a well-behaved daemon is served.
func stillServes(t *testing.T, c *Client) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	got, err := c.Call(ctx, "echo", []byte("still here"))
	require.NoError(t, err)
	assert.Equal(t, "still here", string(got))
}

func refused(event string, code Code, corr uint64) map[string]string {
	m := map[string]string{"msg": "sypas: refused", control.LogKeyEvent: event, control.LogKeyCode: code.String()}
	if corr != 0 {
		m[control.LogKeyCorrelation] = strconv.FormatUint(corr, 10)
	}
	return m
}

// A hostile daemon's requests that break a rule but can be answered are
// refused one by one, each with its code and the request's correlation,
// and audited; its session and everybody else's go on.
//
// The same on a session inline on the Unix socket (§8.6), where the
// enforcer sees the frames the kernel read from the socket: the same codes,
// correlations and audit records.
func TestHostileRequestsRefused(t *testing.T) {
	t.Run("rings", func(t *testing.T) {
		k, log := hostileKernel(t, ServerConfig{})
		hostileRequests(t, k, log, dialRaw(t, k.path, control.DialConfig{}))
	})
	t.Run("inline", func(t *testing.T) {
		k, log := rawInlineKernel(t)
		hostileRequests(t, k, log, dialRawInline(t, k.path, control.DialConfig{}))
	})
}

func hostileRequests(t *testing.T, k *kernel, log *auditLog, d *rawDaemon) {
	good := dialT(t, k.path, ClientConfig{})

	d.request(frame.Header{Correlation: 11}, "nope", nil)
	d.expectError(11, CodeNotFound)
	log.expect(t, refused(control.EventProtocol, CodeNotFound, 11))

	d.request(frame.Header{Correlation: 12, CapRef: d.s.CapRef() ^ 0x5a5a}, "echo", []byte("x"))
	d.expectError(12, CodeAuth)
	log.expect(t, refused(control.EventAuth, CodeAuth, 12))

	d.request(frame.Header{Correlation: 13}, "admin", []byte("x"))
	d.expectError(13, CodePermission)
	r := log.expect(t, refused(control.EventPermission, CodePermission, 13))
	assert.Equal(t, "admin", r[control.LogKeyOp])

	if d.conn == nil {
		// Above max_payload, yet a ring record holds it: read whole,
		// refused. (Inline, such a frame ends the session: §8.6, and
		// TestHostileFramesEndSession.)
		d.request(frame.Header{Correlation: 14}, "echo", make([]byte, frame.DefaultMaxPayload))
		d.expectError(14, CodeTooLarge)
		log.expect(t, refused(control.EventProtocol, CodeTooLarge, 14))
	}

	// A refused one-way request is audited, never answered: the next
	// frame the daemon reads answers the request after it.
	denied := k.srv.Stats().Denied
	d.request(frame.Header{}, "admin", []byte("one-way"))
	d.request(frame.Header{Correlation: 15}, "echo", []byte("after"))
	assert.Equal(t, "after", string(d.expectResponse(15)))
	assert.Equal(t, denied+1, k.srv.Stats().Denied)
	log.expect(t, map[string]string{control.LogKeyEvent: control.EventPermission, control.LogKeyCorrelation: "0", control.LogKeyOp: "admin"})

	// max_in_flight is 2: a third request while two hang is E_RESOURCE,
	// with a hint of when to retry.
	d.request(frame.Header{Correlation: 16}, "hang", nil)
	d.request(frame.Header{Correlation: 17}, "hang", nil)
	d.request(frame.Header{Correlation: 18}, "echo", []byte("x"))
	m := d.expectError(18, CodeResource)
	assert.NotZero(t, m.RetryAfterMs)
	log.expect(t, refused(control.EventLimit, CodeResource, 18))

	assert.Nil(t, d.s.Err(), "the session goes on")
	stillServes(t, good)
	assert.GreaterOrEqual(t, k.srv.Stats().Denied, uint64(5))
}

// Frames that break the protocol end the daemon's session: the daemon
// learns why from an ERROR (never a bare hang-up), the kernel audits it,
// and other daemons are served on.
//
// Inline on the Unix socket (§8.6), the same frames end the session the
// same way, and so does a frame announcing more than max_payload (a
// stream cannot skip it: E_TOO_LARGE).
func TestHostileFramesEndSession(t *testing.T) {
	t.Run("rings", func(t *testing.T) {
		k, log := hostileKernel(t, ServerConfig{})
		hostileFrames(t, k, log, false)
	})
	t.Run("inline", func(t *testing.T) {
		k, log := rawInlineKernel(t)
		hostileFrames(t, k, log, true)
	})
}

func hostileFrames(t *testing.T, k *kernel, log *auditLog, inline bool) {
	good := dialT(t, k.path, ClientConfig{})
	hb, err := (&wire.Heartbeat{Nonce: 1}).Append(nil)
	require.NoError(t, err)
	req, err := (&wire.Request{Method: []byte("echo")}).Append(nil)
	require.NoError(t, err)
	for name, tc := range map[string]struct {
		send   func(d *rawDaemon)
		reason string // in the ERROR's message
	}{
		"garbage": {func(d *rawDaemon) { d.record([]byte("this is not a frame, just some bytes in a record....")) }, "frame"},
		"truncated": {func(d *rawDaemon) {
			rec := make([]byte, frame.HeaderSize+8)
			h := frame.Header{Type: frame.TypeRequest, StreamID: 1, Sequence: d.seq + 1, CapRef: d.s.CapRef(), Correlation: 1, PayloadLen: 100}
			require.NoError(t, h.Put(rec))
			d.record(rec)
		}, "not a frame"},
		"sequence-skipped": {func(d *rawDaemon) { d.request(frame.Header{Correlation: 1, Sequence: d.seq + 2}, "echo", nil) }, "sequence"},
		"sequence-repeated": {func(d *rawDaemon) {
			d.request(frame.Header{Correlation: 1}, "echo", nil)
			d.expectResponse(1)
			d.request(frame.Header{Correlation: 2, Sequence: d.seq}, "echo", nil)
		}, "sequence"},
		"heartbeat-on-ring": {func(d *rawDaemon) { d.frame(frame.Header{Type: frame.TypeHeartbeat}, hb) }, "HEARTBEAT"},
		"response-on-ring": {func(d *rawDaemon) {
			d.frame(frame.Header{Type: frame.TypeResponse, Correlation: 1, Flags: frame.FlagEndStream}, nil)
		}, "RESPONSE"},
		"goaway-on-ring": {func(d *rawDaemon) { d.frame(frame.Header{Type: frame.TypeGoAway}, make([]byte, 16)) }, "GOAWAY"},
		"bad-request":    {func(d *rawDaemon) { d.frame(frame.Header{Type: frame.TypeRequest, Correlation: 1}, req[:3]) }, "REQUEST"},
		"subscribe-uncorrelated": {func(d *rawDaemon) {
			p, err := (&wire.Subscribe{SubscriptionID: 1, Topic: []byte("t")}).Append(nil)
			require.NoError(t, err)
			d.frame(frame.Header{Type: frame.TypeSubscribe}, p)
		}, "correlation"},
	} {
		t.Run(name, func(t *testing.T) {
			if inline && name == "truncated" {
				t.Skip("a stream has no records: a frame cut short waits for the rest of its bytes")
			}
			var d *rawDaemon
			if inline {
				d = dialRawInline(t, k.path, control.DialConfig{})
			} else {
				d = dialRaw(t, k.path, control.DialConfig{})
			}
			tc.send(d)
			err := d.expectEnded()
			require.ErrorIs(t, err, ErrProto, "the daemon learns why: %v", err)
			assert.ErrorContains(t, err, tc.reason)
			log.expect(t, map[string]string{control.LogKeyEvent: control.EventProtocol, control.LogKeyCode: CodeProto.String(),
				control.LogKeySessionID: "0x" + strconv.FormatUint(d.s.Params().SessionID, 16)})
			stillServes(t, good)
		})
	}
	if !inline {
		return // on a ring it is refused with its correlation: TestHostileRequestsRefused
	}
	t.Run("over-max-payload", func(t *testing.T) {
		d := dialRawInline(t, k.path, control.DialConfig{})
		d.request(frame.Header{Correlation: 1}, "echo", make([]byte, frame.DefaultMaxPayload))
		err := d.expectEnded()
		require.ErrorIs(t, err, ErrTooLarge, "the daemon learns why: %v", err)
		log.expect(t, map[string]string{control.LogKeyCode: CodeTooLarge.String(),
			control.LogKeySessionID: "0x" + strconv.FormatUint(d.s.Params().SessionID, 16)})
		stillServes(t, good)
	})
}

// cap_ref must name the session's current token or the one its last
// refresh replaced: a token two refreshes old has expired for the
// session, and is refused E_AUTH with the request's correlation.
func TestHostileStaleToken(t *testing.T) {
	cfg := ServerConfig{}
	cfg.TokenTTL = 300 * time.Millisecond
	k, log := hostileKernel(t, cfg)
	d := dialRaw(t, k.path, control.DialConfig{})
	first := d.s.CapRef()
	require.Eventually(t, func() bool { return d.s.CapRef() != first }, 10*time.Second, time.Millisecond)
	second := d.s.CapRef()
	d.request(frame.Header{Correlation: 1, CapRef: first}, "echo", []byte("x"))
	d.expectResponse(1) // the previous token is still good
	require.Eventually(t, func() bool { return d.s.CapRef() != second }, 10*time.Second, time.Millisecond)
	d.request(frame.Header{Correlation: 2, CapRef: first}, "echo", []byte("x"))
	d.expectError(2, CodeAuth)
	log.expect(t, refused(control.EventAuth, CodeAuth, 2))
	d.request(frame.Header{Correlation: 3}, "echo", []byte("x"))
	d.expectResponse(3)
}

// A session whose token expires (no TOKEN_REFRESH) or is revoked ends with
// E_AUTH, which the daemon learns, and the kernel audits.
func TestHostileExpiredAndRevokedToken(t *testing.T) {
	t.Run("expired", func(t *testing.T) {
		cfg := ServerConfig{}
		cfg.TokenTTL = 200 * time.Millisecond
		// The kernel's clock runs ahead: its end of the session sees the
		// token expire first (else the daemon's may, and end it itself).
		cfg.Clock = func() time.Time { return time.Now().Add(time.Second) }
		k, log := hostileKernel(t, cfg)
		d := dialRaw(t, k.path, control.DialConfig{SessionConfig: control.SessionConfig{Features: wire.FeatureSubscribe}})
		err := d.expectEnded()
		assert.ErrorIs(t, err, ErrAuth)
		assert.ErrorContains(t, err, "expired")
		log.expect(t, map[string]string{control.LogKeyEvent: control.EventAuth, control.LogKeyCode: CodeAuth.String()})
	})
	t.Run("revoked", func(t *testing.T) {
		rev := token.NewRevocations()
		cfg := ServerConfig{}
		cfg.Revoked = rev
		k, log := hostileKernel(t, cfg)
		good := dialT(t, k.path, ClientConfig{})
		d := dialRaw(t, k.path, control.DialConfig{})
		d.request(frame.Header{Correlation: 1, CapRef: d.s.CapRef()}, "hang", nil)
		id := d.s.CapRef()
		rev.Revoke(id, time.Now().Add(time.Hour))
		err := d.expectEnded()
		assert.ErrorIs(t, err, ErrAuth)
		assert.ErrorContains(t, err, "revoked")
		log.expect(t, map[string]string{control.LogKeyEvent: control.EventRevocation, control.LogKeyTokenID: "0x" + strconv.FormatUint(id, 16)})
		stillServes(t, good)
	})
}

// A daemon's subscriptions are bounded (ServerConfig.MaxSubscriptions): one
// more is refused E_RESOURCE and audited, as is a subscription id already
// in use (E_PROTO); unsubscribing makes room. Memory stays bounded however
// many SUBSCRIBE frames a daemon sends.
func TestHostileSubscriptionsBounded(t *testing.T) {
	log, l := newAuditLog()
	cfg := ServerConfig{MaxSubscriptions: 4}
	cfg.Logger = l
	k := startKernel(t, cfg, nil)
	d := dialRaw(t, k.path, control.DialConfig{})
	sub := func(corr, id uint64) {
		p, err := (&wire.Subscribe{SubscriptionID: id, Topic: []byte("t" + strconv.FormatUint(id%3, 10))}).Append(nil)
		require.NoError(t, err)
		d.frame(frame.Header{Type: frame.TypeSubscribe, Correlation: corr}, p)
	}
	unsub := func(corr, id uint64) {
		p, err := (&wire.Unsubscribe{SubscriptionID: id}).Append(nil)
		require.NoError(t, err)
		d.frame(frame.Header{Type: frame.TypeUnsubscribe, Correlation: corr}, p)
	}
	for id := uint64(1); id <= 4; id++ {
		sub(id, id)
		d.expectResponse(id)
	}
	sub(5, 5)
	d.expectError(5, CodeResource)
	log.expect(t, refused(control.EventLimit, CodeResource, 5))
	sub(6, 1)
	d.expectError(6, CodeProto)
	log.expect(t, refused(control.EventProtocol, CodeProto, 6))
	unsub(7, 99)
	d.expectError(7, CodeNotFound)
	unsub(8, 1)
	d.expectResponse(8)
	sub(9, 5)
	d.expectResponse(9)
	for i := range 3 {
		require.NoError(t, k.srv.Publish(context.Background(), "t"+strconv.Itoa(i), []byte("e")))
	}
	assert.Equal(t, uint64(4), k.srv.Stats().Published, "ids 2, 3, 4, 5 on topics t2, t0, t1, t2")

	_, err := NewServer(ServerConfig{ServerConfig: control.ServerConfig{Keys: testKeys(t)}, MaxSubscriptions: -1})
	assert.ErrorIs(t, err, control.ErrConfig)
}

// A SUBSCRIBE asking for LAST_VALUE, which this kernel does not keep, is
// refused (E_PROTO, audited) rather than accepted with the option ignored.
func TestSubscribeLastValueRefused(t *testing.T) {
	k, log := hostileKernel(t, ServerConfig{})
	d := dialRaw(t, k.path, control.DialConfig{})
	p, err := (&wire.Subscribe{SubscriptionID: 1, Options: wire.SubLastValue, Topic: []byte("news")}).Append(nil)
	require.NoError(t, err)
	d.frame(frame.Header{Type: frame.TypeSubscribe, Correlation: 21}, p)
	m := d.expectError(21, CodeProto)
	assert.Contains(t, string(m.Message), "LAST_VALUE")
	log.expect(t, refused(control.EventProtocol, CodeProto, 21))
	assert.Nil(t, d.s.Err(), "the session goes on")
}

// Every refusal's record says decision deny; grants are written at the
// level ServerConfig.AuditGrants chooses, when the Logger enables it.
func TestAuditDecisions(t *testing.T) {
	k, log := hostileKernel(t, ServerConfig{AuditGrants: slog.LevelInfo})
	d := dialRaw(t, k.path, control.DialConfig{})
	d.request(frame.Header{Correlation: 31}, "echo", []byte("x"))
	d.expectResponse(31)
	r := log.expect(t, map[string]string{control.LogKeyEvent: control.EventGrant, control.LogKeyCorrelation: "31"})
	assert.Equal(t, control.DecisionGrant, r[control.LogKeyDecision])
	assert.Equal(t, "echo", r[control.LogKeyOp])
	d.request(frame.Header{Correlation: 32}, "admin", nil)
	d.expectError(32, CodePermission)
	r = log.expect(t, refused(control.EventPermission, CodePermission, 32))
	assert.Equal(t, control.DecisionDeny, r[control.LogKeyDecision])
}

// A daemon's GOAWAY after requests the kernel has not read yet: the kernel
// reads every one of them before its own GOAWAY (docs/PROTOCOL.md §6.8,
// step 2). The requests name no operation, so none is ever in flight:
// only reading the ring tells that they are there. A slow audit log keeps
// the reader behind the daemon.
func TestDrainReadsTheRing(t *testing.T) {
	log := &slowLog{}
	cfg := ServerConfig{}
	cfg.Logger = slog.New(log)
	k := startKernel(t, cfg, nil)
	d := dialRaw(t, k.path, control.DialConfig{})
	const n = 40
	for range n {
		d.request(frame.Header{}, "no.such.op", nil) // one-way: refused, audited, never answered
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	require.NoError(t, d.s.Drain(ctx), "the kernel answered GOAWAY")
	assert.EqualValues(t, n, log.refused.Load(), "every request sent before GOAWAY was read (and refused)")
}

// slowLog counts the kernel's refusals, taking a millisecond over each
// record.
type slowLog struct{ refused atomic.Int32 }

func (l *slowLog) Enabled(context.Context, slog.Level) bool { return true }
func (l *slowLog) WithAttrs([]slog.Attr) slog.Handler       { return l }
func (l *slowLog) WithGroup(string) slog.Handler            { return l }

func (l *slowLog) Handle(_ context.Context, r slog.Record) error {
	time.Sleep(time.Millisecond)
	if r.Message == "sypas: refused" {
		l.refused.Add(1)
	}
	return nil
}
