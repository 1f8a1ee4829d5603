package control

import (
	"context"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/wire"
)

// An executable above MaxExeSize is refused without being read (a sparse
// file: the old code hashed all of it, holding up Accept for seconds), and
// hashing stops when ctx ends.
func TestHashFileBounds(t *testing.T) {
	dir := t.TempDir()
	big := filepath.Join(dir, "big")
	f, err := os.Create(big)
	require.NoError(t, err)
	require.NoError(t, f.Truncate(MaxExeSize+1))
	require.NoError(t, f.Close())
	start := time.Now()
	_, err = hashFile(context.Background(), big)
	assert.ErrorContains(t, err, "at most")
	assert.Less(t, time.Since(start), 100*time.Millisecond)

	small := filepath.Join(dir, "small")
	require.NoError(t, os.WriteFile(small, []byte("x"), 0o755))
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err = hashFile(ctx, small)
	assert.ErrorIs(t, err, context.Canceled)
}

// Server.Accept's ctx and HandshakeTimeout bound attestation too, counted
// from accept: a peer whose attestation is slow is refused. Before, the
// handshake timeout started only after attestation, which had no bound.
func TestServerAcceptBoundsAttestation(t *testing.T) {
	l, err := Listen(sockPath(t), Config{})
	require.NoError(t, err)
	defer l.Close()
	l.hooks.beforeLiveness = func() { time.Sleep(300 * time.Millisecond) }
	srv, err := NewServer(l, ServerConfig{Keys: testKeys(t), SessionConfig: SessionConfig{HandshakeTimeout: 100 * time.Millisecond}})
	require.NoError(t, err)
	c := rawDial(t, l.Path())
	writeMsg(t, c, 1, &wire.Hello{MinVersion: 1, MaxVersion: 1})
	base := countFDs(t)
	s, err := srv.Accept(context.Background())
	if s != nil {
		s.Close()
	}
	require.Error(t, err)
	assert.ErrorIs(t, err, ErrPeerRejected)
	assert.ErrorIs(t, err, context.DeadlineExceeded)
	assert.Equal(t, base, countFDs(t), "fds leaked")
}

// A hand-built Conn (no pidfd, zero identity) used to get a token for uid
// 0 and no death watch. Handshake refuses any Conn that did not come from
// a Listener, and closes it.
func TestHandshakeRefusesUnattestedConn(t *testing.T) {
	l, err := Listen(sockPath(t), Config{})
	require.NoError(t, err)
	defer l.Close()
	srv, err := NewServer(l, ServerConfig{Keys: testKeys(t)})
	require.NoError(t, err)
	a, b := socketPair(t)
	hello := encodeMsg(t, 1, &wire.Hello{MinVersion: 1, MaxVersion: 1})
	go func() {
		// Play the daemon so the old code completes a handshake; the
		// write fails once the Conn is refused and closed.
		b.Write(hello)
		io.Copy(io.Discard, b)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := srv.Handshake(ctx, &Conn{Conn: a})
	if s != nil {
		s.Close()
	}
	require.Error(t, err)
	assert.ErrorIs(t, err, ErrPeerRejected)
	_, err = a.Write([]byte{0})
	assert.ErrorIs(t, err, net.ErrClosed, "the Conn is closed")
	_, err = srv.Handshake(ctx, nil)
	assert.ErrorIs(t, err, ErrPeerRejected)
}
