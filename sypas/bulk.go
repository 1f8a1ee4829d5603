package sypas

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/sypas/go/bulk"
	"github.com/sypas/go/control"
	"github.com/sypas/go/control/token"
	"github.com/sypas/go/frame"
	"github.com/sypas/go/wire"
)

// Bulk transfers (docs/PROTOCOL.md §8.7): a REQUEST, RESPONSE or EVENT
// whose payload is over the session's max_payload travels as a BULK frame
// on the ring, whose 40-byte descriptor names a span of the sender's bulk
// region holding exactly the bytes the inline payload would have held. The
// receiver reads the span in place and releases it with a BULK frame with
// flag ACK echoing the descriptor.
//
// Ownership: the sender's span is the peer's from the moment its BULK
// frame may have been read until the ACK (or the session's end, when
// control.Session takes every span back with ReleaseAll). A receiver
// releases every span whose descriptor it accepted exactly once: after
// the handler returned (kernel), after the copy or the callback (daemon),
// or at once when it refuses the request. A descriptor it cannot accept
// (outside the sender's region) it refuses and never releases.

// bulkCarrier is a transport that can carry bulk spans: the rings of a
// session that granted BULK. Other transports (inline, and those to come)
// carry none, and a payload over their limit fails with ErrTooLarge.
type bulkCarrier interface {
	// bulkRegions are the session's bulk regions: this side's, which its
	// descriptors name, and the peer's as mapped here.
	bulkRegions() (*bulk.Region, *bulk.PeerRegion)
	// sendDesc sends a BULK frame carrying d: a span this side sent
	// (h.Flags as the inner type's), or with FlagAck the release of a
	// span of the peer's.
	sendDesc(ctx context.Context, h frame.Header, ext []byte, d *wire.Bulk, noWait bool) error
	// sendHeld sends sp, a span of this side's region it holds, as a
	// frame of type h.Type by descriptor (sendDesc): sp is the peer's once
	// the frame may have left, and comes back with its ACK or the
	// session's end; before that it is given back here (Free if Send
	// refuses it, Unsend if the frame never left).
	sendHeld(ctx context.Context, h frame.Header, ext []byte, sp bulk.Span, noWait bool) error
}

// carrier returns tr as a bulkCarrier if its session has bulk regions.
func carrier(tr transport) bulkCarrier {
	if bc, ok := tr.(bulkCarrier); ok {
		if own, _ := bc.bulkRegions(); own != nil {
			return bc
		}
	}
	return nil
}

func (t *ringTransport) bulkRegions() (*bulk.Region, *bulk.PeerRegion) { return t.own, t.peer }

// sendDesc writes one BULK frame carrying d, in the senders' turn. d is
// copied under the lock into t.desc, so the frame is encoded from memory
// the transport owns: a send allocates nothing.
func (t *ringTransport) sendDesc(ctx context.Context, h frame.Header, ext []byte, d *wire.Bulk, noWait bool) error {
	select {
	case t.lock <- struct{}{}:
	default:
		if err := t.queue(ctx, noWait); err != nil {
			return err
		}
	}
	h.Type = frame.TypeBulk
	t.desc = *d
	err := t.write(ctx, &h, ext, &t.desc, t.desc.Len(), noWait)
	return t.unlock(err)
}

// sendSpan is send for a payload m of n bytes over max_payload: it
// allocates a span of this side's bulk region (waiting for room until
// ctx's deadline, or writeTimeout when ctx has none; with noWait not at
// all), encodes m into it and sends its descriptor. A region that stays
// full fails with an error matching ErrResource; a payload larger than
// the region with ErrTooLarge.
func (t *ringTransport) sendSpan(ctx context.Context, h frame.Header, ext []byte, m wire.Message, n int, noWait bool) error {
	var sp bulk.Span
	var err error
	if noWait {
		sp, err = t.own.Alloc(doneCtx, n) // a free span, or a failure counted in Stats.Full
	} else {
		sp, err = allocWait(ctx, t.own, n, t.writeTimeout)
	}
	if err != nil {
		if noWait && errors.Is(err, bulk.ErrFull) {
			return errFull
		}
		return fmt.Errorf("sypas: %v payload of %d bytes: %w", h.Type, n, err)
	}
	if p, err := m.Append(sp.Bytes()[:0]); err != nil || len(p) != n {
		t.own.Free(sp)
		return fmt.Errorf("sypas: encode %v into a bulk span: %w", h.Type, err)
	}
	return t.sendHeld(ctx, h, ext, sp, noWait)
}

