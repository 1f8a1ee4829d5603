package control

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sypas/go/control/token"
)

// PeerIdentity is what attestation established about the process at the
// other end of a connection. A token's Subject binds to it.
//
// A peer on a Unix socket is a process (UID, GID, PID, Exe, ExeSHA256,
// from SO_PEERCRED and its pidfd). A peer on TCP (or gRPC) has no uid
// across hosts: UID and GID are NoUID, PID is 0, Remote is its network
// address, and Cert is the client certificate TLS verified (nil on a
// plaintext loopback connection).
type PeerIdentity struct {
	UID, GID  uint32
	PID       int
	Exe       string   // target of /proc/<pid>/exe
	ExeSHA256 [32]byte // digest of the file /proc/<pid>/exe opens
	// Remote is the peer's network address (TCP, gRPC); empty on a Unix
	// socket.
	Remote string
	// Cert is the identity of the verified client certificate of a peer
	// on TLS; nil on a Unix socket and on plaintext TCP.
	Cert *CertIdentity
}

// NoUID is the UID and GID of a peer that is not a local process (TCP,
// gRPC): (uid_t)-1, which no Linux process can have (setuid(-1) means
// "unchanged"), so no uid rule or token of a local peer ever matches it.
const NoUID = math.MaxUint32

// CertIdentity is what a verified client certificate says about its
// holder: the attested identity of a peer on TLS (docs/SECURITY.md).
type CertIdentity struct {
	// URIs are the certificate's URI SANs (a SPIFFE id, say), as strings.
	URIs []string
	// Subject is the certificate subject's distinguished name
	// (pkix.Name.String, RFC 2253 order: "CN=daemon,O=example").
	Subject string
	// SHA256 is the digest of the leaf certificate (DER): the token
	// subject of the session binds to this one certificate.
	SHA256 [32]byte
}

// Local reports whether p is a process on this host (a Unix socket
// peer, attested through SO_PEERCRED), not a network peer.
func (p PeerIdentity) Local() bool { return p.Remote == "" && p.Cert == nil && p.UID != NoUID }

// Subject is the token subject for this peer. A network peer's is uid and
// gid NoUID, pid 0, and in place of the executable digest its
// certificate's SHA-256 (all zero on plaintext TCP): a token minted for
// it matches no local process, and no other certificate
// (docs/PROTOCOL.md §6.6).
func (p PeerIdentity) Subject() token.Subject {
	if p.Cert != nil {
		return token.Subject{UID: NoUID, GID: NoUID, ExeSHA256: p.Cert.SHA256}
	}
	return token.Subject{UID: p.UID, GID: p.GID, PID: uint32(p.PID), ExeSHA256: p.ExeSHA256}
}

// Policy decides which peers are accepted. Every non-empty list must
// contain the peer's value (AND). The zero Policy accepts only processes
// with the server's effective uid: a uid that could already ptrace the
// server gains nothing by talking to it, and anything wider must be said
// explicitly.
//
// The uid is the security boundary. ExePaths and ExeSHA256 describe the
// program the connecting process runs at the moment it is attested, not the
// code that will use the connection: any process of an allowed uid can hand
// its socket to other code (fork a child that keeps it, then execve an
// allowlisted binary; pass it with SCM_RIGHTS), and no kernel API prevents
// that. Use them to catch the wrong program of a trusted uid, not to contain
// a hostile one (docs/SECURITY.md §3.2).
//
// Peers on TLS (ListenTLS, and gRPC) are admitted by their verified client
// certificate instead, and only by an explicit rule: a certificate is
// admitted if one of its URI SANs is in CertURIs or its subject is in
// CertSubjects. With both empty no certificate is admitted (ListenTLS
// refuses such a Policy up front). The Unix rules do not apply to them,
// nor the certificate rules to Unix peers.
type Policy struct {
	UIDs      []uint32   // empty: the server's effective uid only
	GIDs      []uint32   // empty: any primary gid (the uid is the principal)
	ExePaths  []string   // empty: any executable path (of the process at attestation)
	ExeSHA256 [][32]byte // empty: any executable content (of the process at attestation)

	CertURIs     []string // URI SANs admitted (exact match), e.g. "spiffe://example.org/daemon"
	CertSubjects []string // certificate subjects admitted (exact match of pkix.Name.String)
}

