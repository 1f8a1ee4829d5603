package control

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// SocketMode is the mode of every socket file Listen creates. Connecting to
// a Unix stream socket needs write permission on it, so only the owner (and
// root) can connect.
const SocketMode = 0o600

// maxSunPath is the usable length of sockaddr_un.sun_path (108 minus NUL).
const maxSunPath = 107

// Config configures Listen. The zero value is the documented defaults.
type Config struct {
	// Policy decides which peers Accept lets through. Nil means the zero
	// Policy: peers with the server's effective uid only.
	Policy *Policy
	// ProbeTimeout bounds the dial that checks whether a server already
	// answers at the path. Zero means one second.
	ProbeTimeout time.Duration
	// Logger receives an audit record (event attestation) for every peer
	// Accept refuses. Nil means slog.Default(). A Server logs the refusals
	// of its own accepts to ServerConfig.Logger instead.
	Logger *slog.Logger
	// InsecurePlaintextLoopback lets ListenTLS listen without TLS, on a
	// loopback address only: no encryption and no peer identity (any
	// local process may connect). For benchmarks and tests; never needed
	// on a Unix socket.
	InsecurePlaintextLoopback bool
}

// Listener is a Unix socket listener that attests every peer (Listen),
// or a TCP listener that authenticates every peer with TLS and its client
// certificate (ListenTLS).
type Listener struct {
	ul       *net.UnixListener
	tl       *net.TCPListener // ListenTLS: ul is nil
	tlsCfg   *tls.Config      // ListenTLS: nil on plaintext loopback
	path     string
	dev, ino uint64   // identity of the socket inode we created
	lock     *os.File // flock held for the listener's lifetime
	policy   Policy
	log      *slog.Logger
	closed   atomic.Bool

	hooks attestHooks // tests only
}

// Listen creates a listening Unix socket at path whose file has mode 0600
// whatever the umask, with no instant at which it is more open:
//
//  1. A private directory (0700, ours) is created next to path.
//  2. The socket is fchmod'ed to 0600 before bind: Linux creates the socket
//     inode with the socket's own mode masked by the umask
//     (net/unix/af_unix.c, unix_bind_bsd), so it is born at most 0600.
//     Nobody else can reach it anyway: it sits in the private directory.
//  3. Inside that directory it is chmod'ed to exactly 0600 (the umask may
//     have removed the owner's bits), checked with lstat, and put in listen
//     state.
//  4. renameat2(RENAME_NOREPLACE) moves it to path atomically: the public
//     name goes from absent to a listening 0600 socket in one step, and never
//     replaces anything.
//
// The umask is never touched: it is process-wide, so changing it would race
// with every other goroutine creating files.
//
// An existing path is handled under an flock on path+".lock" (left in place,
// as removing a lock file races with the next locker): a socket where a
// server answers gives ErrAddrInUse; a socket nobody answers is stale and
// removed; anything else gives ErrNotSocket and is left alone. An empty or
// too long path (os.ErrInvalid), a missing directory (os.ErrNotExist) or
// something other than a socket at path is refused before the lock file
// is created.
func Listen(path string, cfg Config) (_ *Listener, err error) {
	if path == "" {
		return nil, fmt.Errorf("control: listen: empty socket path: %w", os.ErrInvalid)
	}
	path = filepath.Clean(path)
	dir := filepath.Dir(path)
	if len(path) > maxSunPath || len(dir)+len("/.sypas-1234567890/s") > maxSunPath {
		return nil, fmt.Errorf("control: socket path %q too long for sun_path: %w", path, os.ErrInvalid)
	}
	if err := checkSocketPath(path); err != nil {
		return nil, fmt.Errorf("control: listen %s: %w", path, err)
	}
	l := &Listener{path: path, log: cfg.Logger}
	if cfg.Policy != nil {
		l.policy = *cfg.Policy
	}
	defer func() {
		if err != nil {
			err = fmt.Errorf("control: listen %s: %w", path, err)
			if l.lock != nil {
				l.lock.Close()
			}
		}
	}()

	if l.lock, err = lockFile(path + ".lock"); err != nil {
		return nil, err
	}
	probe := cfg.ProbeTimeout
	if probe <= 0 {
		probe = time.Second
	}
	if err := removeStale(path, probe); err != nil {
		return nil, err
	}

	tmp, err := os.MkdirTemp(dir, ".sypas-")
	if err != nil {
		return nil, err
	}
	defer os.Remove(tmp) // empty once the socket has moved out
	// MkdirTemp asks for 0700 and the umask can only remove bits; put the
	// owner's back so a 0777 umask does not lock us out of our own directory.
	if err := os.Chmod(tmp, 0o700); err != nil {
		return nil, err
	}
	tmpSock := filepath.Join(tmp, "s")

	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		return nil, os.NewSyscallError("socket", err)
	}
	f := os.NewFile(uintptr(fd), "unix:"+path)
	defer f.Close() // net.FileListener dups it
	if err := unix.Fchmod(fd, SocketMode); err != nil {
		return nil, os.NewSyscallError("fchmod", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: tmpSock}); err != nil {
		return nil, os.NewSyscallError("bind", err)
	}
	defer os.Remove(tmpSock) // ENOENT after a successful rename
	if err := os.Chmod(tmpSock, SocketMode); err != nil {
		return nil, err
	}
	var st unix.Stat_t
	if err := unix.Lstat(tmpSock, &st); err != nil {
		return nil, os.NewSyscallError("lstat", err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK || st.Mode&0o7777 != SocketMode {
		return nil, fmt.Errorf("control: new socket has mode %#o", st.Mode)
	}
	l.dev, l.ino = st.Dev, st.Ino
	if err := unix.Listen(fd, unix.SOMAXCONN); err != nil {
		return nil, os.NewSyscallError("listen", err)
	}
	ln, err := net.FileListener(f)
	if err != nil {
		return nil, err
	}
	l.ul = ln.(*net.UnixListener)
	if err := renameNoReplace(tmpSock, path); err != nil {
		l.ul.Close()
		return nil, err
	}
	return l, nil
}

// checkSocketPath says what is wrong with path before Listen creates
// anything for it (the lock file beside it): its directory is missing or
// not a directory, or path is something other than a socket. removeStale
// checks path again under the lock.
func checkSocketPath(path string) error {
	dir := filepath.Dir(path)
	var st unix.Stat_t
	switch err := unix.Stat(dir, &st); {
	case err == unix.ENOENT:
		return fmt.Errorf("socket directory %s does not exist: %w", dir, err)
	case err != nil:
		return fmt.Errorf("socket directory %s: %w", dir, err)
	case st.Mode&unix.S_IFMT != unix.S_IFDIR:
		return fmt.Errorf("socket directory %s is not a directory: %w", dir, unix.ENOTDIR)
	}
	if err := unix.Lstat(path, &st); err == nil && st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return ErrNotSocket
	}
	return nil
}

