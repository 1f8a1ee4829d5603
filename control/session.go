package control

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sypas/go/bulk"
	"github.com/sypas/go/control/token"
	"github.com/sypas/go/frame"
	"github.com/sypas/go/ring"
	"github.com/sypas/go/wire"
)

// State is the phase of a session. A session moves forward only, one step
// at a time, and can jump to StateClosed from anywhere (docs/PROTOCOL.md §6).
type State int32

const (
	StateConnect   State = iota // socket connected (daemon) or accepted (kernel)
	StateAttest                 // peer checked: Attest at accept (kernel), CheckServer (daemon)
	StateHandshake              // HELLO → WELCOME: version, features, sizes, limits
	StateRegions                // REGIONS with the two ring memfds
	StateToken                  // TOKEN bound to the attested identity
	StateOperation              // rings live; HEARTBEAT, TOKEN_REFRESH, GOAWAY on the socket
	StateDraining               // GOAWAY sent or received: finish in-flight work
	StateClosed
)

var stateNames = [...]string{"connect", "attest", "handshake", "regions", "token", "operation", "draining", "closed"}

func (s State) String() string {
	if s >= 0 && int(s) < len(stateNames) {
		return stateNames[s]
	}
	return fmt.Sprintf("State(%d)", int32(s))
}

// accepts is the receive table of the state machine: which frame types the
// peer may send in a state. Anything else is E_PROTO. The kernel reads
// nothing between WELCOME and TOKEN, so those states accept nothing. The
// kernel still serves TOKEN_REFRESH while draining: the daemon may have sent
// it before it saw our GOAWAY, and a drain should not end in E_PROTO.
func accepts(kernel bool, st State, t frame.Type) bool {
	if t == frame.TypeError {
		return true // the peer may give up at any point
	}
	switch {
	case kernel && st == StateHandshake:
		return t == frame.TypeHello
	case kernel && st == StateRegions: // the daemon's bulk region (§6.5), read only when BULK is granted
		return t == frame.TypeRegions
	case kernel && (st == StateOperation || st == StateDraining):
		return t == frame.TypeHeartbeat || t == frame.TypeGoAway || t == frame.TypeTokenRefresh
	case !kernel && st == StateHandshake:
		return t == frame.TypeWelcome
	case !kernel && st == StateRegions:
		return t == frame.TypeRegions
	case !kernel && st == StateToken:
		return t == frame.TypeToken
	case !kernel && (st == StateOperation || st == StateDraining):
		return t == frame.TypeHeartbeat || t == frame.TypeGoAway || t == frame.TypeToken
	}
	return false
}

// Token is the capability the kernel issued to a session.
type Token struct {
	ID     uint64    // goes into the CapRef of every frame after TOKEN
	Bytes  []byte    // the token (control/token format); do not modify
	Issued time.Time // local time the TOKEN was sent (kernel) or received (daemon)
	Expiry time.Time
}

// Session is one end of a control connection and its two rings. The daemon
// end comes from Dial, the kernel end from Server.Accept. Producer and
// Consumer are this side's ring ends. Methods are safe for concurrent use;
// the ring ends are not (SPSC: one goroutine per end).
//
// Ending: when the session ends on its own (the peer died or hung up, went
// silent, broke the protocol...), calls waiting on the rings return the
// session's Err, an error matching ErrPeerGone when the peer is gone, and
// records already published can still be read. Close (or Shutdown) is safe
// at any time, from any goroutine, even while other goroutines are blocked
// in or streaming through ring calls: those calls, and every later one,
// return an error matching ring.ErrClosed. Views and reservations the rings
// handed out hold meaningless bytes after Close, and never fault for as long
// as the session or the ring end is reachable: a goroutine that goes on
// reading a view after its last use of both must keep one alive
// (runtime.KeepAlive), or the memory may be unmapped under it. The
// one who got the session (from Dial, Server.Accept or Client.Session)
// closes it when done with it; Client.Close closes the Client's current
// session too.
type Session struct {
	kernel bool
	cfg    SessionConfig
	conn   net.Conn // a *net.UnixConn, or any other stream (TLS, gRPC): inline then
	ctl    *Conn    // kernel side: owns conn and the pidfd
	peer   PeerIdentity
	srv    *Server
	slot   *slot // kernel: its share of the Limits, released by Close

	// Kernel, readLoop only: the daemon's control frames and refreshes.
	frames, refreshes bucket

	// Read side: the handshake, then readLoop alone, or inline
	// Inline.Next and a daemon's idle reader, under rmu.
	rmu      sync.Mutex
	fdr      *fdReader
	fr       *frame.Reader
	consumed int64  // stream bytes of the frames read so far
	rseq     uint64 // sequence of the last frame read

	wmu  sync.Mutex // write side: frames are written whole, in sequence order
	fw   *frame.Writer
	wseq uint64
	wbuf []byte
	live bool // under wmu: handshake over, each write sets its own deadline

	welcome wire.Welcome
	regions []*ring.Region // daemon→kernel ring, kernel→daemon ring
	prod    *ring.Producer
	cons    *ring.Consumer
	inline  *Inline // the data plane, when on the socket (no regions then)
	// The bulk regions (bulk.go), when BULK is granted: this side's, and
	// the peer's as mapped here.
	bulk     *bulk.Region
	peerBulk *bulk.PeerRegion

	fallback string // daemon: why better addresses were passed over (Dial)
	addr     string // daemon: the address Dial reached

	tok       atomic.Pointer[Token]
	prevTokID atomic.Uint64                    // kernel: still accepted as CapRef during a refresh
	capab     atomic.Pointer[token.Capability] // kernel
	corr      atomic.Uint64                    // daemon: last TOKEN_REFRESH correlation sent
	answered  atomic.Uint64                    // daemon: the last TOKEN_REFRESH correlation answered
	tokenUp   chan struct{}                    // daemon: a refreshed TOKEN arrived
	tokenSet  chan struct{}                    // setToken happened (expiryLoop re-arms)
	revoked   chan struct{}                    // kernel: a token of ours may be revoked (expiryLoop checks)
	revokedID atomic.Uint64                    // kernel: a token id the watcher saw revoked while the session held it
	unwatch   func()                           // kernel: stops ServerConfig.Revoked's calls; fail calls it

	state      atomic.Int32
	errMu      sync.Mutex
	err        error
	done       chan struct{}
	goAwayRecv chan struct{}
	recvOnce   sync.Once
	goAwaySent atomic.Bool
	drainTimer atomic.Pointer[time.Timer] // GOAWAY received: DrainTimeout for the owner; fail stops it
	// ending is the reason this side ends the session, recorded before it
	// sends its last frame (ERROR, GOAWAY): the peer may close at once, and
	// the hang-up readLoop then sees must not replace the reason.
	ending atomic.Pointer[error]
	// errorSent: failProto wrote its ERROR, which the close must not
	// destroy (lingerAfterError).
	errorSent atomic.Bool
	// A daemon's inline reader: HEARTBEAT nonces it owes an answer, which
	// the heartbeat goroutine writes (ackHeartbeat).
	acksMu    sync.Mutex
	acks      []uint64
	ackKick   chan struct{} // cap 1
	wg        sync.WaitGroup
	closeOnce sync.Once
	closeErr  error
}

