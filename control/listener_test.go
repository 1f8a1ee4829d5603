package control

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

func sockPath(t testing.TB) string { return filepath.Join(t.TempDir(), "k.sock") }

func TestListenModeWhateverUmask(t *testing.T) {
	for _, m := range []int{0, 0o022, 0o077, 0o777} {
		withUmask(m, func() {
			path := sockPath(t)
			l, err := Listen(path, Config{})
			require.NoError(t, err, "umask %#o", m)
			defer l.Close()
			st, err := os.Lstat(path)
			require.NoError(t, err)
			assert.Equal(t, os.ModeSocket|0o600, st.Mode()&(os.ModeType|os.ModePerm), "umask %#o", m)
			lock, err := os.Lstat(path + ".lock")
			require.NoError(t, err)
			assert.Equal(t, os.FileMode(0o600), lock.Mode().Perm())
			// No temporary directory left behind.
			ents, err := os.ReadDir(filepath.Dir(path))
			require.NoError(t, err)
			for _, e := range ents {
				assert.False(t, strings.HasPrefix(e.Name(), ".sypas-"), e.Name())
			}
			// It works: a client connects and the same-uid peer is accepted.
			go func() {
				c, err := net.Dial("unix", path)
				if err == nil {
					defer c.Close()
					c.Read(make([]byte, 1))
				}
			}()
			c, err := l.Accept()
			require.NoError(t, err)
			assert.Equal(t, os.Getpid(), c.Peer.PID)
			c.Close()
		})
	}
}

// Listen names what is wrong with a bad path, and creates nothing for it:
// it used to blame "k.sock.lock" for a missing directory, and to call an
// empty path "path exists and is not a socket" after creating "..lock" in
// the working directory.
func TestListenBadPath(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	require.NoError(t, os.WriteFile(file, nil, 0o600))
	for _, tc := range []struct {
		name, path string
		want       error
		says       string
	}{
		{"empty", "", os.ErrInvalid, "empty socket path"},
		{"missing directory", filepath.Join(dir, "missing", "k.sock"), os.ErrNotExist, "directory " + filepath.Join(dir, "missing") + " does not exist"},
		{"parent is a file", filepath.Join(file, "k.sock"), syscall.ENOTDIR, file + " is not a directory"},
		{"too long", filepath.Join(dir, strings.Repeat("x", 120)), os.ErrInvalid, "too long"},
		{"a directory", dir, ErrNotSocket, "not a socket"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Chdir(dir)
			before, err := os.ReadDir(dir)
			require.NoError(t, err)
			l, err := Listen(tc.path, Config{})
			if l != nil {
				l.Close()
			}
			require.ErrorIs(t, err, tc.want)
			assert.ErrorContains(t, err, tc.says)
			assert.NotContains(t, err.Error(), ".lock")
			t.Log(err)
			after, err := os.ReadDir(dir)
			require.NoError(t, err)
			assert.Equal(t, before, after, "nothing created")
			assert.NoFileExists(t, filepath.Clean(tc.path)+".lock")
		})
	}
}

func TestListenRefusesLiveServer(t *testing.T) {
	path := sockPath(t)
	// A server that does not use our lock: the probe must find it.
	other, err := net.Listen("unix", path)
	require.NoError(t, err)
	defer other.Close()
	_, err = Listen(path, Config{})
	assert.ErrorIs(t, err, ErrAddrInUse)
	_, err = os.Lstat(path)
	assert.NoError(t, err, "live socket must not be removed")

	// Another Listener on the same path: refused by its lock.
	path2 := sockPath(t)
	l, err := Listen(path2, Config{})
	require.NoError(t, err)
	defer l.Close()
	_, err = Listen(path2, Config{})
	assert.ErrorIs(t, err, ErrAddrInUse)
}

