package control

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/frame"
	"github.com/sypas/go/internal/shm"
	"github.com/sypas/go/wire"
)

// inlineFeatures is what both sides offer in these tests.
const inlineFeatures = DefaultFeatures | wire.FeatureInline

// inlineExchange sends a REQUEST from the daemon and a RESPONSE back on the
// inline data plane, checking what each side reads.
func inlineExchange(t *testing.T, d, k *Session, body string) {
	t.Helper()
	di, ki := d.Inline(), k.Inline()
	require.NotNil(t, di)
	require.NotNil(t, ki)
	req := wire.Request{Method: []byte("op"), Body: []byte(body)}
	require.NoError(t, di.Write(frame.Header{Type: frame.TypeRequest, Correlation: 7}, nil, &req, true))
	f, err := ki.Next(time.Now().Add(10 * time.Second))
	require.NoError(t, err)
	assert.Equal(t, frame.TypeRequest, f.Type)
	assert.EqualValues(t, DataStream, f.StreamID)
	assert.EqualValues(t, 7, f.Correlation)
	assert.Equal(t, d.Token().ID, f.CapRef, "cap_ref names the token, as on the rings")
	assert.True(t, k.Admits(f.CapRef))
	var got wire.Request
	require.NoError(t, got.Decode(f.Payload))
	assert.Equal(t, body, string(got.Body))
	ki.Release()

	resp := wire.Response{Body: []byte("re:" + body)}
	require.NoError(t, ki.Write(frame.Header{Type: frame.TypeResponse, Flags: frame.FlagEndStream, Correlation: 7}, nil, &resp, true))
	f, err = di.Next(time.Now().Add(10 * time.Second))
	require.NoError(t, err)
	assert.Equal(t, frame.TypeResponse, f.Type)
	var r wire.Response
	require.NoError(t, r.Decode(f.Payload))
	assert.Equal(t, "re:"+body, string(r.Body))
	di.Release()
}

// inlineShutdown ends an inline session in order (the daemon's GOAWAY,
// the kernel's answer) and checks both sides end closed.
func inlineShutdown(t *testing.T, d, k *Session) {
	t.Helper()
	// The kernel's Inline.Next is its socket reader: it must go on
	// reading for the GOAWAY to arrive.
	kread := make(chan error, 1)
	go func() {
		for {
			if _, err := k.Inline().Next(time.Time{}); err != nil {
				kread <- err
				return
			}
		}
	}()
	kdone := make(chan error, 1)
	go func() {
		<-k.GoAway()
		kdone <- k.Shutdown(context.Background())
	}()
	require.NoError(t, d.Shutdown(context.Background()))
	require.NoError(t, <-kdone)
	_, err := d.Inline().Next(time.Time{})
	assert.ErrorIs(t, err, ErrSessionClosed)
	assert.ErrorIs(t, <-kread, ErrSessionClosed)
}

// Shared memory turned off by either side's configuration: WELCOME grants
// INLINE, no REGIONS and no memfd comes, and frames travel on the socket
// between the control frames (heartbeats every 20 ms here), in one
// sequence.
func TestInlineByConfig(t *testing.T) {
	for _, tc := range []struct {
		name       string
		kNo, dNo   bool
		wantReason string
	}{
		{"daemon", false, true, "the daemon's configuration"},
		{"kernel", true, false, "the kernel chose it"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base := countFDs(t)
			ts := startServer(t, "", ServerConfig{SessionConfig: SessionConfig{
				Features: inlineFeatures, NoSharedMemory: tc.kNo, HeartbeatInterval: 20 * time.Millisecond}})
			d := dialT(t, ts.path, DialConfig{SessionConfig: SessionConfig{Features: inlineFeatures, NoSharedMemory: tc.dNo}})
			k := ts.session(t)
			assert.NotZero(t, d.Params().Features&wire.FeatureInline)
			assert.Zero(t, d.Params().Features&wire.FeatureInlineOnly, "never granted")
			assert.Nil(t, d.Producer())
			assert.Nil(t, k.Consumer())
			assert.Contains(t, d.Inline().Reason(), tc.wantReason)
			assert.NotEmpty(t, k.Inline().Reason())
			for i := range 20 {
				inlineExchange(t, d, k, string(rune('a'+i)))
				time.Sleep(5 * time.Millisecond) // heartbeats interleave
			}
			assert.NoError(t, d.Err())
			assert.NoError(t, k.Err())
			inlineShutdown(t, d, k)
			ts.Close()
			assert.Equal(t, base, countFDs(t), "every fd released")
		})
	}
}

// A daemon that does not offer INLINE gets the rings, even from a kernel
// that could go inline.
func TestInlineOnlyWhenOffered(t *testing.T) {
	ts := startServer(t, "", ServerConfig{SessionConfig: SessionConfig{Features: inlineFeatures}})
	d := dialT(t, ts.path, DialConfig{})
	k := ts.session(t)
	assert.Nil(t, d.Inline())
	assert.Nil(t, k.Inline())
	assert.NotNil(t, d.Producer())
	assert.Zero(t, d.Params().Features&wire.FeatureInline)
}

// A kernel whose shared memory is off refuses a daemon that cannot go
// inline, with a reason; so does a daemon without shared memory facing a
// kernel that cannot.
func TestInlineRefusedWhenOneSideCannot(t *testing.T) {
	ts := startServer(t, "", ServerConfig{SessionConfig: SessionConfig{NoSharedMemory: true}})
	_, err := Dial(context.Background(), ts.path, DialConfig{})
	require.Error(t, err)
	assert.ErrorIs(t, err, wire.ErrUnavailable)
	assert.Contains(t, err.Error(), "shared memory off")

	ts2 := startServer(t, "", ServerConfig{})
	_, err = Dial(context.Background(), ts2.path, DialConfig{SessionConfig: SessionConfig{NoSharedMemory: true}})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "maps no shared memory")
}