func newSession(kernel bool, conn net.Conn, cfg SessionConfig) *Session {
	s := &Session{
		kernel:     kernel,
		cfg:        cfg,
		fdr:        newFDReader(conn, !kernel), // only a daemon receives descriptors (REGIONS)
		done:       make(chan struct{}),
		goAwayRecv: make(chan struct{}),
		tokenUp:    make(chan struct{}, 1),
		tokenSet:   make(chan struct{}, 1),
		revoked:    make(chan struct{}, 1),
		ackKick:    make(chan struct{}, 1),
	}
	s.fr = frame.NewReader(s.fdr, frame.Config{MaxPayload: controlMaxPayload})
	s.useConn(conn)
	return s
}

// Producer is this side's sending ring end: daemon→kernel for a daemon,
// kernel→daemon for the kernel. After Close its calls return ring.ErrClosed.
func (s *Session) Producer() *ring.Producer { return s.prod }

// Consumer is this side's receiving ring end. After Close its calls return
// ring.ErrClosed.
func (s *Session) Consumer() *ring.Consumer { return s.cons }

// Inline is the session's data plane when it travels on the control
// socket (WELCOME granted wire.FeatureInline), else nil: the rings
// (Producer, Consumer) carry it. Inline sessions have no rings.
func (s *Session) Inline() *Inline { return s.inline }

// Token returns the current token; TOKEN_REFRESH replaces it.
func (s *Session) Token() Token { return *s.tok.Load() }

// Capability is the verified capability of the current token (kernel side;
// nil on a daemon). Check operations with its Allows.
func (s *Session) Capability() *token.Capability { return s.capab.Load() }

// Admits reports whether a data-plane frame carrying capRef may be served
// (kernel side): capRef names the session's current token, or the one the
// last refresh replaced (docs/PROTOCOL.md §6.1), neither has been revoked,
// and the session is live (it ends when its token expires). A few atomic
// loads: the enforcer calls it for every frame read from a ring.
func (s *Session) Admits(capRef uint64) bool {
	if capRef == 0 || s.revokedID.Load() != 0 || s.State() == StateClosed {
		return false
	}
	if t := s.tok.Load(); t != nil && t.ID == capRef {
		return true
	}
	return capRef == s.prevTokID.Load()
}

// Peer is the attested identity of the daemon (kernel side; zero on a
// daemon): a process on a Unix socket, a certificate on TLS.
func (s *Session) Peer() PeerIdentity { return s.peer }

// Network names the stream the session runs on: NetworkUnix, NetworkTLS,
// NetworkPlain, or another transport's name (a gRPC stream's). Only a
// Unix socket carries shared memory; on the others the data plane is
// Inline.
func (s *Session) Network() string { return networkOf(s.conn) }

// Fallback says why the session runs on a fallback address of
// DialConfig.Fallbacks, not the address asked for: what each better one
// answered. Empty when the first address was used.
func (s *Session) Fallback() string { return s.fallback }

// Address is the address Dial reached the kernel at (one of
// DialConfig.Fallbacks, if Fallback is not empty); empty on a kernel and
// on a session from DialConn.
func (s *Session) Address() string { return s.addr }

// Params are the parameters the kernel granted in WELCOME.
func (s *Session) Params() wire.Welcome { return s.welcome }

// State is the session's current phase.
func (s *Session) State() State { return State(s.state.Load()) }

// Done is closed when the session has ended; Err then says why.
func (s *Session) Done() <-chan struct{} { return s.done }

// GoAway is closed when the peer sent GOAWAY: stop starting work, finish
// what is in flight, then call Shutdown. After DrainTimeout the session
// ends by itself.
func (s *Session) GoAway() <-chan struct{} { return s.goAwayRecv }

// Err is nil while the session is live, then the reason it ended: an error
// matching ErrPeerGone (death, hang-up, missed heartbeats), ErrSessionClosed
// (Close or a completed GOAWAY exchange), a *wire.Error (protocol
// violation, or the peer's ERROR), or ErrGoAway.
func (s *Session) Err() error {
	s.errMu.Lock()
	defer s.errMu.Unlock()
	return s.err
}

func (s *Session) setState(st State) { s.state.Store(int32(st)) }

// fail ends the session with err (the first error wins): it interrupts the
// ring waiters, closes the socket and closes Done. It leaves the rings
// readable, for records already published; Close releases them.
func (s *Session) fail(err error) {
	if p := s.ending.Load(); p != nil {
		err = *p
	}
	s.errMu.Lock()
	if s.err != nil {
		s.errMu.Unlock()
		return
	}
	s.err = err
	s.errMu.Unlock()
	s.setState(StateClosed)
	s.releaseBulk()
	if t := s.drainTimer.Load(); t != nil {
		t.Stop()
	}
	if s.unwatch != nil {
		s.unwatch()
	}
	if s.prod != nil {
		s.prod.Interrupt(err)
	}
	if s.cons != nil {
		s.cons.Interrupt(err)
	}
	if s.errorSent.Load() {
		lingerAfterError(s.conn)
	} else {
		closeConn(s.conn)
	}
	close(s.done)
}

