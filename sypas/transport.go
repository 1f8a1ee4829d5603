package sypas

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"time"

	"github.com/sypas/go/bulk"
	"github.com/sypas/go/control"
	"github.com/sypas/go/frame"
	"github.com/sypas/go/ring"
	"github.com/sypas/go/wire"
)

// transport carries the data-plane frames of one session (docs/PROTOCOL.md
// §8) between a daemon and the kernel. Client and Server speak only
// through it: the shared-memory rings are the first implementation, and
// frames inline on a socket, TCP and gRPC are each another.
type transport interface {
	// send writes one frame carrying m, with ext (nil, or a multiple of 8
	// bytes) as its header extension. h gives Type, Flags and Correlation;
	// the transport sets the lengths, the stream, the sequence and
	// cap_ref. Safe for concurrent use. ctx bounds waiting for room and
	// for the other senders; a payload over the session's limit fails
	// with an error matching ErrTooLarge before anything is written. With
	// noWait, a send that would wait for room fails with errFull instead.
	// An error for which mayHaveSent holds came after the frame was
	// published: the peer may have read it.
	send(ctx context.Context, h frame.Header, ext []byte, m wire.Message, noWait bool) error
	// recv returns the next frame, waiting until the deadline (zero:
	// none). Its Extension and Payload stay valid until release. One
	// goroutine at a time.
	recv(deadline time.Time) (frame.Frame, error)
	// release hands back every frame recv returned.
	release()
	// nudge makes a recv waiting in another goroutine return at once with
	// os.ErrDeadlineExceeded, as if its deadline had passed.
	nudge()
	// stop makes recv, waiting or not, fail from now on (with why the
	// session ended, or that it is closing): the session is about to be
	// closed, and no reader may hold a frame across that.
	stop()
	// sessionErr is err as the caller should see it: once the session has
	// ended (or is ending), an error that says why, matching ErrUnavailable
	// unless the reason has a code of its own; nil err asks only for that.
	sessionErr(err error) error
	// maxPayload is the largest payload send accepts: the session's
	// max_payload, or its bulk region's size on a bulkCarrier (bulk.go).
	maxPayload() int
	// session is the control-plane session the frames belong to: identity,
	// token, liveness.
	session() *control.Session
	// buffered reports whether recv has a frame ready without waiting (a
	// hint: it may still wait, say when only padding is left).
	buffered() bool
	// drained reports whether every frame the peer has sent so far has
	// been received and released. Unlike recv, any goroutine may call it.
	drained() bool
	// hold makes sends leave the publishing of their frames to flush, so
	// a reader answering a burst publishes the answers once. flush
	// publishes what is held and ends hold; the holder must call it
	// before it waits for the peer, which may be waiting for those frames.
	hold()
	flush()
}

// ringTransport carries frames in the session's two rings, one frame per
// ring record.
//
// Senders take turns (turns) and the producer publishes with one Flush per
// burst. A noWait sender (an event under DropNewest) never queues behind a
// holder that waits for room in the peer's ring: the ring is full, so it
// gives up at once.
type ringTransport struct {
	sess *control.Session
	max  int
	// writeTimeout bounds a send's wait for room when ctx has no
	// deadline (the kernel: a daemon that never reads must not hold its
	// reply writers for ever); 0 means no bound.
	writeTimeout time.Duration

	turns
	stalled atomic.Bool    // the lock's holder waits for room in the peer's ring
	kick    chan struct{}  // cap 1: wakes the noWait senders queued behind a stalled holder
	prod    *ring.Producer // under lock
	seq     uint64         // under lock: sequence of the last frame sent

	cons     *ring.Consumer // the receiving goroutine's
	rseq     uint64         // sequence of the last frame received
	deadline time.Time      // the consumer's wait deadline, as last set
	nudged   atomic.Bool    // nudge changed the deadline behind recv's back
	stopped  atomic.Bool    // stop was called
	fcfg     frame.Config

	// The session's bulk regions (bulk.go), nil without BULK: payloads
	// over max go through own.
	own  *bulk.Region
	peer *bulk.PeerRegion
	desc wire.Bulk // under lock: the descriptor sendDesc writes
}

func newRingTransport(s *control.Session, writeTimeout time.Duration) *ringTransport {
	max := int(s.Params().MaxPayload)
	t := &ringTransport{
		sess: s, max: max, writeTimeout: writeTimeout,
		kick: make(chan struct{}, 1),
		prod: s.Producer(), cons: s.Consumer(),
		own: s.Bulk(), peer: s.PeerBulk(),
		// Decode whatever fits a record: a frame over max_payload is still
		// read whole, so the kernel can refuse it with its correlation.
		fcfg: frame.Config{MaxPayload: frame.HardMaxPayload},
	}
	t.turns.init(t.prod.Flush, t.sessionErr)
	return t
}

func (t *ringTransport) session() *control.Session { return t.sess }

// maxPayload is max_payload, or the bulk region's size when payloads
// over max_payload go through it.
func (t *ringTransport) maxPayload() int {
	if t.own != nil {
		return max(t.max, t.own.Size())
	}
	return t.max
}

