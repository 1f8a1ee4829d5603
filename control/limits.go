package control

import (
	"cmp"
	"encoding/binary"
	"fmt"
	"math"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sypas/go/wire"
)

// Limits bound what the daemons, one uid and all together, can make the
// kernel hold or do (docs/SECURITY.md §9). The zero value is the defaults
// below; a negative field is refused with ErrConfig. A refused connection
// gets ERROR E_RESOURCE with the reason (and a retry_after hint), so its
// Dial fails with an error matching wire.ErrResource; each refusal is one
// audit record (event limit, key limit naming the field).
type Limits struct {
	// MaxSessions bounds the kernel's sessions, handshakes in progress
	// included. A session holds 5 descriptors (socket, pidfd and its
	// watcher, two ring memfds), 7 with BULK (its bulk memfd and the
	// daemon's), 2 mappings (4 with BULK) and its ring memory until it is
	// closed. Zero means DefaultMaxSessions.
	MaxSessions int
	// MaxSessionsPerUID bounds the sessions of one daemon uid (of one
	// remote host, on TCP: a connection is counted before TLS says who it
	// is). Zero means DefaultMaxSessionsPerUID.
	MaxSessionsPerUID int
	// MaxHandshakes bounds the connections accepted and not yet in
	// OPERATION (each is bounded by HandshakeTimeout). Serve accepts no
	// more while this many are in progress; Accept and Handshake refuse.
	// Zero means DefaultMaxHandshakes.
	MaxHandshakes int
	// MaxHandshakesPerUID bounds one uid's (one remote host's)
	// handshakes in progress, so a daemon that connects and sends nothing
	// holds at most this many slots.
	// Zero means DefaultMaxHandshakesPerUID.
	MaxHandshakesPerUID int
	// FDReserve is the kernel's own descriptor headroom: a connection is
	// refused while fewer than FDReserve + 8 per handshake in progress (this
	// one included) are free under RLIMIT_NOFILE, so sessions never take
	// the descriptors the rest of the process needs. Zero means
	// DefaultFDReserve.
	FDReserve int
	// MaxRefreshes TOKEN_REFRESH per RefreshInterval are served per session
	// (a token bucket: bursts of MaxRefreshes, refilled evenly); beyond it
	// a refresh is answered ERROR E_RESOURCE with retry_after, and the
	// session stays. Each costs two HMACs and a write. Zero means
	// DefaultMaxRefreshes and the token TTL.
	MaxRefreshes    int
	RefreshInterval time.Duration
	// MaxControlFrames bounds the frames a daemon sends on the socket per
	// heartbeat interval (bursts of that many, refilled evenly); beyond it
	// the session ends with ERROR E_RESOURCE. Zero means
	// DefaultMaxControlFrames.
	MaxControlFrames int
}

// Defaults of Limits. A daemon normally holds one session per Client and
// does one handshake at a time; the defaults leave it a wide margin and
// bound what a misbehaving one can take (docs/SECURITY.md §9).
const (
	// 1024 sessions hold 5,120 descriptors and 2,048 mappings (the default
	// vm.max_map_count is 65,530), and 512 MiB of rings at the default
	// ring size; a daemon may ask for rings up to MaxRingSize (16 MiB per
	// direction by default), whose pages are only committed when written.
	DefaultMaxSessions = 1024
	// One uid may hold an eighth of them. The default Policy admits only
	// the kernel's own uid, so there it is also the bound on all daemons.
	DefaultMaxSessionsPerUID = 128
	// A legitimate handshake takes about a millisecond; 64 in progress
	// absorb every daemon of a host reconnecting at once.
	DefaultMaxHandshakes = 64
	// Eight per uid: a silent daemon holds 8 goroutines and 8 sockets for
	// HandshakeTimeout, others keep 56.
	DefaultMaxHandshakesPerUID = 8
	// 128 descriptors for the rest of the kernel process (logs, listeners,
	// files it serves).
	DefaultFDReserve = 128
	// A daemon refreshes once per 0.75 × TTL; ten per TTL is 7.5 times that.
	DefaultMaxRefreshes = 10
	// A daemon sends about two frames per heartbeat interval (its
	// heartbeat and the answer to ours); 64 is 32 times that.
	DefaultMaxControlFrames = 64

	// fdsPerSession is what one connection may need at its peak: the 7 a
	// session with BULK holds, plus a file attestation opens for a moment.
	fdsPerSession = 8
)

func (l Limits) withDefaults(tokenTTL time.Duration) Limits {
	l.MaxSessions = cmp.Or(l.MaxSessions, DefaultMaxSessions)
	l.MaxSessionsPerUID = cmp.Or(l.MaxSessionsPerUID, DefaultMaxSessionsPerUID)
	l.MaxHandshakes = cmp.Or(l.MaxHandshakes, DefaultMaxHandshakes)
	l.MaxHandshakesPerUID = cmp.Or(l.MaxHandshakesPerUID, DefaultMaxHandshakesPerUID)
	l.FDReserve = cmp.Or(l.FDReserve, DefaultFDReserve)
	l.MaxRefreshes = cmp.Or(l.MaxRefreshes, DefaultMaxRefreshes)
	l.RefreshInterval = cmp.Or(l.RefreshInterval, tokenTTL)
	l.MaxControlFrames = cmp.Or(l.MaxControlFrames, DefaultMaxControlFrames)
	return l
}