// Abort ends the session because of err, a violation the owner found on
// the data plane (a ring frame that cannot be parsed, say): the peer gets
// ERROR (correlation 0) with err's code and reason on the socket, the
// refusal is audited, and the session ends with err as its Err. Close it
// afterwards, as always.
func (s *Session) Abort(err error) { s.failProto(err) }

// failProto reports a protocol violation to the peer with an ERROR frame
// (best effort, bounded by a short deadline), then ends the session. The
// first reason of a live session is the one recorded in the audit log and
// the session's Err. Every caller that finds the session live sends its
// ERROR: another goroutine ending the session at the same time (the expiry
// check and a refused TOKEN_REFRESH) must not close the socket before the
// peer got a reason.
func (s *Session) failProto(err error) {
	first := s.ending.CompareAndSwap(nil, &err)
	if s.Err() == nil {
		m := errorMsg(err)
		if s.send(&m, 0, 0, 100*time.Millisecond) == nil {
			s.errorSent.Store(true)
		}
		if first {
			s.audit(err)
		}
	}
	s.fail(err)
}

// errorMsg is the ERROR payload for err, whose reason is never empty (§6.1):
// the error's message; else, for anything but E_INTERNAL, the text of its
// local cause, which then describes the peer's own bytes (a framing error
// such as a bad magic); else the code's name.
func errorMsg(err error) wire.ErrorMsg {
	m := wire.NewErrorMsg(err)
	if len(m.Message) > 0 {
		return m
	}
	reason := m.Code.String()
	var e *wire.Error
	if errors.As(err, &e) && e.Err != nil && m.Code != wire.CodeInternal {
		reason = e.Err.Error()
	}
	m.Message = []byte(reason[:min(len(reason), wire.MaxMessageLen)])
	return m
}

// Close ends the session and releases its rings. It is safe at any time,
// from any goroutine: ring calls in flight in other goroutines, and every
// later call, return an error matching ring.ErrClosed, and views stay safe
// to touch while the session is reachable (see Session). Records committed
// and not yet flushed are dropped: Flush first. It does not wait for the
// peer; use Shutdown for an orderly end. Close is idempotent.
func (s *Session) Close() error {
	s.closeOnce.Do(func() {
		// The rings first, so that waiting calls fail with ErrClosed rather
		// than with fail's ErrSessionClosed: each region closes the ends
		// attached through it (waking their waiters while the ring is
		// still shared, and publishing nothing, as another goroutine may be
		// committing), then swaps its shared memory for private pages
		// (ring.Region.Close).
		var errs []error
		for _, r := range s.regions {
			errs = append(errs, r.Close())
		}
		errs = append(errs, s.closeBulk())
		s.fail(ErrSessionClosed)
		s.wg.Wait()
		s.rmu.Lock() // a direct Inline reader has left readFrame (fail closed the socket)
		s.fdr.close()
		s.rmu.Unlock()
		if s.ctl != nil && s.ctl.pidfd != nil {
			s.ctl.pidfd.Close()
		}
		s.closeErr = errors.Join(errs...)
		s.slot.release() // its descriptors and mappings are gone
	})
	return s.closeErr
}

// Shutdown ends the session in order: it sends GOAWAY (the peer stops
// starting work and finishes what is in flight, with the rings still live),
// waits for the peer's GOAWAY, which says it is done, or for ctx or
// DrainTimeout, then closes. Like Close, it releases the rings: calls still
// in flight on them return ring.ErrClosed.
func (s *Session) Shutdown(ctx context.Context) error {
	return errors.Join(s.Drain(ctx), s.Close())
}

// Drain is Shutdown without its Close: it sends GOAWAY and waits for the
// peer's (or ctx, or DrainTimeout), the rings live all along, and leaves
// the session to its owner to close. An owner whose goroutines still hold
// views into the rings finishes with them between Drain and Close, which
// swaps the rings' memory for private pages.
func (s *Session) Drain(ctx context.Context) error {
	err := s.sendGoAway()
	if err == nil {
		t := time.NewTimer(s.cfg.DrainTimeout)
		defer t.Stop()
		select {
		case <-s.goAwayRecv:
		case <-s.done:
		case <-ctx.Done():
			err = ctx.Err()
		case <-t.C:
			err = fmt.Errorf("control: peer did not finish draining in %v: %w", s.cfg.DrainTimeout, os.ErrDeadlineExceeded)
		}
	}
	if errors.Is(err, ErrSessionClosed) || errors.Is(err, ErrPeerGone) {
		err = nil // nothing left to drain
	}
	return err
}

// sendGoAway sends GOAWAY once. LastCorrelation is the maximum: every
// request already received will be answered.
func (s *Session) sendGoAway() error {
	if err := s.Err(); err != nil {
		return err
	}
	if !s.goAwaySent.CompareAndSwap(false, true) {
		return nil
	}
	s.state.CompareAndSwap(int32(StateOperation), int32(StateDraining))
	return s.send(&wire.GoAway{LastCorrelation: math.MaxUint64, Code: wire.CodeOK}, 0, 0, 0)
}

// deadAfter is how long the peer may stay silent.
func (s *Session) deadAfter() time.Duration {
	return s.cfg.HeartbeatInterval * time.Duration(s.cfg.HeartbeatMisses)
}

// send writes one frame. timeout 0 means the session's write timeout (a
// peer that does not read for deadAfter is as dead as a silent one).
func (s *Session) send(m wire.Message, flags frame.Flags, corr uint64, timeout time.Duration) error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	p, err := m.Append(s.wbuf[:0])
	if err != nil {
		return err
	}
	s.wbuf = p
	if s.inline != nil {
		// Data frames buffered before this one go first: the socket's
		// sequence is theirs and ours.
		if err := s.inline.flushLocked(); err != nil {
			return err
		}
	}
	if timeout == 0 && s.live {
		timeout = s.deadAfter()
	}
	if timeout > 0 { // else the handshake deadline applies
		s.conn.SetWriteDeadline(time.Now().Add(timeout))
	}
	s.wseq++
	f := frame.Frame{Header: frame.Header{Type: m.Type(), Flags: flags, Sequence: s.wseq, Correlation: corr, CapRef: s.capRef()}, Payload: p}
	return writeErr(s.fw.WriteFrame(&f))
}