// allowsUID reports whether p admits uid (an empty UIDs: the server's
// effective uid).
func (p *Policy) allowsUID(uid uint32) bool {
	if len(p.UIDs) == 0 {
		return uid == uint32(os.Geteuid())
	}
	return slices.Contains(p.UIDs, uid)
}

// Attest identifies the peer of conn and checks it against p (nil: the zero
// Policy). It returns the identity and a pidfd for the peer process, which
// the caller owns and must close. Every refusal wraps ErrPeerRejected.
//
// Order matters. The pidfd is taken first and pins the process; the uid,
// gid, executable path and digest are then read through /proc/<pid>; last,
// the pidfd must show the process still alive and unreaped. A pid is only
// reused after its process is reaped, so if it is alive after the reads,
// every /proc/<pid> read described that same process, never a recycled pid.
func Attest(conn *net.UnixConn, p *Policy) (PeerIdentity, *os.File, error) {
	ctx, cancel := context.WithTimeout(context.Background(), DefaultAttestTimeout)
	defer cancel()
	return AttestContext(ctx, conn, p)
}

// AttestContext is Attest bounded by ctx: the executable is hashed in
// chunks with ctx checked between them, and a ctx that ends before the
// final liveness check refuses the peer (the error wraps ErrPeerRejected
// and ctx's error). A read that blocks inside the operating system (a hung
// FUSE mount) is not interrupted.
func AttestContext(ctx context.Context, conn *net.UnixConn, p *Policy) (PeerIdentity, *os.File, error) {
	if p == nil {
		p = &Policy{}
	}
	return attest(ctx, conn, p, attestHooks{})
}

// DefaultAttestTimeout bounds Attest and Listener.Accept's attestation.
const DefaultAttestTimeout = 5 * time.Second

// MaxExeSize bounds the executable attestation hashes: a larger one is
// refused rather than read for seconds while Accept waits. Digests are
// cached by file version, so a binary is normally read once.
const MaxExeSize = 1 << 30

// attestHooks let tests force the pidfd_open fallback and act between the
// /proc reads and the liveness check.
type attestHooks struct {
	forcePidfdOpen bool
	beforeLiveness func()
}

func reject(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrPeerRejected}, args...)...)
}

func attest(ctx context.Context, conn *net.UnixConn, p *Policy, hooks attestHooks) (id PeerIdentity, pidfd *os.File, err error) {
	accepted := bootTime() // the peer's connect(2) came before this
	raw, err := conn.SyscallConn()
	if err != nil {
		return id, nil, reject("%w", err)
	}
	var (
		cred    *unix.Ucred
		credErr error
		pfd           = -1
		pfdErr  error = unix.ENOPROTOOPT
	)
	err = raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		if !hooks.forcePidfdOpen {
			// Linux >= 6.5: a pidfd for the process that called connect(2).
			pfd, pfdErr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PEERPIDFD)
		}
	})
	if pfd >= 0 {
		pidfd = os.NewFile(uintptr(pfd), "pidfd")
	}
	defer func() {
		if err != nil && pidfd != nil {
			pidfd.Close()
			pidfd = nil
		}
	}()
	if err != nil {
		return id, pidfd, reject("socket: %w", err)
	}
	if credErr != nil {
		return id, pidfd, reject("SO_PEERCRED: %w", credErr)
	}
	if cred.Pid <= 0 { // 0: the peer is outside our pid namespace
		return id, pidfd, reject("peer pid %d not visible", cred.Pid)
	}
	id = PeerIdentity{UID: cred.Uid, GID: cred.Gid, PID: int(cred.Pid)}

	if pidfd == nil {
		if pfdErr != unix.ENOPROTOOPT {
			// Not an old kernel: the peer is already gone (or worse).
			return id, nil, reject("SO_PEERPIDFD: %w", pfdErr)
		}
		// Fallback for kernels before 6.5. Weaker: the peer may have died
		// and its pid been reused between connect(2) and here. A process
		// started after accept cannot be the one that connected; one
		// started between connect and accept goes unnoticed. See
		// docs/SECURITY.md.
		fd, err := unix.PidfdOpen(id.PID, 0)
		if err != nil {
			return id, nil, reject("pidfd_open(%d): %w", id.PID, err)
		}
		pidfd = os.NewFile(uintptr(fd), "pidfd")
		started, err := startTime(id.PID)
		if err != nil {
			return id, pidfd, reject("start time of %d: %w", id.PID, err)
		}
		if started > accepted+clockTick {
			return id, pidfd, reject("pid %d started after accept: recycled", id.PID)
		}
	}
	// The pidfd must name the pid SO_PEERCRED reported (-1 once reaped).
	if got, err := pidfdPid(pidfd); err != nil || got != id.PID {
		return id, pidfd, reject("pidfd names pid %d, SO_PEERCRED pid %d: %v", got, id.PID, err)
	}

	if !p.allowsUID(id.UID) {
		return id, pidfd, reject("uid %d not allowed", id.UID)
	}
	if len(p.GIDs) > 0 && !slices.Contains(p.GIDs, id.GID) {
		return id, pidfd, reject("gid %d not allowed", id.GID)
	}

	exeLink := "/proc/" + strconv.Itoa(id.PID) + "/exe"
	if id.Exe, err = os.Readlink(exeLink); err != nil {
		return id, pidfd, reject("%w", err)
	}
	if len(p.ExePaths) > 0 && !slices.Contains(p.ExePaths, id.Exe) {
		return id, pidfd, reject("executable %q not allowed", id.Exe)
	}
	if id.ExeSHA256, err = hashFile(ctx, exeLink); err != nil {
		return id, pidfd, reject("hash executable: %w", err)
	}
	if len(p.ExeSHA256) > 0 && !slices.Contains(p.ExeSHA256, id.ExeSHA256) {
		return id, pidfd, reject("executable digest %x not allowed", id.ExeSHA256)
	}

	if hooks.beforeLiveness != nil {
		hooks.beforeLiveness()
	}
	if err := ctx.Err(); err != nil {
		return id, pidfd, reject("attestation took too long: %w", err)
	}
	// Last: everything above described this process only if it has not
	// exited (and so could not have been reaped and its pid reused).
	if err := pidfdAlive(pidfd); err != nil {
		return id, pidfd, reject("peer exited during attestation (pid may be recycled): %w", err)
	}
	return id, pidfd, nil
}

