package sypas

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sypas/go/bulk"
	"github.com/sypas/go/control"
	"github.com/sypas/go/frame"
	"github.com/sypas/go/wire"
)

// clientConn is the Client's side of one session: the pending table and
// the reading of the kernel's ring.
//
// Replies are read by the callers themselves (leader/follower): a caller
// waiting for its reply takes the reader role if nobody holds it, reads
// frames until its own reply, delivering the others' replies to their
// slots and waking their callers, then hands the role to a waiting caller.
// With one call in flight a caller reads its own reply, so a call makes no
// goroutine hand-off. While subscriptions exist and no caller reads, a
// background reader does (subReader).
type clientConn struct {
	cl   *Client
	sess *control.Session
	tr   transport

	slots []slot
	free  chan *slot // idle slots; a caller waits here when max_in_flight are out

	// viewMu is read-held by the reader from recv to release, and held to
	// close the session (closeSession): Close swaps the rings' shared
	// memory for private pages, under which a frame would read as zeros.
	viewMu sync.RWMutex

	mu       sync.Mutex
	leading  bool         // the reader role is held
	ended    bool         // the session has ended: nobody parks any more (watch)
	bgLeads  bool         // by the background reader
	waiters  []*slot      // the callers parked in await, each once (slot.parked)
	nwaiters atomic.Int32 // len(waiters), for callerWaiting without mu
	bg       *slot        // the background reader's pseudo-slot, when it runs

	draining atomic.Bool // GOAWAY received: start nothing new
	pending  atomic.Int32
	idle     chan struct{}

	// Bulk (bulk.go): nil without BULK. rdesc is the reader's copy of
	// the BULK descriptor it is delivering.
	bc    bulkCarrier
	own   *bulk.Region
	peer  *bulk.PeerRegion
	rdesc wire.Bulk
}

// Slot states.
const (
	slotIdle       = iota
	slotWaiting    // request sent, reply awaited
	slotDelivering // the reader claimed the slot and writes the reply into it
	slotDone       // reply (or error) delivered
	slotAbandoned  // caller gone (ctx): the late reply frees the slot
)

// slot is one request in flight. Its correlation is gen<<32 | index+1, so
// a reply to an earlier use of the slot, or a forged id, never matches.
type slot struct {
	idx    uint32
	gen    uint32
	id     uint64
	state  atomic.Uint32
	wake   chan struct{} // cap 1: reply delivered, or the reader role is ours
	parked bool          // listed in clientConn.waiters; under clientConn.mu

	req wire.Request // encoded from here: no allocation per call

	// How the reply is delivered when another goroutine reads it.
	mode  uint8
	dst   []byte // modeInto: the caller's buffer, the reply appended to it
	buf   []byte // modeView: a slot-owned copy, reused
	reply []byte // the delivered body (modeOwn: a new slice; else dst or buf)
	err   error  // the kernel's ERROR, or the callback's error

	panicked any // the callback's panic as the reader (handView), raised again by take

	desc wire.Bulk // CallSpan: the request's descriptor, encoded from here
	// rspan is the kernel's bulk span a follower's view (modeView) is in,
	// released by take once fn has seen it; spanned says there is one.
	rspan   wire.Bulk
	spanned bool
}

// Delivery modes.
const (
	modeOwn  = iota // a new slice the caller keeps (Call)
	modeInto        // appended to the caller's buffer (CallInto)
	modeView        // a view for a callback (CallFunc)
)

func newClientConn(cl *Client, sess *control.Session) *clientConn {
	// Fewer outstanding than the kernel allows is always allowed: a
	// kernel's grant (any u32) must not size our memory.
	n := min(int(sess.Params().MaxInFlight), maxSlots)
	c := &clientConn{
		cl: cl, sess: sess, tr: cl.newTransport(sess),
		slots: make([]slot, n), free: make(chan *slot, n), idle: make(chan struct{}, 1),
	}
	for i := range c.slots {
		s := &c.slots[i]
		s.idx, s.wake = uint32(i), make(chan struct{}, 1)
		c.free <- s
	}
	if c.bc = carrier(c.tr); c.bc != nil {
		c.own, c.peer = c.bc.bulkRegions()
	}
	go c.watch()
	return c
}

// maxSlots bounds the requests a Client keeps outstanding on one session,
// whatever max_in_flight the kernel grants: each is a slot made up front.
const maxSlots = 4096