// writeErr marks a write that failed because the peer hung up.
func writeErr(err error) error {
	if errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET) {
		return fmt.Errorf("%w: %w", ErrPeerGone, err)
	}
	return err
}

// sendFDs writes one frame with files attached (REGIONS), during the
// handshake only.
func (s *Session) sendFDs(m wire.Message, files ...*os.File) error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	uc, ok := s.conn.(*net.UnixConn)
	if !ok {
		return &wire.Error{Code: wire.CodeInternal, Message: "descriptors on a connection that is not a Unix socket"}
	}
	s.wseq++
	b, err := wire.AppendFrame(nil, frame.Header{Sequence: s.wseq}, m)
	if err != nil {
		return err
	}
	return writeErr(SendFDs(uc, b, files...))
}

// CapRef is the id of the token this side puts in the cap_ref of its
// frames: the session's current token (docs/PROTOCOL.md §6.1, §8.1).
func (s *Session) CapRef() uint64 { return s.capRef() }

func (s *Session) capRef() uint64 {
	if t := s.tok.Load(); t != nil {
		return t.ID
	}
	return 0
}

// readFrame reads the next control frame and checks it against the state
// machine and the header rules of the control socket. Descriptors that came
// with it are claimed: REGIONS returns them (count from its payload), any
// other frame with descriptors is an error. The frame is valid until the
// next call.
func (s *Session) readFrame() (*frame.Frame, []*os.File, error) {
	f, err := s.fr.ReadFrame()
	if err != nil {
		s.fdr.close()
		return nil, nil, s.readErr(err)
	}
	start := s.consumed
	s.consumed += int64(f.FrameLen())
	want := -1
	var regions wire.Regions
	if f.Type == frame.TypeRegions && accepts(s.kernel, s.State(), f.Type) {
		if err := regions.Decode(f.Payload); err != nil {
			s.fdr.claim(start, s.consumed, 0)
			return nil, nil, protoErr("REGIONS: %v", err)
		}
		want = len(regions.Entries)
	}
	files, err := s.fdr.claim(start, s.consumed, want)
	if err != nil {
		return nil, nil, &wire.Error{Code: wire.CodeProto, Message: "fd passing", Err: err}
	}
	bad := func(err error) (*frame.Frame, []*os.File, error) {
		closeFiles(files)
		return nil, nil, err
	}
	switch {
	case f.Sequence != s.rseq+1:
		return bad(protoErr("%v frame with sequence %d, want %d", f.Type, f.Sequence, s.rseq+1))
	case f.StreamID == DataStream && s.inline != nil && s.State() >= StateOperation:
		// The data plane, inline (§8.6): its own types, max_payload.
		if !dataAccepts(s.kernel, f.Type) {
			return bad(protoErr("%v frame on the data stream: the %s does not send it (§8.1)", f.Type, peerName(s.kernel)))
		}
		s.rseq++
		return f, files, nil
	case f.StreamID != 0:
		return bad(protoErr("%v frame on stream %d: the control socket carries stream 0 only, and stream 1 once an inline session is in operation", f.Type, f.StreamID))
	case f.PayloadLen > controlMaxPayload:
		// Reachable only inline, whose reader admits data-plane payloads.
		return bad(&wire.Error{Code: wire.CodeTooLarge, Message: fmt.Sprintf("%v payload of %d bytes on the control stream, limit %d", f.Type, f.PayloadLen, controlMaxPayload)})
	case !accepts(s.kernel, s.State(), f.Type):
		return bad(protoErr("unexpected %v frame in state %v", f.Type, s.State()))
	case s.State() < StateOperation && f.Type != frame.TypeError && (f.CapRef != 0 || f.Correlation != 0):
		// HELLO, WELCOME, REGIONS and the first TOKEN: no token exists yet
		// and nothing is a request (§6.1).
		return bad(protoErr("%v frame with cap_ref %#x and correlation %d before TOKEN: both must be 0", f.Type, f.CapRef, f.Correlation))
	case f.Type == frame.TypeError:
		var m wire.ErrorMsg
		if err := m.Decode(f.Payload); err != nil {
			return bad(protoErr("ERROR: %v", err))
		}
		if f.Correlation == 0 || !s.kernel && s.takeAnswer(f.Correlation) {
			return bad(fmt.Errorf("%w: %w", errPeerSent, m.Err()))
		}
		return bad(protoErr("ERROR for unknown correlation %d", f.Correlation))
	}
	s.rseq++
	return f, files, nil
}

// dataAccepts reports whether the peer may send a data-plane frame of type
// t (§8.1): REQUEST, SUBSCRIBE, UNSUBSCRIBE to the kernel; RESPONSE,
// ERROR, EVENT to a daemon.
func dataAccepts(kernel bool, t frame.Type) bool {
	if kernel {
		return t == frame.TypeRequest || t == frame.TypeSubscribe || t == frame.TypeUnsubscribe
	}
	return t == frame.TypeResponse || t == frame.TypeError || t == frame.TypeEvent
}

// peerName names the other side, for messages.
func peerName(kernel bool) string {
	if kernel {
		return "daemon"
	}
	return "kernel"
}