// memfd_create (or mmap) failing on the kernel turns a daemon that offers
// INLINE inline, with the failure as the reason; a daemon that does not
// is refused with E_RESOURCE, as before.
func TestInlineWhenKernelCannotCreateRings(t *testing.T) {
	t.Cleanup(shm.InjectFaults(errors.New("memfd_create: operation not permitted"), nil))

	ts := startServer(t, "", ServerConfig{SessionConfig: SessionConfig{Features: inlineFeatures}})
	d := dialT(t, ts.path, DialConfig{SessionConfig: SessionConfig{Features: inlineFeatures}})
	k := ts.session(t)
	require.NotNil(t, k.Inline())
	assert.Contains(t, k.Inline().Reason(), "memfd_create: operation not permitted")
	inlineExchange(t, d, k, "x")

	_, err := Dial(context.Background(), ts.path, DialConfig{})
	assert.ErrorIs(t, err, wire.ErrResource)
}

// A daemon that cannot map the kernel's rings (mmap refused, seals
// missing) tells the kernel why, dials again asking for inline, and says
// why in the session.
func TestInlineWhenDaemonCannotMapRings(t *testing.T) {
	t.Cleanup(shm.InjectFaults(nil, errors.New("mmap: cannot allocate memory")))

	ts := startServer(t, "", ServerConfig{SessionConfig: SessionConfig{Features: inlineFeatures}})
	d := dialT(t, ts.path, DialConfig{SessionConfig: SessionConfig{Features: inlineFeatures}})
	// The kernel sends REGIONS and TOKEN without waiting: its first
	// session fails its handshake, or ends once it reads the daemon's ERROR.
	// The kernel handshakes concurrently, so the second attempt's (inline)
	// session may come out first: each is told by its transport.
	var k *Session
	first := false
	timeout := time.After(10 * time.Second)
	for k == nil || !first {
		select {
		case s := <-ts.sess:
			if s.Inline() != nil {
				k = s
				continue
			}
			select {
			case <-s.Done():
			case <-time.After(10 * time.Second):
				t.Fatal("the first attempt's session did not end")
			}
			assert.ErrorIs(t, s.Err(), wire.ErrProto, "the daemon told the kernel why")
			s.Close()
			first = true
		case err := <-ts.errs:
			assert.ErrorIs(t, err, ErrHandshake)
			first = true
		case <-timeout:
			t.Fatalf("the first attempt ended: %v; the inline session came: %v", first, k != nil)
		}
	}
	t.Cleanup(func() { k.Close() })
	require.NotNil(t, d.Inline())
	assert.Contains(t, d.Inline().Reason(), "mmap: cannot allocate memory")
	inlineExchange(t, d, k, "y")

	// Without INLINE offered, the failure stays the handshake's.
	_, err := Dial(context.Background(), ts.path, DialConfig{})
	assert.ErrorIs(t, err, ErrHandshake)
}

// On an inline session, the kernel reads only REQUEST, SUBSCRIBE and
// UNSUBSCRIBE on stream 1, the daemon only RESPONSE, ERROR and EVENT: a
// RESPONSE from the daemon ends the session with E_PROTO. Control frames
// stay bounded by the control limit.
func TestInlineStreamRules(t *testing.T) {
	ts := startServer(t, "", ServerConfig{SessionConfig: SessionConfig{Features: inlineFeatures}})
	d := dialT(t, ts.path, DialConfig{SessionConfig: SessionConfig{Features: inlineFeatures, NoSharedMemory: true}})
	k := ts.session(t)
	resp := wire.Response{Body: []byte("wrong way")}
	require.NoError(t, d.Inline().Write(frame.Header{Type: frame.TypeResponse, Flags: frame.FlagEndStream, Correlation: 1}, nil, &resp, true))
	_, err := k.Inline().Next(time.Now().Add(10 * time.Second)) // the kernel's reader
	assert.ErrorIs(t, err, wire.ErrProto)
	select {
	case <-k.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the kernel kept the session")
	}
	assert.ErrorIs(t, k.Err(), wire.ErrProto)
	select {
	case <-d.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the daemon was not told")
	}
	assert.ErrorIs(t, d.Err(), wire.ErrProto, "the daemon learns why: %v", d.Err())

	big := wire.Request{Method: []byte("op"), Body: make([]byte, d.Params().MaxPayload)}
	assert.ErrorIs(t, d.Inline().Write(frame.Header{Type: frame.TypeRequest, Correlation: 1}, nil, &big, true), wire.ErrTooLarge)
}

// Stream 1 on a session with rings is still E_PROTO: only an inline
// session's socket carries data.
func TestStreamOneWithoutInline(t *testing.T) {
	ts := startServer(t, "", ServerConfig{})
	d := dialT(t, ts.path, DialConfig{})
	k := ts.session(t)
	_ = k
	// Forge an inline frame on the daemon's socket by borrowing the
	// writer of an Inline that was never negotiated.
	in := &Inline{s: d}
	req := wire.Request{Method: []byte("op")}
	require.NoError(t, in.Write(frame.Header{Type: frame.TypeRequest, Correlation: 1}, nil, &req, true))
	select {
	case <-k.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the kernel kept the session")
	}
	assert.ErrorIs(t, k.Err(), wire.ErrProto)
	var ne net.Error
	assert.False(t, errors.As(k.Err(), &ne), "a protocol error, not a network one")
}