// acquire takes an idle slot, waiting while max_in_flight are out.
func (c *clientConn) acquire(ctx context.Context) (*slot, error) {
	select {
	case s := <-c.free:
		return c.arm(s), nil
	default:
	}
	select {
	case s := <-c.free:
		return c.arm(s), nil
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-c.sess.Done():
		return nil, c.tr.sessionErr(nil)
	}
}

// arm gives s a new correlation. The caller fills in the request and the
// delivery, then publishes the slot (state slotWaiting) before it sends:
// the reader reads those fields only after it has loaded that state.
func (c *clientConn) arm(s *slot) *slot {
	s.gen++
	s.id = uint64(s.gen)<<32 | uint64(s.idx+1)
	s.err, s.reply = nil, nil
	select { // a stale wake-up from the slot's last use
	case <-s.wake:
	default:
	}
	c.pending.Add(1)
	return s
}

// put returns s to the free list.
func (c *clientConn) put(s *slot) {
	s.state.Store(slotIdle)
	s.dst, s.req.Body, s.req.Method = nil, nil, nil
	c.free <- s
	if c.pending.Add(-1) == 0 && c.draining.Load() {
		select {
		case c.idle <- struct{}{}:
		default:
		}
	}
}

// call sends s's request and waits for the answer, delivered as s.mode
// says; fn, for modeView, sees the reply before call returns. s is free
// again when call returns. sent reports whether the request reached the
// ring (it may have been served).
func (c *clientConn) call(ctx context.Context, s *slot, t frame.Type, m wire.Message, oneWay bool, fn func([]byte) error) (reply []byte, sent bool, err error) {
	corr := s.id
	if oneWay {
		corr = 0 // and the slot stays idle: no answer may claim it
	} else {
		s.state.Store(slotWaiting) // publishes the slot's fields to the reader
	}
	if err := c.tr.send(ctx, frame.Header{Type: t, Correlation: corr}, nil, m, false); err != nil {
		// A reader may have claimed s for an answer meanwhile (the frame
		// went out before the session failed, or the kernel forged the
		// id): s is free only once nothing writes into it.
		if !s.state.CompareAndSwap(slotWaiting, slotIdle) {
			for s.state.Load() == slotDelivering {
				<-s.wake
			}
		}
		c.put(s)
		return nil, mayHaveSent(err), err
	}
	if oneWay {
		c.put(s)
		return nil, true, nil
	}
	reply, err = c.await(ctx, s, fn)
	return reply, true, err
}

// await waits for s's reply: as the reader if the role is free, else as a
// follower parked until it is woken with the reply or with the role.
func (c *clientConn) await(ctx context.Context, s *slot, fn func([]byte) error) ([]byte, error) {
	for {
		c.mu.Lock()
		c.unpark(s)
		if s.state.Load() == slotDone {
			c.mu.Unlock()
			return c.take(s, fn)
		}
		if !c.leading {
			c.leading = true
			c.mu.Unlock()
			err := c.lead(ctx, s, fn, false)
			c.handOff()
			if err != errOwnReply {
				return c.abandon(s, err, fn)
			}
			return c.take(s, nil)
		}
		if c.ended {
			c.mu.Unlock()
			return c.abandon(s, c.tr.sessionErr(nil), fn)
		}
		s.parked = true
		c.waiters = append(c.waiters, s)
		c.nwaiters.Store(int32(len(c.waiters)))
		nudge := c.bgLeads
		c.mu.Unlock()
		if nudge {
			c.tr.nudge() // the background reader hands us the role at once
		}
		// Not on the session's Done channel, which every caller would lock
		// to park and again to leave: the session's end wakes us (watch).
		if done := ctx.Done(); done == nil {
			<-s.wake
		} else {
			select {
			case <-s.wake:
			case <-done:
				c.unregister(s)
				return c.abandon(s, ctx.Err(), fn)
			}
		}
	}
}

// watch wakes every parked caller once the session has ended; from then
// on callers do not park (ended), and each gives up its call unless its
// reply came.
func (c *clientConn) watch() {
	<-c.sess.Done()
	c.mu.Lock()
	c.ended = true
	for _, w := range c.waiters {
		select {
		case w.wake <- struct{}{}:
		default:
		}
	}
	c.mu.Unlock()
}

