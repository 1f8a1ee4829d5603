package shm_test

import (
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/sypas/go/internal/closetest"
	"github.com/sypas/go/internal/shm"
)

// dupFile returns a new *os.File for the same open file description as f,
// as a peer would get it through SCM_RIGHTS.
func dupFile(t *testing.T, f *os.File) *os.File {
	t.Helper()
	d, err := dupForPeer(f)
	require.NoError(t, err)
	return d
}

func TestCreateOpenShared(t *testing.T) {
	const size = 3 * 4096
	r, err := shm.Create("test-shared", size)
	require.NoError(t, err)
	defer r.Close()

	assert.Equal(t, size, r.Size())
	require.Len(t, r.Bytes(), size)
	copy(r.Bytes(), "hello")
	r.Bytes()[size-1] = 0x7f

	peer, err := shm.Open(dupFile(t, r.File()), size)
	require.NoError(t, err)
	defer peer.Close()

	assert.Equal(t, "hello", string(peer.Bytes()[:5]))
	assert.Equal(t, byte(0x7f), peer.Bytes()[size-1])
	assert.NotSame(t, &r.Bytes()[0], &peer.Bytes()[0], "two mappings expected")

	// Writes flow the other way too: both mappings are MAP_SHARED.
	peer.Bytes()[100] = 42
	assert.Equal(t, byte(42), r.Bytes()[100])
}

func TestCreateSizeNotRounded(t *testing.T) {
	r, err := shm.Create("test-odd", 100)
	require.NoError(t, err)
	defer r.Close()
	assert.Len(t, r.Bytes(), 100)

	var st unix.Stat_t
	require.NoError(t, unix.Fstat(int(r.File().Fd()), &st))
	assert.EqualValues(t, 100, st.Size)
}

func TestCreateBadSize(t *testing.T) {
	for _, size := range []int{0, -1} {
		_, err := shm.Create("test-bad", size)
		assert.ErrorIs(t, err, shm.ErrSize, "size %d", size)
	}
}

func TestCreatedRegionIsSealed(t *testing.T) {
	r, err := shm.Create("test-sealed", 4096)
	require.NoError(t, err)
	defer r.Close()
	fd := int(r.File().Fd())

	assert.ErrorIs(t, unix.Ftruncate(fd, 0), unix.EPERM, "shrink must be sealed")
	assert.ErrorIs(t, unix.Ftruncate(fd, 8192), unix.EPERM, "grow must be sealed")
	_, err = unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_WRITE)
	assert.ErrorIs(t, err, unix.EPERM, "F_SEAL_SEAL must forbid new seals")

	seals, err := unix.FcntlInt(uintptr(fd), unix.F_GET_SEALS, 0)
	require.NoError(t, err)
	assert.Equal(t, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_SEAL, seals)
}

func TestOpenRejectsUnsealedMemfd(t *testing.T) {
	for _, flags := range []int{unix.MFD_CLOEXEC, unix.MFD_CLOEXEC | unix.MFD_ALLOW_SEALING} {
		fd, err := unix.MemfdCreate("test-unsealed", flags)
		require.NoError(t, err)
		require.NoError(t, unix.Ftruncate(fd, 4096))
		_, err = shm.Open(os.NewFile(uintptr(fd), "unsealed"), 4096)
		assert.ErrorIs(t, err, shm.ErrNotSealed, "flags %#x", flags)
		assertFdClosed(t, fd)
	}
}

func TestOpenRejectsRegularFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "region")
	require.NoError(t, os.WriteFile(path, make([]byte, 4096), 0o600))
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	require.NoError(t, err)
	fd := int(f.Fd())

	_, err = shm.Open(f, 4096)
	assert.ErrorIs(t, err, shm.ErrNotSealed)
	assertFdClosed(t, fd)
}

func TestOpenRejectsWrongSize(t *testing.T) {
	r, err := shm.Create("test-size", 4096)
	require.NoError(t, err)
	defer r.Close()

	for _, want := range []int{8192, 4095, 0} {
		f := dupFile(t, r.File())
		fd := int(f.Fd())
		_, err := shm.Open(f, want)
		require.ErrorIs(t, err, shm.ErrSize, "want %d", want)
		assert.NotErrorIs(t, err, shm.ErrNotSealed)
		if want > 0 {
			assert.Contains(t, err.Error(), "4096")
			assert.Contains(t, err.Error(), "want "+strconv.Itoa(want))
		}
		assertFdClosed(t, fd)
	}
}