// readErr classifies a read failure: a hang-up or silence means the peer is
// gone; framing garbage is a protocol error.
func (s *Session) readErr(err error) error {
	var oe *net.OpError
	if s.State() < StateOperation && errors.As(err, &oe) && oe.Op == "remote error" {
		// A TLS alert from the peer during the handshake: on TLS 1.3 a
		// daemon's handshake completes before the kernel has checked its
		// certificate, and a refusal (unknown CA, no certificate) arrives
		// with the first read.
		return reject("the %s refused the TLS handshake: %w", peerName(s.kernel), err)
	}
	switch {
	case errors.Is(err, net.ErrClosed):
		if e := s.Err(); e != nil {
			return e
		}
		return ErrSessionClosed
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF),
		errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		return s.goneErr(fmt.Sprintf("connection closed in state %v", s.State()), err)
	case errors.Is(err, os.ErrDeadlineExceeded) && s.State() >= StateOperation:
		return fmt.Errorf("%w: no frame for %v (%d heartbeats missed)", ErrPeerGone, s.deadAfter(), s.cfg.HeartbeatMisses)
	case errors.Is(err, ErrFDPassing):
		return &wire.Error{Code: wire.CodeProto, Message: "fd passing", Err: err}
	}
	var se *wire.Error
	if errors.As(err, &se) {
		return err
	}
	return &wire.Error{Code: wire.CodeOf(err), Err: err}
}

func isClosed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

func protoErr(format string, args ...any) error {
	return &wire.Error{Code: wire.CodeProto, Message: fmt.Sprintf(format, args...)}
}

// handshakeDeadline applies ctx to the socket for the handshake: its
// deadline, and cancellation through an expired deadline.
func (s *Session) handshakeDeadline(ctx context.Context) (stop func() bool) {
	dl, _ := ctx.Deadline()
	s.conn.SetDeadline(dl)
	return context.AfterFunc(ctx, func() { s.conn.SetDeadline(time.Unix(1, 0)) })
}

// endHandshake turns a handshake error into the returned one and releases
// everything, or starts the operation phase.
func (s *Session) endHandshake(ctx context.Context, stop func() bool, err error) error {
	stopped := stop()
	if err == nil && !stopped {
		err = ctx.Err()
	}
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			// The socket deadline is ctx's, and may fire just before ctx.
			cause := ctx.Err()
			if dl, ok := ctx.Deadline(); cause == nil && ok && !time.Now().Before(dl) {
				cause = context.DeadlineExceeded
			}
			if cause != nil {
				err = fmt.Errorf("%w (%w)", cause, err)
			}
		}
		if errors.Is(err, context.Canceled) {
			// Our side gave up (a kernel's Serve stopping, a daemon's
			// caller cancelling): not the peer's slowness.
			err = &wire.Error{Code: wire.CodeUnavailable, Message: s.side() + " stopped the handshake", Err: err}
		}
		st := s.State()
		var pe *wire.Error
		if errors.As(err, &pe) && pe.Code != wire.CodeOK && !isPeerError(err) {
			s.failProto(err) // tell the peer why
		} else if errors.Is(err, ErrPeerRejected) {
			s.audit(err) // a daemon refusing the kernel's uid says nothing to it
		}
		s.fail(err)
		s.Close()
		return fmt.Errorf("%w in state %v: %w", ErrHandshake, st, err)
	}
	s.conn.SetDeadline(time.Time{})
	s.detachInline()
	s.wmu.Lock()
	s.live = true
	s.wmu.Unlock()
	s.setState(StateOperation)
	if rev := s.revocations(); rev != nil {
		// Before expiryLoop's first check, so no revocation falls between.
		s.unwatch = rev.Watch(func(id uint64) {
			if id == s.capRef() || id == s.prevTokID.Load() {
				// Kept, not looked up again: refreshes may replace both
				// ids before expiryLoop runs.
				s.revokedID.CompareAndSwap(0, id)
				select {
				case s.revoked <- struct{}{}:
				default:
				}
			}
		})
	}
	s.wg.Add(2)
	go s.heartbeatLoop()
	go s.expiryLoop()
	switch {
	case s.inline == nil:
		s.wg.Add(1)
		go s.readLoop()
	case !s.kernel:
		s.wg.Add(1)
		go s.inline.idleReader()
	} // else Inline.Next is the socket's only reader
	if s.kernel {
		if s.ctl.pidfd != nil { // a Unix peer
			s.wg.Add(1)
			go s.watchPidfd()
		}
	} else if s.welcome.Features&wire.FeatureTokenRefresh != 0 {
		s.wg.Add(1)
		go s.refreshLoop()
	}
	return nil
}

// detachInline moves an inline session's Unix socket out of the Go
// runtime's poller once the handshake is over (pollConn says why), before
// any goroutine but the handshake's uses it. If that fails the session
// keeps the socket as it is: slower, not wrong.
func (s *Session) detachInline() {
	uc, ok := s.conn.(*net.UnixConn)
	if s.inline == nil || !ok {
		return
	}
	pc, err := detach(uc)
	if err != nil {
		return
	}
	s.useConn(pc)
	s.fdr.rc, _ = pc.SyscallConn()
}

// useConn makes conn the session's socket, control frames written whole
// to it.
func (s *Session) useConn(conn net.Conn) {
	s.conn = conn
	s.fw = frame.NewWriter(conn, frame.Config{MaxPayload: controlMaxPayload})
}

// errPeerSent marks errors that came from the peer's ERROR frame, which are
// not answered with another ERROR.
var errPeerSent = errors.New("control: peer sent ERROR")

func isPeerError(err error) bool { return errors.Is(err, errPeerSent) }

func (s *Session) readLoop() {
	defer s.wg.Done()
	defer s.fdr.close()
	for {
		if _, err := s.readOne(); err != nil {
			return // readFrame admits data frames only inline
		}
	}
}

// readOne reads the next frame of the socket, within the liveness
// deadline, and serves it if it is a control frame; a data frame (stream
// 1) it returns. An error has ended the session.
func (s *Session) readOne() (*frame.Frame, error) {
	s.conn.SetReadDeadline(time.Now().Add(s.deadAfter()))
	f, _, err := s.readFrame()
	if err == nil {
		if f.StreamID == DataStream {
			return f, nil
		}
		err = s.handle(f)
	}
	if err != nil {
		s.endRead(err)
		return nil, err
	}
	return nil, nil
}