func lockFile(name string) (*os.File, error) {
	f, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, err
	}
	// Undo a restrictive umask so the next server (same uid) can open it.
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		return nil, err
	}
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		f.Close()
		if err == unix.EWOULDBLOCK {
			return nil, fmt.Errorf("%w: %s is locked by another listener", ErrAddrInUse, name)
		}
		return nil, os.NewSyscallError("flock", err)
	}
	return f, nil
}

// removeStale clears path for a new socket. The caller holds the lock, so
// no cooperating Listen can replace the socket between the probe and the
// unlink.
func removeStale(path string, timeout time.Duration) error {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		if err == unix.ENOENT {
			return nil
		}
		return os.NewSyscallError("lstat", err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return ErrNotSocket
	}
	c, err := net.DialTimeout("unix", path, timeout)
	if err == nil {
		c.Close()
		return ErrAddrInUse
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		// EAGAIN (backlog full), a timeout, EACCES...: someone may be there.
		return fmt.Errorf("%w: probe: %w", ErrAddrInUse, err)
	}
	var again unix.Stat_t
	if err := unix.Lstat(path, &again); err != nil {
		if err == unix.ENOENT {
			return nil
		}
		return os.NewSyscallError("lstat", err)
	}
	if again.Dev != st.Dev || again.Ino != st.Ino {
		return fmt.Errorf("%w: %s was replaced while probing", ErrAddrInUse, path)
	}
	if err := unix.Unlink(path); err != nil && err != unix.ENOENT {
		return os.NewSyscallError("unlink", err)
	}
	return nil
}

func renameNoReplace(from, to string) error {
	err := unix.Renameat2(unix.AT_FDCWD, from, unix.AT_FDCWD, to, unix.RENAME_NOREPLACE)
	if err == unix.EINVAL || err == unix.ENOSYS {
		// Filesystem without RENAME_NOREPLACE: link(2) also fails rather
		// than replace, and is atomic.
		if err = unix.Link(from, to); err == nil {
			unix.Unlink(from)
		}
	}
	if err == unix.EEXIST {
		return fmt.Errorf("%w: %s appeared while listening", ErrAddrInUse, to)
	}
	if err != nil {
		return os.NewSyscallError("rename", err)
	}
	return nil
}