// clockTick is the resolution of /proc/<pid>/stat start times (USER_HZ is
// 100 on every Linux architecture).
const clockTick = 10 * time.Millisecond

// bootTime is CLOCK_BOOTTIME, the clock of /proc/<pid>/stat start times.
func bootTime() time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return 1<<63 - 1 // never reject on a clock failure; pidfd checks remain
	}
	return time.Duration(ts.Nano())
}

// startTime is when process pid started, since boot (field 22 of
// /proc/<pid>/stat, counted after the parenthesised command name, which may
// itself contain spaces and parentheses).
func startTime(pid int) (time.Duration, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, errors.New("malformed stat")
	}
	f := strings.Fields(string(b[i+1:])) // f[0] is field 3 (state)
	if len(f) < 20 {
		return 0, errors.New("malformed stat")
	}
	ticks, err := strconv.ParseUint(f[19], 10, 63)
	if err != nil {
		return 0, err
	}
	return time.Duration(ticks) * clockTick, nil
}

// hashFile hashes the file the magic link opens: the executable the process
// runs now, even if its path has since been replaced. Files above
// MaxExeSize are refused; ctx is checked between chunks.
func hashFile(ctx context.Context, name string) ([32]byte, error) {
	var sum [32]byte
	f, err := os.Open(name)
	if err != nil {
		return sum, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return sum, err
	}
	if !st.Mode().IsRegular() {
		return sum, fmt.Errorf("%s is not a regular file", name)
	}
	if st.Size() > MaxExeSize {
		return sum, fmt.Errorf("%s: executable of %d bytes, at most %d are hashed", name, st.Size(), MaxExeSize)
	}
	key, cacheable := exeKeyOf(st)
	if cacheable {
		if sum, ok := exeDigests.get(key); ok {
			return sum, nil
		}
	}
	h := sha256.New()
	buf := make([]byte, 1<<20)
	// One byte past the limit: a file that grew since Stat is refused too.
	r := io.LimitReader(f, MaxExeSize+1)
	var total int64
	for {
		if err := ctx.Err(); err != nil {
			return sum, fmt.Errorf("hashing %s: %w", name, err)
		}
		n, err := r.Read(buf)
		h.Write(buf[:n])
		total += int64(n)
		if err == io.EOF {
			break
		}
		if err != nil {
			return sum, err
		}
	}
	if total > MaxExeSize {
		return sum, fmt.Errorf("%s grew past %d bytes while hashed", name, MaxExeSize)
	}
	h.Sum(sum[:0])
	if cacheable {
		exeDigests.put(key, sum)
	}
	return sum, nil
}

