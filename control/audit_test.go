package control

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"log/slog"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/frame"
	"github.com/sypas/go/wire"
)

// auditSink is a slog.Handler that keeps every record, flattened to
// key → value strings, and renders each through the text and JSON handlers
// so a test can search what a real log would hold.
type auditSink struct {
	mu       sync.Mutex
	recs     []map[string]string
	rendered bytes.Buffer
}

func newAuditSink() (*auditSink, *slog.Logger) {
	h := &auditSink{}
	return h, slog.New(h)
}

func (h *auditSink) Enabled(context.Context, slog.Level) bool { return true }
func (h *auditSink) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h *auditSink) WithGroup(string) slog.Handler            { return h }

func (h *auditSink) Handle(ctx context.Context, r slog.Record) error {
	m := map[string]string{"msg": r.Message, "level": r.Level.String()}
	r.Attrs(func(a slog.Attr) bool {
		_, dup := m[a.Key]
		m[a.Key] = a.Value.String()
		if dup {
			m["duplicate key "+a.Key] = "yes"
		}
		return true
	})
	h.mu.Lock()
	defer h.mu.Unlock()
	h.recs = append(h.recs, m)
	slog.NewTextHandler(&h.rendered, nil).Handle(ctx, r)
	slog.NewJSONHandler(&h.rendered, nil).Handle(ctx, r)
	return nil
}

// records returns the audit records: those with an event (Serve also logs
// failed handshakes at Debug level, with no event).
func (h *auditSink) records() []map[string]string {
	h.mu.Lock()
	defer h.mu.Unlock()
	var recs []map[string]string
	for _, r := range h.recs {
		if r[LogKeyEvent] != "" {
			recs = append(recs, r)
		}
	}
	return recs
}

// one waits for the first record and checks it is the only one, with the
// event, a reason, the refusal message and no duplicated key.
func (h *auditSink) one(t *testing.T, event string) map[string]string {
	t.Helper()
	require.Eventually(t, func() bool { return len(h.records()) > 0 }, 10*time.Second, time.Millisecond, "no audit record")
	time.Sleep(20 * time.Millisecond) // a second record would be a bug; give it a chance to show
	recs := h.records()
	require.Len(t, recs, 1, "one record per refusal: %v", recs)
	r := recs[0]
	assert.Equal(t, event, r[LogKeyEvent], "%v", r)
	assert.NotEmpty(t, r[LogKeyReason])
	assert.Equal(t, refusedMsg, r["msg"])
	assert.Equal(t, "WARN", r["level"])
	for k := range r {
		assert.NotContains(t, k, "duplicate key")
	}
	return r
}

// noSecret checks that nothing rendered holds the token tok, its
// signature or the signing key of testKeys, in any common encoding.
func (h *auditSink) noSecret(t *testing.T, tok []byte) {
	t.Helper()
	require.NotEmpty(t, tok)
	h.mu.Lock()
	out := h.rendered.String()
	h.mu.Unlock()
	require.NotEmpty(t, out)
	for _, secret := range [][]byte{tok, tok[len(tok)-32:], bytes.Repeat([]byte{7}, 32)} {
		for _, needle := range []string{string(secret), hex.EncodeToString(secret),
			base64.StdEncoding.EncodeToString(secret), base64.RawURLEncoding.EncodeToString(secret)} {
			assert.NotContains(t, out, needle, "token or key bytes in the audit log")
		}
	}
}

// assertSelf checks that r names this process as the peer.
func assertSelf(t *testing.T, r map[string]string) {
	t.Helper()
	assert.Equal(t, strconv.Itoa(os.Geteuid()), r[LogKeyPeerUID])
	assert.Equal(t, strconv.Itoa(os.Getegid()), r[LogKeyPeerGID])
	assert.Equal(t, strconv.Itoa(os.Getpid()), r[LogKeyPeerPID])
}

