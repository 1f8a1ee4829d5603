package control

import (
	"context"
	"crypto/sha256"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// acceptSelf listens with policy, connects from this process and accepts.
func acceptSelf(t *testing.T, p *Policy, forcePidfdOpen bool) (*Conn, error) {
	t.Helper()
	path := sockPath(t)
	l, err := Listen(path, Config{Policy: p})
	require.NoError(t, err)
	t.Cleanup(func() { l.Close() })
	l.hooks.forcePidfdOpen = forcePidfdOpen
	client, err := net.Dial("unix", path)
	require.NoError(t, err)
	t.Cleanup(func() { client.Close() })
	require.NoError(t, l.SetDeadline(time.Now().Add(10*time.Second)))
	c, err := l.Accept()
	if err == nil {
		t.Cleanup(func() { c.Close() })
	}
	return c, err
}

func TestAttestSelf(t *testing.T) {
	exe, sum := testExe(t)
	for _, force := range []bool{false, true} {
		c, err := acceptSelf(t, nil, force)
		require.NoError(t, err, "forcePidfdOpen=%v", force)
		assert.Equal(t, PeerIdentity{
			UID: uint32(os.Geteuid()), GID: uint32(os.Getegid()), PID: os.Getpid(),
			Exe: exe, ExeSHA256: sum,
		}, c.Peer, "forcePidfdOpen=%v", force)
		pid, err := pidfdPid(c.PidFD())
		require.NoError(t, err)
		assert.Equal(t, os.Getpid(), pid)
		assert.NoError(t, pidfdAlive(c.PidFD()))
		s := c.Peer.Subject()
		assert.Equal(t, uint32(os.Getpid()), s.PID)
		assert.Equal(t, sum, s.ExeSHA256)
	}
}

func TestAttestPolicy(t *testing.T) {
	exe, sum := testExe(t)
	uid, gid := uint32(os.Geteuid()), uint32(os.Getegid())
	for _, tc := range []struct {
		name   string
		policy Policy
		ok     bool
	}{
		{"zero policy: own uid", Policy{}, true},
		{"uid listed", Policy{UIDs: []uint32{12345, uid}}, true},
		{"uid not listed", Policy{UIDs: []uint32{12345}}, false},
		{"gid listed", Policy{GIDs: []uint32{gid}}, true},
		{"gid not listed", Policy{GIDs: []uint32{12345}}, false},
		{"uid ok but gid not (AND)", Policy{UIDs: []uint32{uid}, GIDs: []uint32{12345}}, false},
		{"exe path listed", Policy{ExePaths: []string{"/bin/true", exe}}, true},
		{"exe path not listed", Policy{ExePaths: []string{"/bin/true"}}, false},
		{"digest listed", Policy{ExeSHA256: [][32]byte{{1}, sum}}, true},
		{"digest not listed", Policy{ExeSHA256: [][32]byte{{1}}}, false},
	} {
		before := countFDs(t)
		c, err := acceptSelf(t, &tc.policy, false)
		if tc.ok {
			assert.NoError(t, err, tc.name)
		} else {
			assert.ErrorIs(t, err, ErrPeerRejected, tc.name)
			assert.Nil(t, c)
			// Only the listener, its lock and our client remain: the
			// accepted conn and the pidfd were closed.
			assert.Equal(t, before+3, countFDs(t), "%s: fd leak", tc.name)
		}
	}
}

func TestAttestExported(t *testing.T) {
	a, _ := socketPair(t)
	id, pidfd, err := Attest(a, nil)
	require.NoError(t, err)
	defer pidfd.Close()
	assert.Equal(t, os.Getpid(), id.PID)

	_, pidfd, err = Attest(a, &Policy{UIDs: []uint32{12345}})
	assert.ErrorIs(t, err, ErrPeerRejected)
	assert.Nil(t, pidfd)

	a.Close()
	_, _, err = Attest(a, nil)
	assert.ErrorIs(t, err, ErrPeerRejected)
}

// A pidfd tells an exited process (zombie) and a reaped one (whose pid may
// be reused) from a live one; attestation relies on it last.
func TestPidfdLiveness(t *testing.T) {
	cmd := helper(t, os.Args[0], "exit", "", nil)
	fd, err := unix.PidfdOpen(cmd.Process.Pid, 0)
	require.NoError(t, err)
	pidfd := os.NewFile(uintptr(fd), "pidfd")
	defer pidfd.Close()

	waitExited(t, pidfd)
	assert.Error(t, pidfdAlive(pidfd), "zombie")
	pid, err := pidfdPid(pidfd)
	require.NoError(t, err)
	assert.Equal(t, cmd.Process.Pid, pid, "zombie keeps its pid")

	require.NoError(t, cmd.Wait())
	assert.Error(t, pidfdAlive(pidfd), "reaped")
	pid, err = pidfdPid(pidfd)
	require.NoError(t, err)
	assert.Equal(t, -1, pid, "reaped: pid released")
}

// pidfd_send_signal(0) failing with EPERM means the process exists but may
// not be signalled (a kernel without CAP_KILL attesting a daemon of another
// uid): alive. It used to refuse every such peer. Only ESRCH means gone.
func TestPidfdAliveEPERM(t *testing.T) {
	fd, err := unix.PidfdOpen(os.Getpid(), 0)
	require.NoError(t, err)
	pidfd := os.NewFile(uintptr(fd), "pidfd")
	defer pidfd.Close()
	orig := pidfdSignal
	defer func() { pidfdSignal = orig }()
	for _, tc := range []struct {
		err   error
		alive bool
	}{{nil, true}, {unix.EPERM, true}, {unix.ESRCH, false}} {
		pidfdSignal = func(int, unix.Signal, *unix.Siginfo, int) error { return tc.err }
		if tc.alive {
			assert.NoError(t, pidfdAlive(pidfd), "%v", tc.err)
		} else {
			assert.ErrorIs(t, pidfdAlive(pidfd), unix.ESRCH)
		}
	}
}

func waitExited(t *testing.T, pidfd *os.File) {
	t.Helper()
	pfd := []unix.PollFd{{Fd: int32(pidfd.Fd()), Events: unix.POLLIN}}
	for {
		n, err := unix.Poll(pfd, 10_000)
		if err == unix.EINTR {
			continue
		}
		require.NoError(t, err)
		require.Equal(t, 1, n, "helper did not exit")
		return
	}
}

func TestCheckServer(t *testing.T) {
	a, _ := socketPair(t)
	assert.NoError(t, CheckServer(a))
	assert.NoError(t, CheckServer(a, uint32(os.Geteuid())))
	assert.ErrorIs(t, CheckServer(a, 12345), ErrPeerRejected)
	a.Close()
	assert.ErrorIs(t, CheckServer(a), ErrPeerRejected)
}

func TestStartTime(t *testing.T) {
	self, err := startTime(os.Getpid())
	require.NoError(t, err)
	now := bootTime()
	assert.Greater(t, self, time.Duration(0))
	assert.LessOrEqual(t, self, now, "this process started before now")

	cmd := helper(t, os.Args[0], "exit", "", nil)
	child, err := startTime(cmd.Process.Pid)
	require.NoError(t, err)
	assert.GreaterOrEqual(t, child+clockTick, now, "a process started after a point in time is recognised as such")
	require.NoError(t, cmd.Wait())
	_, err = startTime(cmd.Process.Pid)
	assert.Error(t, err)
}

// Digests are cached by file version: a file changed since it was hashed
// is hashed again, and a file changed within the last second is never
// cached (coarse timestamps).
func TestExeDigestCache(t *testing.T) {
	name := filepath.Join(t.TempDir(), "exe")
	require.NoError(t, os.WriteFile(name, []byte("version 1"), 0o755))
	fresh := func() (exeKey, bool) {
		fi, err := os.Stat(name)
		require.NoError(t, err)
		return exeKeyOf(fi)
	}
	sum, err := hashFile(context.Background(), name)
	require.NoError(t, err)
	assert.Equal(t, sha256.Sum256([]byte("version 1")), sum)
	k, ok := fresh()
	assert.False(t, ok, "just written: not cacheable")
	_, cached := exeDigests.get(k)
	assert.False(t, cached)

	time.Sleep(exeCacheMinAge + 100*time.Millisecond)
	_, err = hashFile(context.Background(), name)
	require.NoError(t, err)
	k, ok = fresh()
	require.True(t, ok)
	got, cached := exeDigests.get(k)
	require.True(t, cached)
	assert.Equal(t, sum, got)

	// Same size, new content: ctime moves, the cache misses.
	require.NoError(t, os.WriteFile(name, []byte("version 2"), 0o755))
	sum2, err := hashFile(context.Background(), name)
	require.NoError(t, err)
	assert.Equal(t, sha256.Sum256([]byte("version 2")), sum2)
}
