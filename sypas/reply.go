package sypas

import (
	"context"
	"errors"
	"fmt"

	"github.com/sypas/go/bulk"
	"github.com/sypas/go/frame"
)

// AllocReply reserves a reply of n bytes in place, in the kernel's bulk
// region of the session the request came on: the zero-copy way to answer
// with a large body. Fill the slice (read a file straight into it, say)
// and return it, or a prefix of it, from the handler: the reply then goes
// to the daemon by descriptor (docs/PROTOCOL.md §8.7), whatever its
// length, with no copy; the span is the daemon's until it releases it.
//
// The rule is by identity: the span is sent when the handler returns a
// nil error and a non-empty slice that starts where the one AllocReply
// returned starts (b[:k], 1 ≤ k ≤ n). Any other outcome (another slice,
// an empty one, an error, a panic, a one-way request, a session that
// ends) gives the span back to the region, and the reply, if any, goes as
// it would have without AllocReply. The slice is the handler's until it
// returns, and must not be touched after.
//
// AllocReply waits for room until ctx ends (the handler's context, or a
// shorter one; WriteTimeout when ctx has no deadline, as the ACKs that
// make room may be queued behind requests waiting for a busy worker),
// then fails with an error matching ErrResource: an *Error, so a handler
// that returns it answers E_RESOURCE. An Inline handler's
// AllocReply does not wait: it runs on the goroutine that reads the
// daemon's ACKs, the releases it would wait for. It fails with one
// matching ErrTooLarge when the session has no bulk region (the inline
// transport, a daemon that did not grant BULK, a Caller in the kernel's
// own process: allocate the reply the ordinary way then) or n is larger
// than the region, and with one matching os.ErrInvalid for n < 1, a
// one-way request, or a second AllocReply for the same request. It takes
// no lock and allocates nothing while the region has room.
func (r *Request) AllocReply(ctx context.Context, n int) ([]byte, error) {
	c := r.conn
	switch {
	case c == nil || c.own == nil:
		return nil, errorf(CodeTooLarge, "no bulk region for the reply (inline transport, BULK not granted, or an in-process call)")
	case n < 1 || r.Correlation == 0 || r.held:
		return nil, fmt.Errorf("sypas: AllocReply of %d bytes for request %d (one-way: 0), held %v: %w", n, r.Correlation, r.held, bulk.ErrInvalid)
	case n > c.own.Size():
		return nil, &Error{Code: CodeTooLarge, Message: fmt.Sprintf("reply of %d bytes, the kernel's bulk region holds %d", n, c.own.Size())}
	}
	var sp bulk.Span
	var err error
	if r.inline {
		sp, err = c.own.TryAlloc(n)
	} else {
		sp, err = allocWait(ctx, c.own, n, c.srv.cfg.WriteTimeout)
	}
	if errors.Is(err, bulk.ErrFull) {
		// An *Error, so that a handler that returns it answers E_RESOURCE.
		return nil, &Error{Code: CodeResource, Message: fmt.Sprintf("no room in the kernel's bulk region for a reply of %d bytes", n), Err: err}
	}
	if err != nil {
		return nil, fmt.Errorf("sypas: reply of %d bytes: %w", n, err)
	}
	r.reply, r.held = sp, true
	return sp.Bytes(), nil
}

// takeReply returns the span AllocReply reserved for cl, trimmed to body,
// when the handler answers with it (ok); otherwise it frees the span, if
// there is one. Called once the handler has returned.
func (c *serverConn) takeReply(cl *call, body []byte, err error) (sp bulk.Span, ok bool) {
	r := &cl.req
	if !r.held {
		return bulk.Span{}, false
	}
	sp, r.reply, r.held = r.reply, bulk.Span{}, false
	if b := sp.Bytes(); err == nil && r.Correlation != 0 && len(body) > 0 && len(body) <= len(b) && &body[0] == &b[0] {
		return sp.Trim(len(body)), true
	}
	c.own.Free(sp) // fails only once the region is closed: nothing to give back then
	return bulk.Span{}, false
}

// sendReply answers cl with the span sp holding its reply, by descriptor
// (bulkCarrier.sendHeld).
func (c *serverConn) sendReply(cl *call, sp bulk.Span) error {
	h := frame.Header{Type: frame.TypeResponse, Flags: frame.FlagEndStream, Correlation: cl.req.Correlation}
	return c.bc.sendHeld(c.ctx, h, nil, sp, false)
}