// sendHeld: see bulkCarrier. d is a local: sendDesc, a method of
// *ringTransport called as one, copies it, so it stays on the stack.
func (t *ringTransport) sendHeld(ctx context.Context, h frame.Header, ext []byte, sp bulk.Span, noWait bool) error {
	d, err := t.own.Send(sp, h.Type, 0)
	if err != nil {
		t.own.Free(sp)
		return t.sessionErr(err)
	}
	if err := t.sendDesc(ctx, h, ext, &d, noWait); err != nil {
		if !mayHaveSent(err) {
			t.own.Unsend(sp) // the peer never saw it
		}
		return err
	}
	return nil
}

// allocWait takes a span of n bytes of own, waiting for room until ctx's
// deadline, or for timeout when ctx has none (not 0). The timer is made
// only when the region is full: the common case allocates nothing.
func allocWait(ctx context.Context, own *bulk.Region, n int, timeout time.Duration) (bulk.Span, error) {
	sp, err := own.TryAlloc(n)
	if !errors.Is(err, bulk.ErrFull) {
		return sp, err
	}
	if _, ok := ctx.Deadline(); !ok && timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	return own.Alloc(ctx, n)
}

// doneCtx is a context that is already done: Alloc with it takes a free
// span or fails at once.
var doneCtx = func() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}()

// bulkable reports whether a frame of type t may travel as a bulk span.
func bulkable(t frame.Type) bool {
	return t == frame.TypeRequest || t == frame.TypeResponse || t == frame.TypeEvent
}

// bulkFrame checks a BULK frame's descriptor as every receiver does
// first: the feature granted, the payload a BULK descriptor, and for an
// ACK a correlation of 0 and no flag but ACK (and CHECKSUM). d is the
// receiver's private copy. An error ends the session (E_PROTO).
func bulkFrame(f *frame.Frame, peer *bulk.PeerRegion, d *wire.Bulk) error {
	if peer == nil {
		return errorf(CodeProto, "BULK frame on a session that did not grant BULK (docs/PROTOCOL.md §8.7)")
	}
	if err := d.Decode(f.Payload); err != nil {
		return &Error{Code: CodeProto, Message: "BULK payload", Err: err}
	}
	if f.Flags.Has(frame.FlagAck) && (f.Correlation != 0 || f.Flags&^(frame.FlagAck|frame.FlagChecksum) != 0) {
		return errorf(CodeProto, fmt.Sprintf("BULK ACK with correlation %d and flags %v: want 0 and ACK", f.Correlation, f.Flags))
	}
	return nil
}

// ackErr is the error that ends a session whose peer sent an ACK this
// side's region refused (a double ACK, a lease never sent, another
// region's): the allocator is unchanged, and the refusal counted
// (bulk.Stats.Refused).
func ackErr(err error) error {
	return &Error{Code: CodeProto, Message: "BULK ACK refused: " + err.Error(), Err: err}
}

// releaseHeader is the header of a BULK ACK.
var releaseHeader = frame.Header{Type: frame.TypeBulk, Flags: frame.FlagAck}

// ------------------------------------------------------------ kernel side

// serveBulk checks a BULK frame from the daemon (docs/PROTOCOL.md §8.7):
// an ACK releases a span of the kernel's region; a REQUEST in a span is
// checked like an inline one, plus the bulk right, and served from the
// span in place, which is released once the handler has returned.
func (c *serverConn) serveBulk(f *frame.Frame) {
	d := &c.desc
	if err := bulkFrame(f, c.peer, d); err != nil {
		c.sess.Abort(err)
		return
	}
	if f.Flags.Has(frame.FlagAck) {
		if err := c.own.Ack(d); err != nil {
			c.srv.stats.bulkRefused.Add(1)
			c.sess.Abort(ackErr(err))
		}
		return
	}
	if d.InnerType != frame.TypeRequest || f.Flags&^frame.FlagChecksum != 0 {
		c.sess.Abort(errorf(CodeProto, fmt.Sprintf("BULK carrying %v with flags %v on the daemon's ring: want REQUEST, no flags", d.InnerType, f.Flags)))
		return
	}
	view, err := c.peer.View(d)
	if err != nil {
		// Not a span of the daemon's region: nothing to release.
		c.srv.stats.bulkRefused.Add(1)
		c.deny(f.Correlation, "", CodeProto, control.EventProtocol, "BULK descriptor outside the daemon's bulk region")
		return
	}
	c.serveRequest(f, view, d)
}

