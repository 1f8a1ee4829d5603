package control

import (
	"context"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/wire"
)

// Serve under a context deadline ends with the context's error and writes
// no audit record. The listener's deadline (the context's) used to fire
// before the context reported it about half the time, and Serve then took
// its own deadline for a failed accept(2): an Error-level "internal" record
// and a pause before it noticed.
func TestServeDeadlineIsNoAcceptFailure(t *testing.T) {
	sink, log := newAuditSink()
	srv, err := NewServer(listenFor(t, sockPath(t), nil), ServerConfig{Keys: testKeys(t), SessionConfig: SessionConfig{Logger: log}})
	require.NoError(t, err)
	for range 50 {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Millisecond)
		err := srv.Serve(ctx, func(*Session) {})
		cancel()
		require.ErrorIs(t, err, context.DeadlineExceeded)
	}
	assert.Empty(t, sink.records())
}

// A Serve that stops while a peer is being attested refuses nobody: it
// writes no attestation record. It used to record "attestation took too
// long: context canceled" at Warn, as if the peer had failed.
func TestServeStopMidAttestationRecordsNothing(t *testing.T) {
	sink, log := newAuditSink()
	l := listenFor(t, sockPath(t), nil)
	inAttest := make(chan struct{})
	l.hooks.beforeLiveness = func() {
		close(inAttest)
		time.Sleep(100 * time.Millisecond) // Serve stops meanwhile
	}
	srv, err := NewServer(l, ServerConfig{Keys: testKeys(t), SessionConfig: SessionConfig{Logger: log}})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, func(*Session) {}) }()
	c := rawDial(t, l.Path())
	defer c.Close()
	<-inAttest
	cancel()
	require.ErrorIs(t, <-served, context.Canceled)
	assert.Empty(t, sink.records())
}

// A Serve started right after another one ended at its context's deadline
// accepts. The first one's cancellation (an expired listener deadline, set
// from a goroutine of its own) could land after the second had set its
// deadline; the second then never accepted (each accept timed out at once,
// Serve took it for a failed accept(2) and paused) until its context
// ended. Seen in about one round in five under -race.
func TestServeAfterServeAccepts(t *testing.T) {
	l := listenFor(t, sockPath(t), nil)
	srv, err := NewServer(l, ServerConfig{Keys: testKeys(t), SessionConfig: SessionConfig{Logger: slog.New(slog.DiscardHandler)}})
	require.NoError(t, err)
	for i := range 50 {
		ctx, cancel := context.WithTimeout(context.Background(), time.Millisecond)
		require.ErrorIs(t, srv.Serve(ctx, func(*Session) {}), context.DeadlineExceeded)
		cancel()
		ctx, cancel = context.WithCancel(context.Background())
		dialed := make(chan error, 1)
		go func() {
			defer cancel()
			d, err := Dial(context.Background(), l.Path(), DialConfig{SessionConfig: SessionConfig{HandshakeTimeout: 5 * time.Second}})
			if err == nil {
				d.Close()
			}
			dialed <- err
		}()
		require.ErrorIs(t, srv.Serve(ctx, func(*Session) {}), context.Canceled)
		require.NoError(t, <-dialed, "round %d: the second Serve never accepted", i)
	}
}

// A Serve that stops during a handshake tells the daemon E_UNAVAILABLE
// (the kernel is going away), not E_TIMEOUT with "context canceled", and
// leaves no expired deadline on the Listener: a bare Listener.Accept after
// it works.
func TestServeStopMidHandshake(t *testing.T) {
	l := listenFor(t, sockPath(t), nil)
	attested := make(chan struct{})
	var once sync.Once
	l.hooks.beforeLiveness = func() { once.Do(func() { close(attested) }) }
	srv, err := NewServer(l, ServerConfig{Keys: testKeys(t), SessionConfig: SessionConfig{Logger: slog.New(slog.DiscardHandler)}})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, func(*Session) {}) }()
	c := rawDial(t, l.Path()) // and never sends HELLO
	defer c.Close()
	<-attested
	time.Sleep(50 * time.Millisecond) // the kernel waits for HELLO
	cancel()
	require.ErrorIs(t, <-served, context.Canceled)
	e := readError(t, c)
	assert.Equal(t, wire.CodeUnavailable, e.Code, "%v", e)
	assert.Contains(t, e.Message, "kernel stopped the handshake")

	accepted := make(chan error, 1)
	go func() {
		conn, err := l.Accept()
		if err == nil {
			conn.Close()
		}
		accepted <- err
	}()
	c2 := rawDial(t, l.Path())
	defer c2.Close()
	assert.NoError(t, <-accepted, "Listener.Accept after Serve")
}