func (t *ringTransport) send(ctx context.Context, h frame.Header, ext []byte, m wire.Message, noWait bool) error {
	n := m.Len()
	if n > t.max && t.own != nil && bulkable(h.Type) {
		return t.sendSpan(ctx, h, ext, m, n, noWait)
	}
	if n > t.max {
		return &Error{Code: CodeTooLarge, Message: fmt.Sprintf("%v payload of %d bytes, the session's limit is %d", h.Type, n, t.max)}
	}
	select {
	case t.lock <- struct{}{}:
	default:
		if err := t.queue(ctx, noWait); err != nil {
			return err
		}
	}
	err := t.write(ctx, &h, ext, m, n, noWait)
	return t.unlock(err)
}

// queue waits for the lock, within ctx; with noWait, only while its holder
// is not waiting for room.
func (t *ringTransport) queue(ctx context.Context, noWait bool) error {
	t.waiting.Add(1)
	var kick chan struct{}
	if noWait {
		kick = t.kick
	}
	for {
		if noWait && t.stalled.Load() {
			select { // wake the next noWait sender queued behind it
			case t.kick <- struct{}{}:
			default:
			}
			t.leave()
			return errFull
		}
		select {
		case t.lock <- struct{}{}:
			t.waiting.Add(-1)
			return nil
		case <-kick:
		case <-ctx.Done():
			t.leave()
			return ctx.Err()
		case <-t.sess.Done():
			t.leave()
			return t.sessionErr(nil)
		}
	}
}

// write puts one frame of payload length n in the ring; under lock.
func (t *ringTransport) write(ctx context.Context, h *frame.Header, ext []byte, m wire.Message, n int, noWait bool) error {
	hl := frame.HeaderSize + len(ext)
	total := hl + n
	buf := t.prod.TryReserve(total)
	if buf == nil {
		var err error
		if buf, err = t.reserve(ctx, total, noWait); err != nil {
			return err
		}
	}
	h.HeaderLen, h.PayloadLen, h.StreamID = uint16(hl), uint32(n), 1
	h.Sequence, h.CapRef = t.seq+1, t.sess.CapRef()
	if err := h.Put(buf); err != nil {
		t.prod.Abandon()
		return err
	}
	copy(buf[frame.HeaderSize:hl], ext)
	if p, err := m.Append(buf[hl:hl:total]); err != nil || len(p) != n {
		t.prod.Abandon()
		return fmt.Errorf("sypas: encode %v: %w", h.Type, err)
	}
	if err := t.prod.Commit(total); err != nil {
		return t.sessionErr(err)
	}
	t.seq++
	t.dirty.Store(true)
	return nil
}

// writtenErr is a send that failed after its frame was published, when the
// Flush found the session ending: the peer may have read the frame before
// it went (a kernel reads, serves and closes), so the frame counts as sent.
type writtenErr struct{ err error }

func (e *writtenErr) Error() string { return e.err.Error() }
func (e *writtenErr) Unwrap() error { return e.err }

// mayHaveSent reports whether a send that failed with err may have reached
// the peer.
func mayHaveSent(err error) bool {
	var w *writtenErr
	return errors.As(err, &w)
}

// errFull is a noWait send that found no room.
var errFull = &Error{Code: CodeResource, Message: "no room in the peer's ring"}

// reserve is the slow path of write: publish what is committed, then wait
// for room until ctx's deadline (or writeTimeout); with noWait, not at all.
func (t *ringTransport) reserve(ctx context.Context, total int, noWait bool) ([]byte, error) {
	if t.dirty.Load() {
		t.dirty.Store(false)
		if err := t.prod.Flush(); err != nil {
			return nil, t.sessionErr(err)
		}
	}
	// Take room that is there without waiting (a stale cached head, a new
	// lap), so that stalled means a real wait.
	t.prod.SetWaitDeadline(time.Unix(1, 0))
	buf, err := t.prod.Reserve(total)
	ctxDeadline := false
	if errors.Is(err, os.ErrDeadlineExceeded) && !noWait {
		dl, ok := ctx.Deadline()
		ctxDeadline = ok
		if !ok && t.writeTimeout > 0 {
			dl = time.Now().Add(t.writeTimeout)
		}
		t.prod.SetWaitDeadline(dl)
		t.stalled.Store(true)
		select { // the noWait senders queued behind us give up
		case t.kick <- struct{}{}:
		default:
		}
		buf, err = t.waitRoom(ctx, total)
		t.stalled.Store(false)
	}
	t.prod.SetWaitDeadline(time.Time{})
	if errors.Is(err, os.ErrDeadlineExceeded) {
		if noWait {
			return nil, errFull
		}
		if ctxDeadline { // perhaps before ctx's own timer says so
			return nil, context.DeadlineExceeded
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		return nil, &Error{Code: CodeResource, Message: "the peer's ring stayed full: it reads nothing", Err: err}
	}
	if err != nil {
		return nil, t.sessionErr(err)
	}
	return buf, nil
}

// waitRoom is Reserve, ended early by ctx's cancellation (its deadline is
// the producer's already).
func (t *ringTransport) waitRoom(ctx context.Context, total int) ([]byte, error) {
	if ctx.Done() == nil {
		return t.prod.Reserve(total)
	}
	woken := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		t.prod.SetDeadline(time.Unix(1, 0)) // wakes the waiting Reserve
		close(woken)
	})
	buf, err := t.prod.Reserve(total)
	if !stop() {
		<-woken // before the caller resets the deadline
	}
	return buf, err
}