// minControlFrames is the least MaxControlFrames that a well-behaved daemon
// stays under: per heartbeat interval it sends its HEARTBEAT and the answer
// to ours, and now and then a TOKEN_REFRESH or GOAWAY.
const minControlFrames = 4

// validate checks l, with its defaults filled in, for a server whose tokens
// live tokenTTL: a limit that every well-behaved daemon would hit is refused
// rather than left to end healthy sessions.
func (l Limits) validate(tokenTTL time.Duration) error {
	n := func(name string, v int) numField { return numField{name, int64(v)} }
	if err := negative("ServerConfig.Limits.", n("MaxSessions", l.MaxSessions), n("MaxSessionsPerUID", l.MaxSessionsPerUID),
		n("MaxHandshakes", l.MaxHandshakes), n("MaxHandshakesPerUID", l.MaxHandshakesPerUID),
		n("FDReserve", l.FDReserve), n("MaxRefreshes", l.MaxRefreshes),
		durField("RefreshInterval", l.RefreshInterval), n("MaxControlFrames", l.MaxControlFrames)); err != nil {
		return err
	}
	switch {
	case l.MaxControlFrames < minControlFrames:
		return configErr("ServerConfig.Limits.MaxControlFrames", "%d: a daemon sends up to %d frames per heartbeat interval", l.MaxControlFrames, minControlFrames)
	case float64(l.MaxRefreshes)*float64(tokenTTL) < 2*float64(l.RefreshInterval):
		// A daemon refreshes once per 0.75 × TTL (and the Go daemon ends
		// its session when a refresh is refused): allow two per TTL.
		return configErr("ServerConfig.Limits.MaxRefreshes", "%d per %v: below two per token TTL (%v), which a daemon refreshing at 75 %% of each token's life needs",
			l.MaxRefreshes, l.RefreshInterval, tokenTTL)
	}
	return nil
}

// limitError is a refusal by one of Limits; Field names it. It matches
// errLimit.
type limitError struct{ field string }

func (e *limitError) Error() string        { return "control: limit " + e.field + " reached" }
func (e *limitError) Is(target error) bool { return target == errLimit }

// limitErr is the E_RESOURCE refusal by limit field, with its reason for
// the peer and a retry hint.
func limitErr(field string, retry time.Duration, format string, args ...any) error {
	return &wire.Error{Code: wire.CodeResource, Message: fmt.Sprintf(format, args...) + " (" + field + ")",
		RetryAfter: retry, Err: &limitError{field}}
}

// Retry hints of the refusals at accept: handshakes end within
// milliseconds normally, sessions and descriptors when a daemon leaves.
const (
	retryHandshake = 100 * time.Millisecond
	retrySession   = time.Second
)

// admission counts sessions and handshakes in progress, in all and per
// uid, and refuses what Limits forbid. Safe for concurrent use.
type admission struct {
	lim Limits

	mu         sync.Mutex
	sessions   int
	handshakes int
	uids       map[principal]*uidUse
	room       chan struct{} // closed and replaced when a handshake ends
	fdBuf      []byte        // getdents buffer, under mu
	// headroom returns the free descriptors under RLIMIT_NOFILE; tests
	// replace it.
	headroom func(buf []byte) (int, error)
}

type uidUse struct{ sessions, handshakes int }

// principal is whom the per-uid Limits count a connection under: its uid
// (a Unix peer), or its remote host (a network peer, whose uid is NoUID).
type principal struct {
	uid  uint32
	host string
}

func principalOf(p PeerIdentity) principal {
	if p.Local() {
		return principal{uid: p.UID}
	}
	return principal{uid: NoUID, host: hostOfString(p.Remote)}
}

func (p principal) String() string {
	if p.uid == NoUID {
		return "host " + p.host
	}
	return "uid " + strconv.FormatUint(uint64(p.uid), 10)
}

func newAdmission(lim Limits) *admission {
	return &admission{lim: lim, uids: make(map[principal]*uidUse), room: make(chan struct{}), headroom: fdHeadroom}
}

// slot is one connection's share of the admission: a handshake in
// progress and a session, each released once.
type slot struct {
	a         *admission
	uid       principal
	handshake bool // under a.mu
	session   bool // under a.mu
}