// unpark takes s off the list of parked callers; under mu.
func (c *clientConn) unpark(s *slot) {
	if !s.parked {
		return
	}
	s.parked = false
	for i, w := range c.waiters {
		if w == s {
			c.waiters = append(c.waiters[:i], c.waiters[i+1:]...)
			c.nwaiters.Store(int32(len(c.waiters)))
			return
		}
	}
}

// errOwnReply ends lead: the leader's own reply has been taken in place.
var errOwnReply = errors.New("own reply")

// lead reads the kernel's ring as the reader until s's reply arrives (then
// errOwnReply, with fn having seen it in place), ctx ends or the session
// fails. With bg (the background reader) it also returns when a caller
// waits for the role. The caller holds the role; handOff gives it up.
func (c *clientConn) lead(ctx context.Context, s *slot, fn func([]byte) error, bg bool) error {
	dl, hasDL := ctx.Deadline()
	cancellable := ctx.Done() != nil && !hasDL
	woke := false // we delivered replies whose callers have not run yet
	read := 0     // frames delivered
	for {
		wait := dl
		switch {
		case woke:
			wait = probe // take what is there, but do not wait yet
		case cancellable:
			wait = time.Now().Add(readSlice)
		}
		c.viewMu.RLock()
		f, err := c.tr.recv(wait)
		if err != nil {
			c.viewMu.RUnlock()
			if errors.Is(err, os.ErrDeadlineExceeded) {
				if woke {
					// The callers we woke are queued on our P (a wake-up
					// puts them next in line there), and would wait behind
					// our spinning for their turn: let them run first.
					woke = false
					runtime.Gosched()
					if bg && c.callerWaiting() {
						return nil // a caller nudged us: the role is its
					}
					continue
				}
				if err := ctx.Err(); err != nil {
					return err
				}
				if hasDL && !time.Now().Before(dl) {
					return context.DeadlineExceeded // before ctx's timer says so
				}
				if bg && c.callerWaiting() {
					return nil
				}
				continue
			}
			return c.fail(err)
		}
		own, err := c.deliver(&f, s, fn)
		c.tr.release()
		c.viewMu.RUnlock()
		if err != nil {
			return c.fail(err)
		}
		if own {
			return errOwnReply
		}
		woke = woke || f.Type != frame.TypeEvent
		if bg && c.callerWaiting() {
			return nil
		}
		// The ring may never run dry (a busy topic, a kernel flooding stale
		// answers): look at the context every so often anyway.
		if read++; read%ctxEvery == 0 {
			if err := ctx.Err(); err != nil {
				return err
			}
			if hasDL && !time.Now().Before(dl) {
				return context.DeadlineExceeded
			}
		}
	}
}

// ctxEvery is how many frames a reader delivers between looks at its
// context while frames keep coming.
const ctxEvery = 64

// probe is a deadline already past: recv returns a frame that is there,
// and does not wait for one.
var probe = time.Unix(1, 0)

// readSlice bounds one wait of a reader whose context can be cancelled
// without a deadline: it looks at the context this often.
const readSlice = time.Millisecond

// deliver routes one frame from the kernel: a reply to its slot (own: it
// is s's, and fn or a copy has taken it), an event to its subscription.
func (c *clientConn) deliver(f *frame.Frame, s *slot, fn func([]byte) error) (own bool, err error) {
	switch f.Type {
	case frame.TypeResponse, frame.TypeError:
	case frame.TypeEvent:
		return false, c.cl.subs.deliver(f)
	case frame.TypeBulk:
		return c.deliverBulk(f, s, fn)
	default:
		return false, errorf(CodeProto, fmt.Sprintf("%v frame on the kernel's ring", f.Type))
	}
	return c.deliverReply(f, s, fn, nil)
}