func TestOpenNil(t *testing.T) {
	_, err := shm.Open(nil, 4096)
	assert.Error(t, err)
}

func TestCloseIdempotent(t *testing.T) {
	r, err := shm.Create("test-close", 4096)
	require.NoError(t, err)
	fd := int(r.File().Fd())

	assert.NoError(t, r.Close())
	assert.NoError(t, r.Close())
	assertFdClosed(t, fd)
	assert.Equal(t, 4096, r.Size(), "Size stays valid after Close")
	assert.Nil(t, r.Bytes(), "Bytes after Close")
}

// Memory a goroutine still holds when the region is closed stays safe to
// touch: it reads zeros, and its writes reach neither the peer nor the
// memfd. The peer's mapping is untouched.
func TestCloseLeavesMemoryTouchable(t *testing.T) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true)) // a fault fails this test only
	const size = 2 * 4096
	r, err := shm.Create("test-touch", size)
	require.NoError(t, err)
	peer, err := shm.Open(dupFile(t, r.File()), size)
	require.NoError(t, err)
	defer peer.Close()
	mem := r.Bytes()
	copy(mem, "shared")
	mem[size-1] = 1

	require.NoError(t, r.Close())
	assert.Equal(t, make([]byte, 6), mem[:6], "private zero pages")
	assert.Zero(t, mem[size-1])
	copy(mem, "stale!")
	assert.Equal(t, "shared", string(peer.Bytes()[:6]), "the peer keeps its memory")
	peer.Bytes()[0] = 'S'
	assert.Equal(t, byte('s'), mem[0], "no longer shared")
	runtime.KeepAlive(r) // mem is only valid while r is reachable
}

// A closed region's addresses are unmapped once it is unreachable: the
// kernel no longer knows the range (msync fails with ENOMEM), and Mapped
// counts it no more.
func TestClosedRegionUnmappedWhenUnreachable(t *testing.T) {
	base := shm.Mapped()
	r, err := shm.Create("test-unmap", 4096)
	require.NoError(t, err)
	mem := r.Bytes()
	require.NoError(t, r.Close())
	runtime.GC()
	assert.True(t, closetest.IsMapped(mem), "mapped while the region is reachable")
	runtime.KeepAlive(r)

	r = nil
	closetest.WaitUnmapped(t, mem)
	assert.LessOrEqual(t, shm.Mapped(), base)
}

// TestNoLeaks creates, opens and closes many regions and checks that the
// process has as many descriptors and memfd mappings as before.
func TestNoLeaks(t *testing.T) {
	n := 1000
	if testing.Short() {
		n = 100
	}
	fds0, maps0, mapped0 := countFds(t), countMemfdMaps(t), shm.Mapped()
	for i := range n {
		r, err := shm.Create("test-leak", 4096)
		require.NoError(t, err)
		p, err := shm.Open(dupFile(t, r.File()), 4096)
		require.NoError(t, err)
		p.Bytes()[0] = byte(i)
		require.Equal(t, byte(i), r.Bytes()[0])
		// A failed Open must not leak either.
		_, err = shm.Open(dupFile(t, r.File()), 8192)
		require.ErrorIs(t, err, shm.ErrSize)
		require.NoError(t, p.Close())
		require.NoError(t, r.Close())
	}
	assert.Equal(t, fds0, countFds(t), "entries in /proc/self/fd")
	assert.Equal(t, maps0, countMemfdMaps(t), "memfd: lines in /proc/self/maps")
	closetest.Collect(t, mapped0) // and the closed regions' addresses once unreachable
}

func assertFdClosed(t *testing.T, fd int) {
	t.Helper()
	_, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	assert.ErrorIs(t, err, unix.EBADF, "fd %d should be closed", fd)
}

func countFds(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	require.NoError(t, err)
	return len(ents)
}

func countMemfdMaps(t *testing.T) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/maps")
	require.NoError(t, err)
	return strings.Count(string(b), "memfd:")
}

// dupForPeer duplicates f's descriptor, as SCM_RIGHTS would for a peer.
func dupForPeer(f *os.File) (*os.File, error) { return closetest.PeerFile(f) }