// admit takes a handshake and a session slot for a connection of uid, or
// refuses with the limit that forbids it.
func (a *admission) admit(uid principal) (*slot, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	u := a.uids[uid]
	if u == nil {
		u = &uidUse{}
	}
	lim := &a.lim
	switch {
	case a.handshakes >= lim.MaxHandshakes:
		return nil, limitErr("MaxHandshakes", retryHandshake, "%d handshakes in progress", a.handshakes)
	case u.handshakes >= lim.MaxHandshakesPerUID:
		return nil, limitErr("MaxHandshakesPerUID", retryHandshake, "%d handshakes of %v in progress", u.handshakes, uid)
	case a.sessions >= lim.MaxSessions:
		return nil, limitErr("MaxSessions", retrySession, "%d sessions open", a.sessions)
	case u.sessions >= lim.MaxSessionsPerUID:
		return nil, limitErr("MaxSessionsPerUID", retrySession, "%d sessions of %v open", u.sessions, uid)
	}
	if a.fdBuf == nil {
		a.fdBuf = make([]byte, 32<<10)
	}
	// Counted under mu: admits are serialised anyway, and the count must
	// not race with another admit's.
	if free, err := a.headroom(a.fdBuf); err == nil {
		if need := lim.FDReserve + fdsPerSession*(a.handshakes+1); free < need {
			return nil, limitErr("FDReserve", retrySession, "%d descriptors free under RLIMIT_NOFILE, %d needed", free, need)
		}
	} // else no /proc: the descriptor check is skipped, the counts remain
	a.uids[uid] = u
	u.handshakes++
	u.sessions++
	a.handshakes++
	a.sessions++
	return &slot{a: a, uid: uid, handshake: true, session: true}, nil
}

// waitRoom reports true when fewer than MaxHandshakes are in progress,
// false if done is closed first.
func (a *admission) waitRoom(done <-chan struct{}) bool {
	for {
		a.mu.Lock()
		ok, ch := a.handshakes < a.lim.MaxHandshakes, a.room
		a.mu.Unlock()
		if ok {
			return true
		}
		select {
		case <-ch:
		case <-done:
			return false
		}
	}
}

// handshakeDone releases the handshake slot: the session is in OPERATION
// (or gone). Nil-safe and idempotent.
func (sl *slot) handshakeDone() { sl.free(false) }

// release frees both slots: the session is closed. Nil-safe and
// idempotent.
func (sl *slot) release() { sl.free(true) }

func (sl *slot) free(session bool) {
	if sl == nil {
		return
	}
	a := sl.a
	a.mu.Lock()
	defer a.mu.Unlock()
	u := a.uids[sl.uid]
	if sl.handshake {
		sl.handshake = false
		a.handshakes--
		u.handshakes--
		close(a.room) // Serve may accept again
		a.room = make(chan struct{})
	}
	if session && sl.session {
		sl.session = false
		a.sessions--
		u.sessions--
	}
	if u.sessions == 0 && u.handshakes == 0 {
		delete(a.uids, sl.uid)
	}
}

// fdHeadroom is how many more descriptors this process may open: the soft
// RLIMIT_NOFILE minus the descriptors open. Since Linux 6.2 the size of
// /proc/self/fd is that count, so it costs a getrlimit and a stat (about
// 4 µs however many are open: BenchmarkFDHeadroom); older kernels report 0
// there, and the entries are counted with getdents64 into buf instead,
// which costs 0.4 to 0.7 ms per thousand open descriptors.
func fdHeadroom(buf []byte) (int, error) {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil {
		return 0, err
	}
	var st unix.Stat_t
	open := 0
	if err := unix.Stat("/proc/self/fd", &st); err == nil && st.Size > 0 {
		open = int(st.Size)
	} else if open, err = countOpenFDs(buf); err != nil {
		return 0, err
	}
	return int(min(rl.Cur, math.MaxInt32)) - open, nil
}

// countOpenFDs counts the entries of /proc/self/fd with getdents64 into
// buf, allocating nothing per entry.
func countOpenFDs(buf []byte) (int, error) {
	dir, err := unix.Open("/proc/self/fd", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(dir)
	open := -1 // dir itself
	for {
		n, err := unix.Getdents(dir, buf)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return 0, err
		}
		if n <= 0 {
			return open, nil
		}
		open += countDirents(buf[:n])
	}
}

// countDirents counts the linux_dirent64 records in b other than "." and
// "..": d_ino u64, d_off i64, d_reclen u16, d_type u8, d_name.
func countDirents(b []byte) int {
	const nameOff = 19
	n := 0
	for len(b) > nameOff {
		reclen := int(binary.NativeEndian.Uint16(b[16:]))
		if reclen <= nameOff || reclen > len(b) {
			break
		}
		if b[nameOff] != '.' {
			n++
		}
		b = b[reclen:]
	}
	return n
}

// bucket is a token bucket: n events per period on average, in bursts of
// at most n. Used by one goroutine only (a session's readLoop).
type bucket struct {
	n      float64
	period time.Duration
	tokens float64
	last   time.Time
}

func newBucket(n int, period time.Duration) bucket {
	return bucket{n: float64(n), period: period, tokens: float64(n)}
}

// take spends one event at now, or reports how long until one is allowed.
func (b *bucket) take(now time.Time) (ok bool, wait time.Duration) {
	if !b.last.IsZero() {
		b.tokens = min(b.n, b.tokens+float64(now.Sub(b.last))*b.n/float64(b.period))
	}
	b.last = now
	if b.tokens >= 1 {
		b.tokens--
		return true, 0
	}
	return false, time.Duration((1 - b.tokens) * float64(b.period) / b.n)
}
