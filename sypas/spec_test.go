package sypas_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/control"
	"github.com/sypas/go/frame"
	"github.com/sypas/go/sypas"
	"github.com/sypas/go/wire"
)

// The tests of this file hold the bridge to docs/PROTOCOL.md §8 from the
// outside: a daemon written from the spec breaks each rule whose breach
// ends a session, and a kernel written from the spec serves the real
// Client.

// TestSpecDaemonEndsSession: a frame the kernel cannot take ends the
// session with ERROR on the control socket, whose reason the daemon gets
// (§8.4); the kernel keeps serving other sessions.
func TestSpecDaemonEndsSession(t *testing.T) {
	srv, path := specKernelServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	badRequest := func(e *specEnd) []byte {
		f := frame.Frame{Header: frame.Header{Type: frame.TypeRequest, StreamID: 1, Sequence: 1, Correlation: 1, CapRef: e.sess.CapRef()},
			Payload: make([]byte, 10)} // timeout 0, method_len 0
		b, err := f.Append(nil)
		require.NoError(t, err)
		return b
	}
	for _, tc := range []struct {
		name   string
		act    func(e *specEnd)
		reason string
	}{
		{"sequence", func(e *specEnd) {
			e.seq = 1 // the first frame must be 1
			e.call("kv.get", "", 0, false, "")
		}, "REQUEST frame with sequence 2 on the ring, want 1"},
		{"not a frame", func(e *specEnd) { e.write(bytes.Repeat([]byte("x"), 64)) }, "a ring record is not a frame"},
		{"response", func(e *specEnd) {
			e.send(frame.Header{Correlation: 1, Flags: frame.FlagEndStream}, nil, &wire.Response{}, "")
		}, "RESPONSE frame on the daemon's ring"},
		{"event", func(e *specEnd) {
			e.send(frame.Header{}, nil, &wire.Event{SubscriptionID: 1, Topic: []byte("t")}, "")
		}, "EVENT frame on the daemon's ring"},
		{"request payload", func(e *specEnd) { e.write(badRequest(e)) }, "REQUEST payload"},
		{"subscribe without correlation", func(e *specEnd) {
			e.send(frame.Header{}, nil, &wire.Subscribe{SubscriptionID: 1, Topic: []byte("t")}, "")
		}, "SUBSCRIBE without a correlation"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sess, err := control.Dial(ctx, path, control.DialConfig{SessionConfig: control.SessionConfig{
				Features: wire.FeatureSubscribe, Logger: quietLog}})
			require.NoError(t, err)
			defer sess.Close()
			tc.act(&specEnd{t: t, sess: sess, out: toKernel})
			select {
			case <-sess.Done():
			case <-time.After(10 * time.Second):
				t.Fatal("the session did not end")
			}
			err = sess.Err()
			assert.ErrorIs(t, err, wire.ErrProto)
			assert.ErrorContains(t, err, tc.reason, "the reason reaches the daemon")
		})
	}
	c, err := sypas.Dial(ctx, path, sypas.ClientConfig{DialConfig: control.DialConfig{SessionConfig: control.SessionConfig{Logger: quietLog}}})
	require.NoError(t, err)
	defer c.Close()
	h, err := c.Health(ctx)
	require.NoError(t, err)
	assert.Equal(t, "SERVING", h)
	assert.Zero(t, srv.Stats().Denied, "a session-ending frame is no per-request refusal")
}

// specKernelServer is a Server with kv.get, serving on a fresh socket until
// the test ends.
func specKernelServer(t *testing.T) (*sypas.Server, string) {
	srv, err := sypas.NewServer(sypas.ServerConfig{ServerConfig: control.ServerConfig{
		Keys: docKeys(t), SessionConfig: control.SessionConfig{Logger: quietLog}}})
	require.NoError(t, err)
	srv.Handle("kv.get", sypas.RightRequest, func(context.Context, *sypas.Request) ([]byte, error) { return nil, nil }, sypas.Inline)
	path := filepath.Join(t.TempDir(), "kernel.sock")
	l, err := control.Listen(path, control.Config{})
	require.NoError(t, err)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	t.Cleanup(func() {
		srv.Close()
		assert.NoError(t, <-served)
		l.Close()
	})
	return srv, path
}

