package control

import (
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// detachedPair is a pollConn and the *net.UnixConn at the other end.
func detachedPair(t *testing.T) (*pollConn, *net.UnixConn) {
	t.Helper()
	mine, peer := socketPair(t)
	pc, err := detach(mine)
	require.NoError(t, err)
	t.Cleanup(func() { pc.Close() })
	_, err = mine.Write([]byte("x"))
	require.ErrorIs(t, err, net.ErrClosed, "detach closes the conn it took the socket from")
	return pc, peer
}

func TestPollConnReadWrite(t *testing.T) {
	pc, peer := detachedPair(t)
	go func() {
		time.Sleep(10 * time.Millisecond) // Read waits in ppoll meanwhile
		peer.Write([]byte("ping"))
	}()
	buf := make([]byte, 16)
	n, err := pc.Read(buf)
	require.NoError(t, err)
	assert.Equal(t, "ping", string(buf[:n]))

	_, err = pc.Write([]byte("pong"))
	require.NoError(t, err)
	n, err = peer.Read(buf)
	require.NoError(t, err)
	assert.Equal(t, "pong", string(buf[:n]))
	assert.Equal(t, NetworkUnix, networkOf(pc))

	require.NoError(t, peer.CloseWrite())
	_, err = pc.Read(buf)
	assert.ErrorIs(t, err, io.EOF)
}

func TestPollConnDeadlines(t *testing.T) {
	pc, peer := detachedPair(t)
	buf := make([]byte, 16)

	pc.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	_, err := pc.Read(buf)
	require.ErrorIs(t, err, os.ErrDeadlineExceeded)
	var ne net.Error
	require.ErrorAs(t, err, &ne)
	assert.True(t, ne.Timeout())

	// A deadline moved into the past by another goroutine ends a wait
	// under way (how Inline.Wake interrupts a reader).
	pc.SetReadDeadline(time.Time{})
	done := make(chan error, 1)
	go func() { _, err := pc.Read(buf); done <- err }()
	time.Sleep(10 * time.Millisecond)
	pc.SetReadDeadline(time.Unix(1, 0))
	select {
	case err := <-done:
		assert.ErrorIs(t, err, os.ErrDeadlineExceeded)
	case <-time.After(5 * time.Second):
		t.Fatal("a past deadline did not end the wait")
	}

	// The read resumes once the deadline is lifted, and nothing was lost.
	pc.SetReadDeadline(time.Time{})
	peer.Write([]byte("after"))
	n, err := pc.Read(buf)
	require.NoError(t, err)
	assert.Equal(t, "after", string(buf[:n]))

	// A writer blocked on a peer that does not read ends at its deadline.
	pc.SetWriteDeadline(time.Now().Add(50 * time.Millisecond))
	big := make([]byte, 8<<20)
	n, err = pc.Write(big)
	assert.ErrorIs(t, err, os.ErrDeadlineExceeded)
	assert.Less(t, n, len(big))
}

// Close while a reader and a writer are blocked wakes both with
// net.ErrClosed; every later call fails the same way; and the descriptor
// is closed once they have left, not before.
func TestPollConnCloseWhileBlocked(t *testing.T) {
	pc, _ := detachedPair(t)
	fd := pc.fd
	read, write := make(chan error, 1), make(chan error, 1)
	go func() { _, err := pc.Read(make([]byte, 16)); read <- err }()
	go func() { _, err := pc.Write(make([]byte, 8<<20)); write <- err }()
	time.Sleep(20 * time.Millisecond)
	require.NoError(t, pc.Close())
	for _, ch := range []chan error{read, write} {
		select {
		case err := <-ch:
			assert.ErrorIs(t, err, net.ErrClosed)
		case <-time.After(5 * time.Second):
			t.Fatal("Close did not wake a blocked call")
		}
	}
	_, err := pc.Read(make([]byte, 1))
	assert.ErrorIs(t, err, net.ErrClosed)
	_, err = pc.Write([]byte("x"))
	assert.ErrorIs(t, err, net.ErrClosed)
	rc, _ := pc.SyscallConn()
	assert.ErrorIs(t, rc.Control(func(uintptr) {}), net.ErrClosed)
	assert.ErrorIs(t, pc.CloseWrite(), net.ErrClosed)
	assert.ErrorIs(t, pc.Close(), net.ErrClosed)
	pc.SetReadDeadline(time.Unix(1, 0)) // after Close: no effect, no fault
	_, err = unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	assert.ErrorIs(t, err, unix.EBADF, "the socket is closed once no call uses it")
}

// A read or write of what is there makes no allocation.
func TestPollConnAllocs(t *testing.T) {
	pc, peer := detachedPair(t)
	msg, buf := []byte("0123456789abcdef"), make([]byte, 16)
	a := testing.AllocsPerRun(200, func() {
		if _, err := peer.Write(msg); err != nil {
			panic(err)
		}
		if _, err := pc.Read(buf); err != nil {
			panic(err)
		}
		if _, err := pc.Write(msg); err != nil {
			panic(err)
		}
		if _, err := io.ReadFull(peer, buf); err != nil {
			panic(err)
		}
	})
	// peer's own Read and Write through the runtime allocate nothing
	// either; any allocation is ours.
	assert.Zero(t, a)
}

func TestPollConnRaw(t *testing.T) {
	pc, peer := detachedPair(t)
	rc, err := pc.SyscallConn()
	require.NoError(t, err)
	calls := 0
	go func() {
		time.Sleep(10 * time.Millisecond)
		peer.Write([]byte("x"))
	}()
	var got int
	err = rc.Read(func(fd uintptr) bool {
		calls++
		var b [1]byte
		n, err := unix.Read(int(fd), b[:])
		got = n
		return !errors.Is(err, unix.EAGAIN)
	})
	require.NoError(t, err)
	assert.Equal(t, 1, got)
	assert.GreaterOrEqual(t, calls, 2, "the first try found nothing and waited")
}

// A deadline moved earlier while no call waits costs no wake-up (no
// eventfd write): every await with a caller's deadline does that.
func TestPollConnDeadlineWithoutWaiterWakesNothing(t *testing.T) {
	pc, _ := detachedPair(t)
	pc.SetReadDeadline(time.Now().Add(time.Hour))
	pc.SetReadDeadline(time.Now().Add(time.Millisecond))
	pc.SetReadDeadline(time.Unix(1, 0))
	pfd := []unix.PollFd{{Fd: int32(pc.kicks[dirRead]), Events: unix.POLLIN}}
	n, err := unix.Poll(pfd, 0)
	require.NoError(t, err)
	assert.Zero(t, n, "the read side's eventfd was written with nobody waiting")
}