// deliverReply routes a RESPONSE or ERROR to its slot. With span, the
// payload is a view of the kernel's bulk span, released once nothing reads
// it any more: after the copy, after fn, or at once for a stale reply.
func (c *clientConn) deliverReply(f *frame.Frame, s *slot, fn func([]byte) error, span *wire.Bulk) (own bool, err error) {
	release := func() {
		if span != nil {
			c.releaseSpan(span)
		}
	}
	corr := f.Correlation
	i := uint32(corr) - 1
	if corr == 0 || uint64(i) >= uint64(len(c.slots)) {
		release()
		return false, errorf(CodeProto, fmt.Sprintf("%v for correlation %#x, which names no request", f.Type, corr))
	}
	t := &c.slots[i]
	// The state first: it orders the owner's writes of id, mode and dst
	// before our reads.
	if st := t.state.Load(); st != slotWaiting && st != slotAbandoned || t.id != corr {
		release()
		return false, nil // a stale reply: its caller gave up, and the slot moved on
	}
	var body []byte
	var rerr error
	if f.Type == frame.TypeError {
		var m wire.ErrorMsg
		if err := m.Decode(f.Payload); err != nil {
			return false, &Error{Code: CodeProto, Message: "ERROR payload", Err: err}
		}
		rerr = m.Err()
	} else {
		if !f.Flags.Has(frame.FlagEndStream) {
			release()
			return false, errorf(CodeProto, "a streamed RESPONSE: version 1 replies are one frame")
		}
		body = f.Payload
	}
	if t == s {
		if fn != nil && rerr == nil {
			s.err = handView(s, fn, body) // in place: the reader's own reply
		} else {
			s.store(body, rerr)
		}
		release()
		s.state.Store(slotDone)
		return true, nil
	}
	// Claimed before we write into it: a caller that gives up meanwhile
	// (abandon) then waits for the reply rather than return, and no reply
	// lands in the buffer of a call that has returned.
	if !t.state.CompareAndSwap(slotWaiting, slotDelivering) {
		release()
		if t.state.CompareAndSwap(slotAbandoned, slotIdle) {
			t.gen++ // nothing may match it any more
			t.id = 0
			c.put(t)
		}
		return false, nil
	}
	if span != nil && t.mode == modeView && rerr == nil {
		// The follower's fn sees the span in place; take releases it.
		t.reply, t.err, t.rspan, t.spanned = body, nil, *span, true
	} else {
		t.store(body, rerr)
		release()
	}
	t.state.Store(slotDone)
	select {
	case t.wake <- struct{}{}:
	default:
	}
	return false, nil
}

// take returns the result delivered to s, handing a follower's view to fn
// first, and frees s. (A leader's own reply already went to fn, in place.)
func (c *clientConn) take(s *slot, fn func([]byte) error) ([]byte, error) {
	defer c.put(s) // also when fn panics, or panicked as the reader
	if p := s.panicked; p != nil {
		s.panicked = nil
		panic(p)
	}
	if s.spanned {
		defer c.releaseSpan(&s.rspan) // after fn, which reads the span in place
		s.spanned = false
	}
	reply, err := s.reply, s.err
	if err == nil && fn != nil {
		err = fn(reply) // s.buf: read before the slot is reused
		reply = nil
	}
	return reply, err
}

// handView hands the reader's own reply to fn, in place. A panic in fn is
// kept in s and raised again by take, once the reader role and the ring's
// view are given back: raised in the reader, it kept them, and every later
// call and Close waited for them for ever.
// store delivers a reply to t, as t.mode says: rerr, or body appended to
// the caller's buffer, copied into the slot's own (a view for fn, which
// take hands over), or into a new slice.
func (t *slot) store(body []byte, rerr error) {
	t.err = rerr
	if rerr != nil {
		return
	}
	switch t.mode {
	case modeInto:
		t.reply = append(t.dst, body...)
	case modeView:
		t.buf = append(t.buf[:0], body...)
		t.reply = t.buf
	default:
		t.reply = append([]byte(nil), body...)
	}
}

func handView(s *slot, fn func([]byte) error, b []byte) (err error) {
	defer func() {
		if p := recover(); p != nil {
			s.panicked = p
		}
	}()
	return fn(b)
}

// abandon gives up on s's reply because of err. A reply delivered (or
// being delivered) meanwhile wins: it is returned as usual, fn included.
func (c *clientConn) abandon(s *slot, err error, fn func([]byte) error) ([]byte, error) {
	if s.state.CompareAndSwap(slotWaiting, slotAbandoned) {
		if c.own != nil {
			// The request may hold a span of our bulk region, whose ACK
			// comes once the handler returns, when perhaps no caller reads
			// the ring any more: unread, it would keep the span, and a
			// full region waits for nothing (bulk.go).
			c.startSubReader()
		}
		return nil, err // the late reply frees the slot; or it dies with the session
	}
	for s.state.Load() == slotDelivering {
		<-s.wake // the reader is copying it: it wakes us once done
	}
	return c.take(s, fn)
}