// endRead ends the session for err, the failure of reading or handling a
// frame: a protocol error of the peer's is reported to it first.
func (s *Session) endRead(err error) {
	var pe *wire.Error
	if errors.As(err, &pe) && !isPeerError(err) && !errors.Is(err, ErrPeerGone) {
		s.failProto(err)
	}
	s.fail(err)
}

// handle dispatches a frame of the operation phase (already checked
// against the state table).
func (s *Session) handle(f *frame.Frame) error {
	if s.kernel {
		if id := f.CapRef; id != s.capRef() && (id == 0 || id != s.prevTokID.Load()) {
			return &wire.Error{Code: wire.CodeAuth, Message: fmt.Sprintf("cap_ref %#x names no token of this session", id)}
		}
		if ok, _ := s.frames.take(time.Now()); !ok {
			return limitErr("MaxControlFrames", 0, "more than %d control frames in %v", s.srv.cfg.Limits.MaxControlFrames, s.cfg.HeartbeatInterval)
		}
	}
	switch f.Type {
	case frame.TypeHeartbeat:
		var m wire.Heartbeat
		if err := m.Decode(f.Payload); err != nil {
			return protoErr("HEARTBEAT: %v", err)
		}
		if !f.Flags.Has(frame.FlagAck) {
			if err := s.ackHeartbeat(m.Nonce); err != nil {
				return s.goneErr("heartbeat reply", err)
			}
		}
	case frame.TypeGoAway:
		var m wire.GoAway
		if err := m.Decode(f.Payload); err != nil {
			return protoErr("GOAWAY: %v", err)
		}
		if m.Code != wire.CodeOK {
			// The peer ends the session for a reason (E_AUTH: its token was
			// revoked) and closes: nothing is left to drain.
			return fmt.Errorf("%w: GOAWAY: %w", errPeerSent, &wire.Error{Code: m.Code, Message: string(m.Message)})
		}
		s.state.CompareAndSwap(int32(StateOperation), int32(StateDraining))
		s.recvOnce.Do(func() {
			close(s.goAwayRecv)
			if !s.goAwaySent.Load() {
				// The owner has DrainTimeout to finish and call Shutdown.
				t := time.AfterFunc(s.cfg.DrainTimeout, func() {
					if s.goAwaySent.Load() || s.Err() != nil {
						return // the owner is shutting down
					}
					// Recorded before our GOAWAY goes out: the peer may
					// close at once, and readLoop must not report that
					// hang-up as an orderly close.
					err := fmt.Errorf("%w: drained for %v without Shutdown", ErrGoAway, s.cfg.DrainTimeout)
					s.ending.CompareAndSwap(nil, &err)
					s.sendGoAway()
					s.fail(err)
				})
				s.drainTimer.Store(t)
				if s.Err() != nil { // ended while we armed it
					t.Stop()
				}
			}
		})
	case frame.TypeTokenRefresh:
		return s.serveRefresh(f)
	case frame.TypeToken:
		return s.takeRefreshed(f)
	}
	return nil
}

// ackHeartbeat answers the peer's HEARTBEAT nonce. A daemon's inline
// reader must not wait for the socket to write it: the data frames ahead
// of the answer may wait for a kernel that is itself writing to us, which
// only our reading lets finish (docs/PROTOCOL.md §8.6). There the answer
// is the heartbeat goroutine's to write, as soon as the socket takes it.
func (s *Session) ackHeartbeat(nonce uint64) error {
	if s.inline == nil || s.kernel {
		return s.sendHeartbeat(nonce, frame.FlagAck)
	}
	s.acksMu.Lock()
	defer s.acksMu.Unlock()
	if limit := maxOwedAcks + s.cfg.HeartbeatMisses; len(s.acks) >= limit {
		return &wire.Error{Code: wire.CodeResource, Message: fmt.Sprintf("more than %d HEARTBEATs wait for their answer: the peer sends without reading", limit)}
	}
	s.acks = append(s.acks, nonce)
	select {
	case s.ackKick <- struct{}{}:
	default:
	}
	return nil
}

// maxOwedAcks, plus heartbeat_misses, bounds the HEARTBEAT answers a
// daemon's inline session owes while its socket does not take them: the
// kernel sends one per interval, and a write blocked for interval × misses
// ends the session, so a live kernel makes us owe at most misses + 1 that
// way; maxOwedAcks leaves room for HEARTBEATs that waited in the socket
// while we did not read.
const maxOwedAcks = 64

func (s *Session) heartbeatLoop() {
	defer s.wg.Done()
	t := time.NewTicker(s.cfg.HeartbeatInterval)
	defer t.Stop()
	var acks []uint64
	for nonce := uint64(1); ; {
		select {
		case <-s.done:
			return
		case <-t.C:
			if err := s.sendHeartbeat(nonce, 0); err != nil {
				s.fail(s.goneErr("heartbeat", err))
				return
			}
			nonce++
		case <-s.ackKick:
			s.acksMu.Lock()
			acks, s.acks = s.acks, acks[:0]
			s.acksMu.Unlock()
			for _, n := range acks {
				if err := s.sendHeartbeat(n, frame.FlagAck); err != nil {
					s.fail(s.goneErr("heartbeat reply", err))
					return
				}
			}
		}
	}
}

// sendHeartbeat sends a HEARTBEAT (flags: FlagAck for an answer) stamped
// with our clock.
func (s *Session) sendHeartbeat(nonce uint64, flags frame.Flags) error {
	return s.send(&wire.Heartbeat{Nonce: nonce, SentAt: monotonic()}, flags, 0, 0)
}

func monotonic() uint64 {
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return uint64(ts.Nano())
}