// releaseSpan sends the ACK that gives a span back to the daemon.
func (c *serverConn) releaseSpan(d *wire.Bulk) {
	if err := c.bc.sendDesc(c.ctx, releaseHeader, nil, d, false); err != nil {
		c.sendFailed(err)
	}
}

// bulkAllowed reports whether the session's token grants the bulk right.
func (c *serverConn) bulkAllowed() bool {
	cp := c.sess.Capability()
	return cp != nil && cp.Rights&token.RightBulk != 0
}

// ------------------------------------------------------------ daemon side

// deliverBulk takes a BULK frame from the kernel: an ACK releases a span of
// the daemon's region; a RESPONSE or an EVENT in a span is delivered from
// the span in place, then released (after the copy, or after the callback
// that sees it).
func (c *clientConn) deliverBulk(f *frame.Frame, s *slot, fn func([]byte) error) (bool, error) {
	d := &c.rdesc // the reader's: a local would escape (sendDesc is an interface's)
	if err := bulkFrame(f, c.peer, d); err != nil {
		return false, err
	}
	if f.Flags.Has(frame.FlagAck) {
		if err := c.own.Ack(d); err != nil {
			return false, ackErr(err)
		}
		return false, nil
	}
	view, err := c.peer.View(d)
	if err != nil {
		return false, &Error{Code: CodeProto, Message: "BULK descriptor outside the kernel's bulk region", Err: err}
	}
	inner := *f
	inner.Type, inner.Payload = d.InnerType, view
	switch d.InnerType {
	case frame.TypeEvent:
		if f.Correlation != 0 || f.Flags&^frame.FlagChecksum != 0 {
			return false, errorf(CodeProto, "BULK EVENT with a correlation or flags")
		}
		err := c.cl.subs.deliver(&inner) // copies
		c.releaseSpan(d)
		return false, err
	case frame.TypeResponse:
		return c.deliverReply(&inner, s, fn, d)
	}
	return false, errorf(CodeProto, fmt.Sprintf("BULK carrying %v on the kernel's ring: want RESPONSE or EVENT", d.InnerType))
}

// releaseSpan sends the ACK that gives a span back to the kernel. A
// failure means the session is ending, and the kernel takes its spans
// back then.
//
// The reader calls it, and must not wait for room in its own ring: the
// kernel may be waiting for room in the reader's ring to answer the request
// it would next read. When the ring is full the ACK goes from a goroutine
// of its own (rare: ACKs are 88 bytes), so the reader goes on reading.
func (c *clientConn) releaseSpan(d *wire.Bulk) {
	if err := c.bc.sendDesc(context.Background(), releaseHeader, nil, d, true); errors.Is(err, errFull) {
		go func(d wire.Bulk) {
			c.bc.sendDesc(context.Background(), releaseHeader, nil, &d, false)
		}(*d)
	}
}

// Span is a request body written in place in the session's bulk region:
// the zero-copy way to send a large body. AllocSpan reserves it, Bytes is
// the memory to fill (read a file straight into it, say), and CallSpan
// sends it: the kernel's handler reads those very bytes, with no copy on
// either side.
//
// Lifetime: a Span belongs to its caller from AllocSpan until it is passed
// to CallSpan or Free, exactly once; after that its bytes are the kernel's
// to read, then the region's to reuse, and must not be touched. A Span
// is tied to the session it was allocated on: if that session ends first,
// CallSpan fails with an error matching ErrUnavailable (the memory is
// gone; allocate again). A Span is a small value: copies name the same
// span.
type Span struct {
	cc  *clientConn
	sp  bulk.Span
	hdr int // the REQUEST's bytes before the body: timeout_ns, method_len, method
	op  string
}