// Accept waits for a connection and attests the peer against the policy,
// the attestation bounded by DefaultAttestTimeout. A refused peer gives an
// error wrapping ErrPeerRejected after its connection has been closed; the
// listener stays usable, so callers log and keep accepting.
//
// On a TCP Listener (ListenTLS) attestation is the TLS handshake with its
// verified client certificate and the Policy's certificate rules, bounded
// the same way.
func (l *Listener) Accept() (*Conn, error) {
	c, err := l.acceptConn()
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), DefaultAttestTimeout)
	defer cancel()
	return l.attest(ctx, c, l.log)
}

// acceptConn accepts the next connection, attesting nothing.
func (l *Listener) acceptConn() (net.Conn, error) {
	if l.tl != nil {
		return l.tl.Accept()
	}
	return l.ul.Accept()
}

// attest attests an accepted connection under ctx; it owns c. A refusal is
// recorded in log.
func (l *Listener) attest(ctx context.Context, nc net.Conn, log *slog.Logger) (*Conn, error) {
	c, ok := nc.(*net.UnixConn)
	if !ok {
		return l.attestNet(ctx, nc, log)
	}
	id, pidfd, err := attest(ctx, c, &l.policy, l.hooks)
	if err != nil {
		c.Close()
		if !errors.Is(err, context.Canceled) { // the caller stopped: no refusal
			Audit(ctx, log, slog.LevelWarn, refusedMsg, EventAttestation, err.Error(), PeerAttrs(id)...)
		}
		return nil, err
	}
	return &Conn{Conn: c, Peer: id, pidfd: pidfd, attested: true}, nil
}

// SetDeadline bounds Accept, net.Conn style: zero means none, an expired
// deadline makes Accept fail with os.ErrDeadlineExceeded.
func (l *Listener) SetDeadline(t time.Time) error {
	if l.tl != nil {
		return l.tl.SetDeadline(t)
	}
	return l.ul.SetDeadline(t)
}

// Addr is the socket's public address: the socket file, or the TCP
// address listened on (with the port the system chose for ":0").
func (l *Listener) Addr() net.Addr {
	if l.tl != nil {
		return l.tl.Addr()
	}
	return &net.UnixAddr{Name: l.path, Net: "unix"}
}

// Path is the socket file's path; empty on a TCP Listener.
func (l *Listener) Path() string { return l.path }

// URL is the address a daemon dials (Dial, NewClient): the socket file's
// path, or tcp://host:port.
func (l *Listener) URL() string {
	if l.tl != nil {
		return "tcp://" + l.tl.Addr().String()
	}
	return l.path
}

// Close stops listening and removes the socket file if it is still the
// inode this listener created (a later server's socket is left alone). It
// wakes a blocked Accept and is idempotent.
func (l *Listener) Close() error {
	if !l.closed.CompareAndSwap(false, true) {
		return nil
	}
	if l.tl != nil {
		return l.tl.Close()
	}
	errs := []error{l.ul.Close()}
	var st unix.Stat_t
	if err := unix.Lstat(l.path, &st); err == nil && st.Dev == l.dev && st.Ino == l.ino {
		if err := unix.Unlink(l.path); err != nil && err != unix.ENOENT {
			errs = append(errs, os.NewSyscallError("unlink", err))
		}
	}
	errs = append(errs, l.lock.Close()) // after the unlink: the next server waits for it
	return errors.Join(errs...)
}

// Conn is an accepted, attested connection: a *net.UnixConn from Listen,
// a *tls.Conn (or, plaintext loopback, a *net.TCPConn) from ListenTLS.
type Conn struct {
	net.Conn
	// Peer is who connected, as attested at Accept.
	Peer     PeerIdentity
	pidfd    *os.File // Unix peers
	attested bool     // made by a Listener: Server.Handshake trusts Peer
}

// Unix is the connection as a Unix socket, or nil on TCP.
func (c *Conn) Unix() *net.UnixConn {
	uc, _ := c.Conn.(*net.UnixConn)
	return uc
}

// PidFD is a pidfd for the peer process: it polls readable once the peer
// exits, which is how the kernel notices a dead daemon without waiting for a
// heartbeat. Owned by the Conn; do not close it. Nil on TCP.
func (c *Conn) PidFD() *os.File { return c.pidfd }

// Close closes the connection and the pidfd.
func (c *Conn) Close() error {
	err := closeConn(c.Conn)
	if c.pidfd != nil {
		err = errors.Join(err, c.pidfd.Close())
	}
	return err
}
