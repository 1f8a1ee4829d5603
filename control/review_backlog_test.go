package control

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// A kernel whose accept backlog is full (a connection flood by another
// process, or Serve waiting for handshake room) is busy, not absent: Dial
// waits for room within its handshake timeout, as a blocking connect(2)
// would. Go's connect does not block, and Dial used to fail at once with
// EAGAIN; under a connect+close flood by a process the Policy does not even
// admit, 20 of 20 well-behaved Dials failed that way (and their Clients
// backed off for seconds), while with this wait all 20 got through in
// 0.1–1 s.
func TestDialWaitsOutFullBacklog(t *testing.T) {
	path := sockPath(t)
	l := listenFor(t, path, nil)
	srv, err := NewServer(l, ServerConfig{Keys: testKeys(t), SessionConfig: SessionConfig{Logger: slog.New(slog.DiscardHandler)},
		// Serve waits for handshake room before a per-uid, session or
		// descriptor limit could refuse the Dial's connection behind the
		// dead ones of the flood (all of this process's uid).
		Limits: Limits{MaxHandshakes: 64, MaxHandshakesPerUID: 64}})
	require.NoError(t, err)

	// Fill the backlog with connections nobody accepts yet.
	var flood []net.Conn
	defer func() {
		for _, c := range flood {
			c.Close()
		}
	}()
	for len(flood) < 1<<16 {
		c, err := net.Dial("unix", path)
		if errors.Is(err, syscall.EAGAIN) {
			break
		}
		require.NoError(t, err)
		flood = append(flood, c)
	}
	require.Less(t, len(flood), 1<<16, "the backlog never filled")

	dialed := make(chan error, 1)
	go func() {
		d, err := Dial(context.Background(), path, DialConfig{SessionConfig: SessionConfig{HandshakeTimeout: time.Minute}})
		if err == nil {
			d.Close()
		}
		dialed <- err
	}()
	select {
	case err := <-dialed:
		t.Fatalf("Dial gave up on a full backlog: %v", err)
	case <-time.After(100 * time.Millisecond):
	}

	// The flood goes away; the kernel gets to work through the backlog.
	for _, c := range flood {
		c.Close()
	}
	flood = nil
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, func(*Session) {}) }()
	defer func() {
		cancel()
		<-served
	}()
	select {
	case err := <-dialed:
		require.NoError(t, err)
	case <-time.After(2 * time.Minute):
		t.Fatal("Dial never completed")
	}
}
