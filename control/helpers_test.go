package control

import (
	"crypto/sha256"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

var pollerOnce sync.Once

// countFDs is the number of open descriptors of this process.
func countFDs(t *testing.T) int {
	t.Helper()
	pollerOnce.Do(func() {
		// The runtime's poller opens its epoll and wake-up descriptors
		// on first use, for good: a count taken before it would see them
		// as a leak.
		r, w, err := os.Pipe()
		require.NoError(t, err)
		r.SetDeadline(time.Now())
		r.Close()
		w.Close()
	})
	ents, err := os.ReadDir("/proc/self/fd")
	require.NoError(t, err)
	return len(ents)
}

// socketPair returns two connected Unix stream sockets.
func socketPair(t *testing.T) (*net.UnixConn, *net.UnixConn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	require.NoError(t, err)
	conv := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "socketpair")
		defer f.Close()
		c, err := net.FileConn(f)
		require.NoError(t, err)
		return c.(*net.UnixConn)
	}
	a, b := conv(fds[0]), conv(fds[1])
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

// memfd returns a memfd holding content.
func memfd(t *testing.T, content string) *os.File {
	t.Helper()
	fd, err := unix.MemfdCreate("sypas-test", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	require.NoError(t, err)
	f := os.NewFile(uintptr(fd), "memfd")
	t.Cleanup(func() { f.Close() })
	_, err = f.WriteString(content)
	require.NoError(t, err)
	return f
}

func readAll(t *testing.T, f *os.File) string {
	t.Helper()
	b, err := io.ReadAll(io.NewSectionReader(f, 0, 1<<20))
	require.NoError(t, err)
	return string(b)
}

// testExe is the running test binary, resolved, and its digest.
func testExe(t *testing.T) (string, [32]byte) {
	t.Helper()
	exe, err := os.Executable()
	require.NoError(t, err)
	exe, err = filepath.EvalSymlinks(exe)
	require.NoError(t, err)
	b, err := os.ReadFile(exe)
	require.NoError(t, err)
	return exe, sha256.Sum256(b)
}

// withUmask runs fn under umask m and restores the old one.
func withUmask(m int, fn func()) {
	old := syscall.Umask(m)
	defer syscall.Umask(old)
	fn()
}