// TestSpecKernelServesClient: a kernel written from §8 alone (control's
// session and its ring ends, frames assembled with the wire codecs) serves
// the real Client, and checks every frame the Client writes against the
// rules of §8.
func TestSpecKernelServesClient(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	path := filepath.Join(t.TempDir(), "kernel.sock")
	l, err := control.Listen(path, control.Config{})
	require.NoError(t, err)
	defer l.Close()
	cs, err := control.NewServer(l, control.ServerConfig{Keys: docKeys(t),
		SessionConfig: control.SessionConfig{Features: wire.FeatureSubscribe | wire.FeatureTokenRefresh, Logger: quietLog}})
	require.NoError(t, err)
	oneWay := make(chan string, 1)
	kernel := make(chan error, 1)
	go func() {
		err := errors.New("the spec kernel stopped") // a failed require in specEnd
		defer func() { kernel <- err }()
		sess, err := cs.Accept(ctx)
		if err != nil {
			return
		}
		defer sess.Close()
		err = specKernel(t, sess, oneWay)
	}()

	c, err := sypas.Dial(ctx, path, sypas.ClientConfig{MaxAttempts: 1,
		DialConfig: control.DialConfig{SessionConfig: control.SessionConfig{Logger: quietLog}}})
	require.NoError(t, err)
	defer c.Close()

	got, err := c.Call(ctx, "echo", []byte("hello"))
	require.NoError(t, err)
	assert.Equal(t, "hello", string(got))
	_, err = c.Call(ctx, "nope", nil)
	assert.ErrorIs(t, err, sypas.ErrNotFound)
	assert.ErrorContains(t, err, "no operation nope")
	require.NoError(t, c.Send(ctx, "log.write", []byte("started")))
	assert.Equal(t, "started", <-oneWay)
	h, err := c.Health(ctx)
	require.NoError(t, err)
	assert.Equal(t, "SERVING", h)

	sub, err := c.Subscribe(ctx, "cpu.load", sypas.SubscribeOptions{})
	require.NoError(t, err)
	select {
	case ev := <-sub.Events():
		assert.Equal(t, "cpu.load", ev.Topic)
		assert.Equal(t, "0.42", string(ev.Body))
		assert.Equal(t, time.Unix(0, 1_767_225_600_000_000_000), ev.Time)
	case <-time.After(10 * time.Second):
		t.Fatal("no event")
	}
	assert.EqualValues(t, 3, sub.Dropped(), "the drop count of the EVENT's header extension")
	require.NoError(t, sub.Unsubscribe(ctx))
	_, err = c.Call(ctx, "bye", nil)
	require.NoError(t, err)
	c.Close()
	select {
	case err := <-kernel:
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("the spec kernel did not see the daemon close")
	}
}

// specKernel serves one session as §8 says a kernel does: echo answers its
// body, sypas.health "SERVING", log.write is one-way, anything else
// E_NOT_FOUND; SUBSCRIBE is accepted with an empty RESPONSE and followed
// by one EVENT reporting 3 events dropped; after bye it waits for the
// daemon to close. Every
// frame the daemon writes is checked: a type allowed on its ring, the
// session's cap_ref, correlation rules, no header extension.
func specKernel(t *testing.T, sess *control.Session, oneWay chan<- string) error {
	k := &specEnd{t: t, sess: sess, out: toDaemon}
	outstanding := map[uint64]bool{}
	answer := func(corr uint64, m wire.Message) {
		h := frame.Header{Correlation: corr}
		if m.Type() == frame.TypeResponse {
			h.Flags = frame.FlagEndStream
		}
		delete(outstanding, corr)
		k.send(h, nil, m, "")
	}
	for {
		f, err := k.next("")
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return errors.New("the daemon sent nothing for 10 s")
			}
			return err
		}
		if !sess.Admits(f.CapRef) || f.HeaderLen != frame.HeaderSize {
			return errors.New("cap_ref or header_len: " + f.Header.String())
		}
		if f.Correlation != 0 {
			if outstanding[f.Correlation] {
				return errors.New("a correlation reused while outstanding: " + f.Header.String())
			}
			outstanding[f.Correlation] = true
		}
		switch f.Type {
		case frame.TypeRequest:
			var m wire.Request
			if err := m.Decode(f.Payload); err != nil {
				return err
			}
			if m.Timeout <= 0 || m.Timeout > 30*time.Second {
				return errors.New("timeout_ns is the call's context deadline, relative")
			}
			switch op := string(m.Method); {
			case op == "log.write" && f.Correlation == 0:
				oneWay <- string(m.Body)
			case f.Correlation == 0:
				return errors.New("a one-way request to " + op)
			case op == "echo":
				answer(f.Correlation, &wire.Response{Body: m.Body})
			case op == sypas.HealthOp:
				answer(f.Correlation, &wire.Response{Body: []byte("SERVING")})
			case op == "bye":
				answer(f.Correlation, &wire.Response{})
				<-sess.Done() // the daemon closes
				return nil
			default:
				answer(f.Correlation, &wire.ErrorMsg{Code: wire.CodeNotFound, Message: []byte("no operation " + op)})
			}
		case frame.TypeSubscribe:
			var m wire.Subscribe
			if err := m.Decode(f.Payload); err != nil || f.Correlation == 0 {
				return errors.New("SUBSCRIBE: " + f.Header.String())
			}
			answer(f.Correlation, &wire.Response{})
			ext := binary.LittleEndian.AppendUint64(nil, 3)
			k.send(frame.Header{}, ext, &wire.Event{SubscriptionID: m.SubscriptionID, Timestamp: 1_767_225_600_000_000_000,
				Topic: m.Topic, Body: []byte("0.42")}, "")
		case frame.TypeUnsubscribe:
			var m wire.Unsubscribe
			if err := m.Decode(f.Payload); err != nil || f.Correlation == 0 {
				return errors.New("UNSUBSCRIBE: " + f.Header.String())
			}
			answer(f.Correlation, &wire.Response{})
		default:
			return errors.New("a frame the daemon's ring does not carry: " + f.Header.String())
		}
	}
}