// handOff gives up the reader role and wakes a waiting caller to take it:
// the most recent one parked and still waiting, or else the background
// reader. (Parked callers whose reply came leave by themselves.)
func (c *clientConn) handOff() {
	c.mu.Lock()
	c.leading, c.bgLeads = false, false
	var next *slot
	for i := len(c.waiters) - 1; i >= 0; i-- {
		if w := c.waiters[i]; w.state.Load() == slotWaiting {
			next = w
			c.unpark(w)
			break
		}
	}
	if next == nil && c.bgWaiting() {
		next = c.bg
	}
	c.mu.Unlock()
	if next != nil {
		select {
		case next.wake <- struct{}{}:
		default:
		}
	}
}

func (c *clientConn) unregister(s *slot) {
	c.mu.Lock()
	// Unparked by someone else: handOff picked us, and its wake-up may
	// not have arrived yet.
	handed := !s.parked
	c.unpark(s)
	c.mu.Unlock()
	// A role handed to us as we left must not be lost.
	select {
	case <-s.wake:
		handed = true
	default:
	}
	if handed {
		c.mu.Lock()
		free := !c.leading
		c.mu.Unlock()
		if free {
			c.handOffIfWaiting()
		}
	}
}

// handOffIfWaiting wakes a waiter (a caller, or the background reader)
// when nobody reads.
func (c *clientConn) handOffIfWaiting() {
	c.mu.Lock()
	if c.leading || len(c.waiters) == 0 && !c.bgWaiting() {
		c.mu.Unlock()
		return
	}
	c.leading = true
	c.mu.Unlock()
	c.handOff()
}

// bgWaiting reports whether the background reader is registered; under mu.
func (c *clientConn) bgWaiting() bool { return c.bg != nil && c.bg.state.Load() == slotWaiting }

// subReader reads the kernel's ring while subscriptions exist and no caller
// does, so events keep flowing between calls. It gives the role to any
// caller that asks (callers read their own replies faster) and takes it
// back when the role is free.
//
// It waits for frames without a deadline: a caller that wants the role
// nudges it (await), and the session's end interrupts the ring.
func (c *clientConn) subReader() {
	bg := c.bg
	for {
		c.mu.Lock()
		if !c.leading {
			c.leading, c.bgLeads = true, true
			bg.state.Store(slotIdle)
			c.mu.Unlock()
			err := c.lead(context.Background(), bg, nil, true)
			c.handOff()
			if err != nil {
				return // the session failed
			}
			if f := afterBgHandOff.Load(); f != nil {
				(*f)()
			}
			continue // look again: the caller may be done with the role already
		}
		bg.state.Store(slotWaiting)
		c.mu.Unlock()
		select {
		case <-bg.wake:
		case <-c.sess.Done():
			return
		}
	}
}

// afterBgHandOff, set by tests only, runs in subReader right after it has
// handed the role to a caller.
var afterBgHandOff atomic.Pointer[func()]

// startSubReader runs subReader, once, until the session ends.
func (c *clientConn) startSubReader() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.bg != nil {
		return
	}
	c.bg = &slot{wake: make(chan struct{}, 1)}
	go c.subReader()
}

// callerWaiting reports whether a caller (not the background reader)
// waits for the role.
func (c *clientConn) callerWaiting() bool {
	if c.nwaiters.Load() == 0 {
		return false // the background reader asks after every event: no lock for it
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, w := range c.waiters {
		if w.state.Load() == slotWaiting {
			return true
		}
	}
	return false
}

// closeSession ends the session, orderly (Shutdown, within ctx) or not
// (Close), once no reader holds a frame of its rings (viewMu).
func (c *clientConn) closeSession(ctx context.Context, orderly bool) error {
	c.tr.stop()
	c.viewMu.Lock()
	defer c.viewMu.Unlock()
	if orderly {
		return c.sess.Shutdown(ctx)
	}
	return c.sess.Close()
}

// fail turns a reader's error into the session's end: a frame the kernel
// should not have sent ends the session with the reason (the kernel is
// told); every waiter sees the error.
func (c *clientConn) fail(err error) error {
	var e *Error
	if errors.As(err, &e) && e.Code == CodeProto && c.sess.Err() == nil {
		c.sess.Abort(err)
	}
	return err
}

// dropCount reads the kernel's count of events lost before this one, from
// the EVENT's header extension (docs/PROTOCOL.md §8.3).
func dropCount(f *frame.Frame) uint64 {
	if len(f.Extension) >= 8 {
		return binary.LittleEndian.Uint64(f.Extension)
	}
	return 0
}