func (t *ringTransport) recv(deadline time.Time) (frame.Frame, error) {
	if t.nudged.Load() && t.nudged.CompareAndSwap(true, false) || !deadline.Equal(t.deadline) {
		t.cons.SetWaitDeadline(deadline)
		t.deadline = deadline
	}
	var f frame.Frame
	if t.stopped.Load() { // after setting the deadline: stop's wake-up is never undone
		return f, stoppedErr(t.sess)
	}
	v, err := t.cons.Next()
	if err != nil {
		return f, recvErr(t.stopped.Load(), t.sess, err, t.sessionErr)
	}
	if _, err := f.Decode(v, t.fcfg); err != nil {
		return f, &Error{Code: CodeProto, Message: "a ring record is not a frame", Err: err}
	}
	if f.Sequence != t.rseq+1 {
		return f, errorf(CodeProto, fmt.Sprintf("%v frame with sequence %d on the ring, want %d", f.Type, f.Sequence, t.rseq+1))
	}
	t.rseq++
	return f, nil
}

func (t *ringTransport) release() { t.cons.Release() }

func (t *ringTransport) buffered() bool { return t.cons.Buffered() }

func (t *ringTransport) drained() bool { return t.cons.Drained() }

func (t *ringTransport) nudge() {
	t.cons.SetDeadline(time.Unix(1, 0)) // wakes the waiting Next
	t.nudged.Store(true)                // after: the next recv restores its own
}

func (t *ringTransport) stop() {
	t.stopped.Store(true)
	t.cons.SetDeadline(time.Unix(1, 0)) // after: a recv that missed the flag is woken
}

// stoppedErr is recv's error after stop: why the session ended, or that
// it is being closed.
func stoppedErr(s *control.Session) error { return unavailable(s.Err()) }

// recvErr is recv's error when waiting for a frame failed with err: as
// after stop if it came (stop wakes the wait), err itself at a deadline,
// else the session's end (sessionErr).
func recvErr(stopped bool, s *control.Session, err error, sessionErr func(error) error) error {
	switch {
	case stopped:
		return stoppedErr(s)
	case errors.Is(err, os.ErrDeadlineExceeded):
		return err
	}
	return sessionErr(err)
}

// sessionErr turns the error of a ring call into the session's end, so that
// callers see why it ended (ErrPeerGone, E_AUTH...) rather than a bare
// ring.ErrClosed or io.EOF: a ring fails only when its session is ending,
// a moment before the session records why (Close closes the rings first;
// a peer that closes its end hangs up next), so sessionErr waits for the
// reason, at most endGrace. A corrupt ring is the peer breaking the
// protocol: E_PROTO, which ends the session.
func (t *ringTransport) sessionErr(err error) error {
	if errors.Is(err, ring.ErrCorrupt) {
		return &Error{Code: CodeProto, Message: "the peer corrupted the ring", Err: err}
	}
	return endedErr(t.sess, err)
}

// endedErr is sessionErr for any transport: err, a failure of the
// transport that means sess is ending, turned into why it ended (waiting
// for the reason at most endGrace).
func endedErr(sess *control.Session, err error) error {
	select {
	case <-sess.Done():
	default:
		if err == nil {
			return unavailable(control.ErrSessionClosed)
		}
		tm := time.NewTimer(endGrace)
		select {
		case <-sess.Done():
		case <-tm.C:
		}
		tm.Stop()
	}
	if e := sess.Err(); e != nil {
		return unavailable(e)
	}
	return unavailable(err)
}

// endGrace bounds sessionErr's wait for the session's reason.
const endGrace = 250 * time.Millisecond

// sessionEnded is the error of a call whose session ended under it (or
// was gone when it began): it wraps why the session ended, and matches
// ErrUnavailable unless that reason carries a code of its own (E_AUTH for
// a revoked token, say).
type sessionEnded struct{ err error }

func (e *sessionEnded) Error() string { return "sypas: no session: " + e.err.Error() }
func (e *sessionEnded) Unwrap() error { return e.err }
func (e *sessionEnded) Is(target error) bool {
	var c *Error
	return target == ErrUnavailable && !errors.As(e.err, &c)
}

func unavailable(err error) error {
	if err == nil {
		err = control.ErrSessionClosed
	}
	var se *sessionEnded
	if errors.As(err, &se) {
		return err
	}
	return &sessionEnded{err}
}