// AllocSpan reserves a request body of n bytes for op in the bulk region of
// the current session, waiting for room until ctx ends. A region that stays
// full fails with an error matching ErrResource (and ctx's error); a body
// larger than the region, or a session without bulk regions (the inline
// transport, or a kernel that did not grant BULK), with ErrTooLarge.
// AllocSpan takes no lock and allocates nothing while the region has room.
func (c *Client) AllocSpan(ctx context.Context, op string, n int) (Span, error) {
	if op == "" || len(op) > wire.MaxNameLen {
		return Span{}, fmt.Errorf("sypas: op of %d bytes: %w (1..%d)", len(op), ErrInvalidOp, wire.MaxNameLen)
	}
	cc, err := c.conn(ctx, false)
	if err != nil {
		return Span{}, err
	}
	if cc.own == nil {
		return Span{}, errorf(CodeTooLarge, "no bulk region on this session (inline transport, or BULK not granted)")
	}
	hdr := 10 + len(op)
	if n < 0 || hdr+n > cc.own.Size() {
		return Span{}, &Error{Code: CodeTooLarge, Message: fmt.Sprintf("request of %d bytes, the bulk region holds %d", hdr+n, cc.own.Size())}
	}
	sp, err := cc.own.Alloc(ctx, hdr+n)
	if err != nil {
		return Span{}, err
	}
	b := sp.Bytes()
	b[8], b[9] = byte(len(op)), byte(len(op)>>8)
	copy(b[10:], op)
	return Span{cc: cc, sp: sp, hdr: hdr, op: op}, nil
}

// Bytes is the body to fill, exactly the n bytes AllocSpan was asked for.
// Write it before CallSpan; do not keep it after.
func (s Span) Bytes() []byte {
	b := s.sp.Bytes()
	if b == nil {
		return nil
	}
	return b[s.hdr:]
}

// Free gives back a span that will not be sent. A span already passed to
// CallSpan is the kernel's until it releases it, whatever the call's
// outcome: Free then fails with an error matching os.ErrInvalid and
// changes nothing (so a deferred Free after CallSpan is harmless).
func (s Span) Free() error {
	if s.cc == nil {
		return fmt.Errorf("sypas: free of a zero Span: %w", bulk.ErrInvalid)
	}
	return s.cc.own.Free(s.sp)
}

// CallSpan calls the span's op with the span as its body, and hands the
// reply to fn as CallFunc does: a view valid until fn returns (nil fn:
// the reply is dropped). The span is consumed whatever happens: sent (the
// kernel releases it once its handler has returned) or freed. No retry:
// a body sent may have been served. A Span freed, or passed to CallSpan
// before, fails with an error matching os.ErrInvalid, and nothing is
// written or sent. Made with a span, a call moves its body with no copy
// and no allocation.
func (c *Client) CallSpan(ctx context.Context, s Span, fn func(reply []byte) error) error {
	cc := s.cc
	if cc == nil {
		return fmt.Errorf("sypas: call with a zero Span: %w", bulk.ErrInvalid)
	}
	if fn == nil {
		fn = discard
	}
	if cc.sess.State() == control.StateClosed || cc.draining.Load() {
		s.Free()
		return cc.tr.sessionErr(nil)
	}
	sl, err := cc.acquire(ctx)
	if err != nil {
		s.Free()
		return err
	}
	// Send first: it claims the span, and fails for one freed or sent
	// already, whose memory may be another caller's now. The kernel reads
	// nothing before the descriptor is on the ring, so timeout_ns can
	// still be written after.
	if sl.desc, err = cc.own.Send(s.sp, frame.TypeRequest, 0); err != nil {
		cc.put(sl)
		s.Free()
		if errors.Is(err, bulk.ErrClosed) {
			return cc.tr.sessionErr(nil) // the session ended: its region with it
		}
		return fmt.Errorf("sypas: CallSpan: %w", err) // the caller's misuse: ErrInvalid
	}
	b := s.sp.Bytes()
	if b == nil { // closed since
		cc.own.Unsend(s.sp)
		cc.put(sl)
		return cc.tr.sessionErr(nil)
	}
	var timeout uint64
	if dl, ok := ctx.Deadline(); ok {
		timeout = uint64(max(time.Until(dl), 1))
	}
	binary.LittleEndian.PutUint64(b, timeout)
	sl.mode = modeView
	_, sent, err := cc.call(ctx, sl, frame.TypeBulk, &sl.desc, false, fn)
	if !sent {
		cc.own.Unsend(s.sp) // the kernel never saw it
	}
	return err
}

func discard([]byte) error { return nil }

// BulkStats returns the counters of the current session's bulk region,
// the one the Client sends from: spans in use, acknowledgements,
// refusals, waits. ok is false when there is no session or it has no bulk
// region.
func (c *Client) BulkStats() (st bulk.Stats, ok bool) {
	cc := c.cur.Load()
	if cc == nil || cc.own == nil {
		return bulk.Stats{}, false
	}
	return cc.own.Stats(), true
}