// Every refusal writes exactly one record, with the stable keys, on the
// side that refuses (the other side, told by ERROR or a hang-up, writes
// none), and no record holds token bytes. Before, refusals wrote nothing.
func TestAuditKernelRefusals(t *testing.T) {
	t.Run("attestation", func(t *testing.T) {
		sink, log := newAuditSink()
		dsink, dlog := newAuditSink()
		l, err := Listen(sockPath(t), Config{Policy: &Policy{UIDs: []uint32{12345}}})
		require.NoError(t, err)
		defer l.Close()
		srv, err := NewServer(l, ServerConfig{Keys: testKeys(t), SessionConfig: SessionConfig{Logger: log}})
		require.NoError(t, err)
		go Dial(context.Background(), l.Path(), DialConfig{SessionConfig: SessionConfig{Logger: dlog}})
		_, err = srv.Accept(context.Background())
		require.ErrorIs(t, err, ErrPeerRejected)
		r := sink.one(t, EventAttestation)
		assert.Contains(t, r[LogKeyReason], "uid")
		assertSelf(t, r)
		assert.Empty(t, dsink.records(), "the daemon was refused, it refused nothing")

		// A bare Listener logs to its own Logger.
		lsink, llog := newAuditSink()
		l2, err := Listen(sockPath(t), Config{Policy: &Policy{UIDs: []uint32{12345}}, Logger: llog})
		require.NoError(t, err)
		defer l2.Close()
		go func() {
			if c, err := Dial(context.Background(), l2.Path(), DialConfig{}); err == nil {
				c.Close()
			}
		}()
		_, err = l2.Accept()
		require.ErrorIs(t, err, ErrPeerRejected)
		assertSelf(t, lsink.one(t, EventAttestation))
	})

	t.Run("protocol", func(t *testing.T) {
		sink, log := newAuditSink()
		ts := startServer(t, "", ServerConfig{SessionConfig: SessionConfig{Logger: log}})
		c := rawDial(t, ts.path)
		_, err := c.Write([]byte("GET / HTTP/1.1\r\n\r\n" + string(make([]byte, 64))))
		require.NoError(t, err)
		readError(t, c)
		ts.acceptErr(t)
		r := sink.one(t, EventProtocol)
		assert.Equal(t, "E_PROTO", r[LogKeyCode])
		assertSelf(t, r)
		assert.NotEmpty(t, r[LogKeyExe])
		assert.Empty(t, r[LogKeySessionID], "no session id before WELCOME")
	})

	t.Run("fd passing", func(t *testing.T) {
		sink, log := newAuditSink()
		ts := startServer(t, "", ServerConfig{SessionConfig: SessionConfig{Logger: log}})
		c := rawDial(t, ts.path)
		require.NoError(t, SendFDs(c, encodeMsg(t, 1, &wire.Hello{MinVersion: 1, MaxVersion: 1}), memfd(t, "x")))
		readError(t, c)
		ts.acceptErr(t)
		assertSelf(t, sink.one(t, EventFDPassing))
	})

	t.Run("timeout", func(t *testing.T) {
		sink, log := newAuditSink()
		ts := startServer(t, "", ServerConfig{SessionConfig: SessionConfig{Logger: log, HandshakeTimeout: 100 * time.Millisecond}})
		rawDial(t, ts.path)
		ts.acceptErr(t)
		assertSelf(t, sink.one(t, EventTimeout))
	})

	t.Run("auth bad cap_ref", func(t *testing.T) {
		sink, log := newAuditSink()
		dsink, dlog := newAuditSink()
		ts := startServer(t, "", ServerConfig{SessionConfig: SessionConfig{Logger: log}})
		d := dialT(t, ts.path, DialConfig{SessionConfig: SessionConfig{Logger: dlog}})
		k := ts.session(t)
		d.wmu.Lock()
		d.wseq++
		b, err := wire.AppendFrame(nil, frame.Header{Sequence: d.wseq, CapRef: 12345}, &wire.Heartbeat{})
		require.NoError(t, err)
		_, err = d.conn.Write(b)
		d.wmu.Unlock()
		require.NoError(t, err)
		waitDone(t, k, "kernel")
		waitDone(t, d, "daemon")
		r := sink.one(t, EventAuth)
		assert.Equal(t, "E_AUTH", r[LogKeyCode])
		assert.Equal(t, hexID(k.Token().ID), r[LogKeyTokenID])
		assert.Equal(t, hexID(k.Params().SessionID), r[LogKeySessionID])
		assertSelf(t, r)
		sink.noSecret(t, k.Token().Bytes)
		assert.Empty(t, dsink.records())
	})

	t.Run("auth refresh of another token", func(t *testing.T) {
		sink, log := newAuditSink()
		ts := startServer(t, "", ServerConfig{SessionConfig: SessionConfig{Logger: log}})
		d := dialT(t, ts.path, DialConfig{})
		k := ts.session(t)
		sendRaw(t, d, &wire.TokenRefresh{TokenID: 0xdead}, d.corr.Add(1))
		r := sink.one(t, EventAuth)
		assert.Contains(t, r[LogKeyReason], "0xdead")
		assert.Equal(t, hexID(k.Token().ID), r[LogKeyTokenID])
		sink.noSecret(t, k.Token().Bytes)
	})
}

// The daemon records what it refuses from a kernel: its uid, a bad WELCOME,
// bad REGIONS or memfds, a bad TOKEN.
func TestAuditDaemonRefusals(t *testing.T) {
	t.Run("kernel uid", func(t *testing.T) {
		sink, log := newAuditSink()
		ksink, klog := newAuditSink()
		ts := startServer(t, "", ServerConfig{SessionConfig: SessionConfig{Logger: klog}})
		_, err := Dial(context.Background(), ts.path, DialConfig{ServerUIDs: []uint32{12345}, SessionConfig: SessionConfig{Logger: log}})
		require.ErrorIs(t, err, ErrPeerRejected)
		r := sink.one(t, EventAttestation)
		assert.Contains(t, r[LogKeyReason], "server uid")
		ts.acceptErr(t)
		assert.Empty(t, ksink.records(), "a daemon that hangs up is no refusal of the kernel's")
	})
	for _, tc := range []struct {
		name  string
		opts  fakeOpts
		event string
	}{
		{"welcome", fakeOpts{interval: maxHeartbeatMs, misses: 3}, EventProtocol},
		{"unsealed memfd", fakeOpts{fds: "unsealed"}, EventBadMemfd},
		{"wrong roles", fakeOpts{fds: "wrong-roles"}, EventBadMemfd},
		{"extra fd", fakeOpts{fds: "extra"}, EventFDPassing},
		{"token", fakeOpts{badToken: true}, EventAuth},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sink, log := newAuditSink()
			err := dialFake(t, tc.opts, DialConfig{SessionConfig: SessionConfig{Logger: log}})
			require.ErrorIs(t, err, ErrHandshake)
			r := sink.one(t, tc.event)
			assert.Equal(t, "E_PROTO", r[LogKeyCode])
		})
	}
}

// A nil Logger means slog.Default(): refusals are visible out of the box.
func TestAuditNilLoggerIsDefault(t *testing.T) {
	sink, log := newAuditSink()
	old := slog.Default()
	slog.SetDefault(log)
	defer slog.SetDefault(old)
	err := dialFake(t, fakeOpts{badToken: true}, DialConfig{})
	require.ErrorIs(t, err, ErrHandshake)
	sink.one(t, EventAuth)
}