// watchPidfd ends the session the moment the daemon process exits, even if
// something else (a child, a leaked dup) keeps its socket open. The pidfd
// is dup'ed non-blocking so the runtime's poller waits on it: no thread is
// parked in poll(2) per session.
func (s *Session) watchPidfd() {
	defer s.wg.Done()
	fd, err := dupFD(s.ctl.pidfd)
	if err != nil {
		return
	}
	f := os.NewFile(uintptr(fd), "pidfd-watch")
	stop, closed := make(chan struct{}), make(chan struct{})
	defer func() { close(stop); <-closed }() // f is closed before Close returns
	go func() {
		defer close(closed)
		select {
		case <-s.done:
		case <-stop:
		}
		f.Close()
	}()
	wrc, err := f.SyscallConn()
	if err != nil {
		return
	}
	err = wrc.Read(func(p uintptr) bool {
		pfd := []unix.PollFd{{Fd: int32(p), Events: unix.POLLIN}}
		n, _ := unix.Poll(pfd, 0)
		return n > 0
	})
	if err == nil {
		// The peer's last frames (its GOAWAY, say) may still wait in the
		// socket, and its exit closed its end: the reader takes them, then
		// the hang-up, and ends the session for the right reason. Only a
		// socket the exit left open (a child inherited it) is ours to end.
		t := time.NewTimer(exitGrace)
		defer t.Stop()
		select {
		case <-s.done:
			return
		case <-t.C:
		}
		s.fail(s.goneErr(fmt.Sprintf("process %d exited", s.peer.PID), nil))
	}
}

// goneErr is the session's end when the peer cannot be reached (what
// failed, with err if any): a hang-up after both GOAWAYs is an orderly
// close (§6.8), ErrSessionClosed; anything else the peer's death.
func (s *Session) goneErr(what string, err error) error {
	if s.goAwaySent.Load() && isClosed(s.goAwayRecv) {
		return ErrSessionClosed
	}
	if err == nil {
		return fmt.Errorf("%w: %s", ErrPeerGone, what)
	}
	return fmt.Errorf("%w: %s: %w", ErrPeerGone, what, err)
}

// exitGrace is how long a session whose peer process exited leaves its
// socket reader to end it.
const exitGrace = 20 * time.Millisecond

// ---------------------------------------------------------------- tokens

func (s *Session) setToken(t *Token) {
	if old := s.tok.Swap(t); old != nil {
		s.prevTokID.Store(old.ID)
	}
	select {
	case s.tokenSet <- struct{}{}:
	default:
	}
}

// tokenExpiry is when the session's current token stops being valid, and
// now: by the server's clock on the kernel (the capability's expiry,
// caveats included), by the TOKEN's expiry on a daemon.
func (s *Session) tokenExpiry() (exp, now time.Time) {
	if s.kernel {
		return s.Capability().Expiry, s.srv.now()
	}
	return s.Token().Expiry, time.Now()
}

// expiryLoop ends the session when its token expires without a successor,
// or (kernel) when its current or previous token is revoked. A session
// never outlives its token: without TOKEN_REFRESH (or when the daemon does
// not refresh in time) both sides close at expiry with E_AUTH, and a
// Client reconnects for a fresh token. Each new token re-arms it.
func (s *Session) expiryLoop() {
	defer s.wg.Done()
	for {
		if id, ok := s.revokedToken(); ok {
			s.endRevoked(id)
			return
		}
		exp, now := s.tokenExpiry()
		if !now.Before(exp) {
			msg := "session token expired; reconnect for a new one"
			if s.welcome.Features&wire.FeatureTokenRefresh == 0 {
				msg = "session token expired and TOKEN_REFRESH was not negotiated; reconnect for a new one"
			}
			s.failProto(&wire.Error{Code: wire.CodeAuth, Message: msg, Err: token.ErrExpired})
			return
		}
		t := time.NewTimer(exp.Sub(now))
		select {
		case <-s.done:
			t.Stop()
			return
		case <-s.tokenSet:
			t.Stop()
		case <-s.revoked:
			t.Stop()
		case <-t.C:
		}
	}
}

// revocations is ServerConfig.Revoked on a kernel session, else nil.
func (s *Session) revocations() *token.Revocations {
	if s.srv == nil {
		return nil
	}
	return s.srv.cfg.Revoked
}

// revokedToken reports a revoked token the session held when it was
// revoked (the watcher's), or one it still accepts: its current one, or the
// one the last refresh replaced (kernel).
func (s *Session) revokedToken() (uint64, bool) {
	rev := s.revocations()
	if rev == nil {
		return 0, false
	}
	if id := s.revokedID.Load(); id != 0 {
		return id, true
	}
	for _, id := range [...]uint64{s.capRef(), s.prevTokID.Load()} {
		if id != 0 && rev.Contains(id) {
			return id, true
		}
	}
	return 0, false
}

// endRevoked ends the session because token id was revoked: its ring
// waiters are woken with an error matching wire.ErrAuth at once, the
// daemon gets GOAWAY E_AUTH (bounded by a short write timeout), then the
// socket is closed.
func (s *Session) endRevoked(id uint64) {
	msg := fmt.Sprintf("token %#x revoked", id)
	var err error = &wire.Error{Code: wire.CodeAuth, Message: msg, Err: token.ErrRevoked}
	if s.Err() == nil && s.ending.CompareAndSwap(nil, &err) {
		s.audit(err)
		if s.prod != nil { // nil inline (its waiters wake when the session ends)
			s.prod.Interrupt(err)
			s.cons.Interrupt(err)
		}
		s.send(&wire.GoAway{Code: wire.CodeAuth, Message: []byte(msg)}, 0, 0, 100*time.Millisecond)
	}
	s.fail(err)
}

// mint issues a token bound to the attested peer (kernel).
func (s *Session) mint(ttl time.Duration) (*Token, error) {
	cfg := &s.srv.cfg
	now := s.srv.now()
	exp := now.Add(ttl)
	b, err := cfg.Keys.Mint(token.Claims{
		Subject: s.peer.Subject(), Rights: cfg.Rights, Scope: cfg.Scope, Expiry: exp,
	})
	if err != nil {
		return nil, &wire.Error{Code: wire.CodeInternal, Message: "mint token", Err: err}
	}
	// With the server's revocations and clock, so the cached Capability
	// sees later revocations in Allows and Valid.
	v := token.Verifier{Keys: cfg.Keys, Revoked: cfg.Revoked, Clock: cfg.Clock}
	c, err := v.Verify(b, s.peer.Subject())
	if err != nil {
		return nil, &wire.Error{Code: wire.CodeInternal, Message: "verify own token", Err: err}
	}
	s.capab.Store(c)
	return &Token{ID: c.ID, Bytes: b, Issued: now, Expiry: exp}, nil
}