func TestListenRemovesStaleSocket(t *testing.T) {
	path := sockPath(t)
	// A socket file with nobody listening: bind without listen.
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	require.NoError(t, err)
	require.NoError(t, unix.Bind(fd, &unix.SockaddrUnix{Name: path}))
	unix.Close(fd)
	var before unix.Stat_t
	require.NoError(t, unix.Lstat(path, &before))

	l, err := Listen(path, Config{})
	require.NoError(t, err)
	defer l.Close()
	var after unix.Stat_t
	require.NoError(t, unix.Lstat(path, &after))
	assert.NotEqual(t, before.Ino, after.Ino, "stale socket replaced")
	assert.Equal(t, l.ino, after.Ino)
}

func TestListenRefusesNonSocket(t *testing.T) {
	for name, mk := range map[string]func(string) error{
		"file":    func(p string) error { return os.WriteFile(p, []byte("keep me"), 0o600) },
		"dir":     func(p string) error { return os.Mkdir(p, 0o700) },
		"symlink": func(p string) error { return os.Symlink("/nonexistent", p) },
		"fifo":    func(p string) error { return unix.Mkfifo(p, 0o600) },
	} {
		path := sockPath(t)
		require.NoError(t, mk(path), name)
		_, err := Listen(path, Config{})
		assert.ErrorIs(t, err, ErrNotSocket, name)
		_, err = os.Lstat(path)
		assert.NoError(t, err, "%s must be left alone", name)
		if name == "file" {
			b, err := os.ReadFile(path)
			require.NoError(t, err)
			assert.Equal(t, "keep me", string(b))
		}
	}
}

func TestListenPathTooLong(t *testing.T) {
	_, err := Listen("/tmp/"+strings.Repeat("x", 120), Config{})
	assert.Error(t, err)
}

func TestCloseRemovesOnlyOwnSocket(t *testing.T) {
	path := sockPath(t)
	l, err := Listen(path, Config{})
	require.NoError(t, err)
	require.NoError(t, l.Close())
	_, err = os.Lstat(path)
	assert.ErrorIs(t, err, os.ErrNotExist)
	assert.NoError(t, l.Close(), "Close is idempotent")

	// Someone replaced our socket: Close must leave theirs in place.
	l, err = Listen(path, Config{})
	require.NoError(t, err)
	require.NoError(t, os.Remove(path))
	other, err := net.Listen("unix", path)
	require.NoError(t, err)
	defer other.Close()
	require.NoError(t, l.Close())
	_, err = os.Lstat(path)
	assert.NoError(t, err)

	// The lock is released: a new Listener can take the path once the
	// other server is gone.
	other.Close()
	l, err = Listen(path, Config{})
	require.NoError(t, err)
	l.Close()
}

func TestAcceptDeadlineAndClose(t *testing.T) {
	l, err := Listen(sockPath(t), Config{})
	require.NoError(t, err)
	defer l.Close()
	require.NoError(t, l.SetDeadline(time.Now().Add(20*time.Millisecond)))
	_, err = l.Accept()
	assert.ErrorIs(t, err, os.ErrDeadlineExceeded)

	require.NoError(t, l.SetDeadline(time.Time{}))
	done := make(chan error, 1)
	go func() { _, err := l.Accept(); done <- err }()
	time.Sleep(10 * time.Millisecond)
	require.NoError(t, l.Close())
	select {
	case err := <-done:
		assert.ErrorIs(t, err, net.ErrClosed)
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not wake Accept")
	}
	assert.Equal(t, l.Path(), l.Addr().String())
}

func TestAcceptRejectedPeerKeepsListener(t *testing.T) {
	path := sockPath(t)
	l, err := Listen(path, Config{Policy: &Policy{UIDs: []uint32{12345}}})
	require.NoError(t, err)
	defer l.Close()
	client, err := net.Dial("unix", path)
	require.NoError(t, err)
	defer client.Close()
	_, err = l.Accept()
	require.ErrorIs(t, err, ErrPeerRejected)
	assert.Contains(t, err.Error(), "uid")
	// The server closed the connection.
	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = client.Read(make([]byte, 1))
	assert.True(t, errors.Is(err, syscall.ECONNRESET) || err.Error() == "EOF", "%v", err)

	// And still accepts.
	l.policy = Policy{}
	c2, err := net.Dial("unix", path)
	require.NoError(t, err)
	defer c2.Close()
	c, err := l.Accept()
	require.NoError(t, err)
	c.Close()
}