// exeKey identifies one version of a file's content: any write changes the
// inode's ctime, which no unprivileged process can set, and a new file on a
// reused inode number gets a new ctime.
type exeKey struct {
	dev, ino, size uint64
	ctime, mtime   unix.Timespec
}

// exeCacheMinAge: files changed less than this long ago are hashed every
// time. Timestamps may be coarse (a jiffy): a write in the same tick as the
// change we hashed after could leave ctime unchanged. A file older than this
// gets a strictly later ctime from any write.
const exeCacheMinAge = time.Second

func exeKeyOf(fi os.FileInfo) (exeKey, bool) {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return exeKey{}, false
	}
	k := exeKey{dev: uint64(st.Dev), ino: st.Ino, size: uint64(st.Size),
		ctime: unix.Timespec(st.Ctim), mtime: unix.Timespec(st.Mtim)}
	age := time.Since(time.Unix(st.Ctim.Unix()))
	return k, age >= exeCacheMinAge
}

// exeDigests caches executable digests so a daemon that reconnects, or many
// processes of one binary, are hashed once instead of at every accept.
var exeDigests = digestCache{m: make(map[exeKey][32]byte)}

const maxCachedDigests = 256

type digestCache struct {
	mu sync.Mutex
	m  map[exeKey][32]byte
}

func (c *digestCache) get(k exeKey) ([32]byte, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	sum, ok := c.m[k]
	return sum, ok
}

func (c *digestCache) put(k exeKey, sum [32]byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.m) >= maxCachedDigests {
		clear(c.m) // simple bound; a miss only costs a hash
	}
	c.m[k] = sum
}

// pidfdPid reads the pid a pidfd refers to from /proc/self/fdinfo: -1 if
// the process has been reaped.
func pidfdPid(pidfd *os.File) (int, error) {
	b, err := os.ReadFile("/proc/self/fdinfo/" + strconv.Itoa(int(pidfd.Fd())))
	if err != nil {
		return 0, err
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		if v, ok := bytes.CutPrefix(sc.Bytes(), []byte("Pid:")); ok {
			return strconv.Atoi(string(bytes.TrimSpace(v)))
		}
	}
	return 0, errors.New("no Pid in pidfd fdinfo")
}

// pidfdSignal is pidfd_send_signal: a variable so a test can make it fail
// with EPERM, which a test running as root never sees.
var pidfdSignal = unix.PidfdSendSignal

// pidfdAlive fails if the process has exited: a pidfd polls readable once
// its process exits, and signal 0 fails with ESRCH once it is reaped. EPERM
// (a peer of another uid, and we lack CAP_KILL) means the process exists.
func pidfdAlive(pidfd *os.File) error {
	fd := int(pidfd.Fd())
	pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	for {
		n, err := unix.Poll(pfd, 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return os.NewSyscallError("poll", err)
		}
		if n > 0 {
			return errors.New("pidfd readable: process exited")
		}
		break
	}
	if err := pidfdSignal(fd, 0, nil, 0); err != nil && err != unix.EPERM {
		return os.NewSyscallError("pidfd_send_signal", err)
	}
	return nil
}

// CheckServer is the daemon side: it accepts the server at the other end of
// conn only if its uid is in allowedUIDs. Empty means uid 0 and the daemon's
// own effective uid (a same-uid impostor could ptrace the daemon anyway).
// A refusal wraps ErrPeerRejected.
func CheckServer(conn *net.UnixConn, allowedUIDs ...uint32) error {
	cred, err := peerCred(conn)
	if err != nil {
		return err
	}
	if len(allowedUIDs) == 0 {
		allowedUIDs = []uint32{0, uint32(os.Geteuid())}
	}
	if !slices.Contains(allowedUIDs, cred.Uid) {
		return reject("server uid %d not allowed", cred.Uid)
	}
	return nil
}

// peerCred is SO_PEERCRED of conn: what the operating system recorded of
// the peer at connect(2) (or listen(2)), nothing the peer claims. Errors
// wrap ErrPeerRejected.
func peerCred(conn *net.UnixConn) (*unix.Ucred, error) {
	raw, err := conn.SyscallConn()
	if err != nil {
		return nil, reject("%w", err)
	}
	var (
		cred    *unix.Ucred
		credErr = net.ErrClosed
	)
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, reject("%w", err)
	}
	if credErr != nil {
		return nil, reject("SO_PEERCRED: %w", credErr)
	}
	return cred, nil
}