func (s *Session) sendToken(t *Token, corr uint64) error {
	return s.send(&wire.Token{TokenID: t.ID, ExpiryUnix: t.Expiry.UnixNano(), Token: t.Bytes}, 0, corr, 0)
}

// serveRefresh answers TOKEN_REFRESH (kernel): a fresh token for the same
// attested peer, or ERROR E_AUTH for a token that is not the current one.
// A current token that is revoked or expired is not renewed: the session
// ends with E_AUTH (the daemon may reconnect and be attested again).
func (s *Session) serveRefresh(f *frame.Frame) error {
	var m wire.TokenRefresh
	if err := m.Decode(f.Payload); err != nil {
		return protoErr("TOKEN_REFRESH: %v", err)
	}
	if s.welcome.Features&wire.FeatureTokenRefresh == 0 || f.Correlation == 0 {
		return protoErr("TOKEN_REFRESH without the feature or a correlation")
	}
	if ok, wait := s.refreshes.take(time.Now()); !ok {
		lim := &s.srv.cfg.Limits
		err := limitErr("MaxRefreshes", wait, "more than %d TOKEN_REFRESH in %v", lim.MaxRefreshes, lim.RefreshInterval)
		s.audit(err)
		em := errorMsg(err)
		return s.send(&em, 0, f.Correlation, 0)
	}
	if m.TokenID != s.capRef() {
		em := wire.ErrorMsg{Code: wire.CodeAuth, Message: []byte("not the session's current token")}
		s.audit(&wire.Error{Code: em.Code, Message: fmt.Sprintf("TOKEN_REFRESH of token %#x: %s", m.TokenID, em.Message)})
		return s.send(&em, 0, f.Correlation, 0)
	}
	if err := s.Capability().Valid(s.srv.now()); err != nil {
		return &wire.Error{Code: wire.CodeAuth, Message: "TOKEN_REFRESH of a token no longer valid", Err: err}
	}
	ttl := s.srv.tokenTTL()
	if req := time.Duration(m.RequestedTTLMs) * time.Millisecond; req > 0 && req < ttl {
		ttl = req
	}
	t, err := s.mint(ttl)
	if err != nil {
		return err
	}
	s.setToken(t)
	return s.sendToken(t, f.Correlation)
}

// decodeToken checks a TOKEN payload (daemon): the token must parse and
// carry the announced id and expiry. It copies the bytes out of the frame.
func decodeToken(f *frame.Frame) (*Token, error) {
	bad := func(format string, args ...any) error {
		return &wire.Error{Code: wire.CodeProto, Message: fmt.Sprintf(format, args...), Err: errBadToken}
	}
	var m wire.Token
	if err := m.Decode(f.Payload); err != nil {
		return nil, bad("TOKEN: %v", err)
	}
	t, err := token.Parse(m.Token)
	if err != nil {
		return nil, bad("TOKEN: %v", err)
	}
	if t.ID != m.TokenID || t.Expiry != m.ExpiryUnix {
		return nil, bad("TOKEN: id %#x/expiry %d disagree with the token's %#x/%d", m.TokenID, m.ExpiryUnix, t.ID, t.Expiry)
	}
	return &Token{ID: m.TokenID, Bytes: append([]byte(nil), m.Token...), Issued: time.Now(), Expiry: m.Expiry()}, nil
}

// takeAnswer reports whether corr answers the outstanding TOKEN_REFRESH
// (daemon), and marks it answered: a refresh is answered once.
func (s *Session) takeAnswer(corr uint64) bool {
	return corr != 0 && corr == s.corr.Load() && s.answered.Swap(corr) != corr
}

// takeRefreshed installs the TOKEN that answers our TOKEN_REFRESH (daemon).
func (s *Session) takeRefreshed(f *frame.Frame) error {
	// An answer is taken once: a second TOKEN for the same refresh is E_PROTO.
	if !s.takeAnswer(f.Correlation) {
		return protoErr("TOKEN with correlation %d, no refresh outstanding", f.Correlation)
	}
	t, err := decodeToken(f)
	if err != nil {
		return err
	}
	s.setToken(t)
	select {
	case s.tokenUp <- struct{}{}:
	default:
	}
	return nil
}

// refreshLoop asks for a new token at token.RefreshAt (~75 % of the
// lifetime, jittered) and ends the session if none comes before expiry.
func (s *Session) refreshLoop() {
	defer s.wg.Done()
	for {
		cur := s.Token()
		t := time.NewTimer(time.Until(token.RefreshAt(cur.Issued, cur.Expiry, nil)))
		select {
		case <-s.done:
			t.Stop()
			return
		case <-t.C:
		}
		if st := s.State(); st != StateOperation && st != StateDraining {
			return
		}
		corr := s.corr.Add(1)
		if err := s.send(&wire.TokenRefresh{TokenID: cur.ID}, 0, corr, 0); err != nil {
			s.fail(fmt.Errorf("%w: token refresh: %w", ErrPeerGone, err))
			return
		}
		t.Reset(time.Until(cur.Expiry))
		select {
		case <-s.done:
			t.Stop()
			return
		case <-s.tokenUp:
			t.Stop()
		case <-t.C:
			s.fail(&wire.Error{Code: wire.CodeAuth, Message: "token expired before TOKEN_REFRESH was answered"})
			return
		}
	}
}

func randomID() uint64 {
	var b [8]byte
	for {
		rand.Read(b[:])
		if v := binary.LittleEndian.Uint64(b[:]); v != 0 {
			return v
		}
	}
}

// regionSize is the REGIONS size of a ring region: its memfd's size, whole
// pages (§3.14, §5.1).
func regionSize(capacity uint32) uint64 { return uint64(ring.RegionSize(int(capacity))) }

// side names this end of the session, for messages.
func (s *Session) side() string {
	if s.kernel {
		return "kernel"
	}
	return "daemon"
}
