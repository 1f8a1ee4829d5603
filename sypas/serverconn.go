package sypas

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sypas/go/bulk"
	"github.com/sypas/go/control"
	"github.com/sypas/go/frame"
	"github.com/sypas/go/wire"
)

// serverConn serves one daemon's session: a reader goroutine that checks
// and dispatches every frame of the daemon's ring, and up to Workers
// goroutines for handlers that are not Inline. Replies go back through the
// transport, whose lock keeps the kernel's ring single-producer.
type serverConn struct {
	srv  *Server
	sess *control.Session
	tr   transport
	ctx  context.Context // ends with the session or the server
	end  context.CancelFunc

	maxPayload  int // the session's max_payload
	maxInFlight uint64
	// The requests in flight (read, answer not yet sent), counted against
	// max_in_flight, are admitted - done: the reader counts what it admits
	// privately, the answers (from any goroutine) count done, so the
	// enforcer's check is a load and a compare.
	admitted   uint64 // reader only
	done       atomic.Uint64
	unanswered atomic.Int32  // requests read, answer not yet written (one-way: not yet served)
	idle       chan struct{} // signalled when unanswered drops to 0 while draining
	draining   atomic.Bool

	jobs      chan *call
	workers   int  // started; reader only
	handedOff bool // a request went to a worker since the reader last yielded; reader only
	wg        sync.WaitGroup

	subs map[uint64]string // subscription id → topic; reader only (then serveSession's defer)

	// viewMu is read-held by the reader from recv to release, over the
	// decoding and any Inline handler's view of the body; closeSession
	// takes it before Close swaps the rings' memory for private pages.
	viewMu sync.RWMutex

	// The reader's reusable payloads for its own replies.
	resp wire.Response
	emsg wire.ErrorMsg
	req  wire.Request
	// inline is the call of the Inline handler the reader runs: one at a
	// time, so one will do.
	inline call
	ctxs   []reqContext // fresh ones for newReqContext

	// Bulk (bulk.go): nil without BULK. desc is the reader's copy of the
	// BULK descriptor it is serving.
	bc   bulkCarrier
	own  *bulk.Region
	peer *bulk.PeerRegion
	desc wire.Bulk
}

// call is one request on its way through a handler. The Request and the
// call are reused once the handler has returned and the answer is
// written; the context is not (a handler may keep it).
type call struct {
	req    Request
	ctx    context.Context // the session's, or dl
	dl     *reqContext     // the request's deadline, if it has one
	body   []byte          // a pool handler's copy of the body
	rt     *route
	resp   wire.Response
	emsg   wire.ErrorMsg
	pooled bool // from calls, back to it once answered
	// span is the daemon's bulk span the body is a view of, released (ACK)
	// once the handler has returned; spanned says there is one.
	span    wire.Bulk
	spanned bool
}

// calls recycles the calls of pool handlers, with their body buffers.
var calls = sync.Pool{New: func() any { return &call{pooled: true} }}

// recycle makes cl reusable, dropping what it references.
func recycle(cl *call) {
	body := cl.body[:0]
	if cap(body) > maxPooledBody {
		body = nil
	}
	pooled := cl.pooled
	*cl = call{body: body, pooled: pooled}
	if pooled {
		calls.Put(cl)
	}
}

// maxPooledBody bounds the body buffer a recycled call keeps.
const maxPooledBody = 64 << 10

func newServerConn(s *Server, sess *control.Session) *serverConn {
	ctx, cancel := context.WithCancel(s.base) // ends with the server, too
	c := &serverConn{
		srv: s, sess: sess, ctx: ctx, end: cancel,
		tr:          s.newTransport(sess),
		maxPayload:  int(sess.Params().MaxPayload),
		maxInFlight: uint64(sess.Params().MaxInFlight),
		idle:        make(chan struct{}, 1),
		jobs:        make(chan *call, s.cfg.Workers),
		subs:        make(map[uint64]string),
	}
	if c.bc = carrier(c.tr); c.bc != nil {
		c.own, c.peer = c.bc.bulkRegions()
	}
	return c
}

// run reads and serves the daemon's frames until the session ends, then
// waits for the handlers it started.
func (c *serverConn) run() {
	go func() {
		select {
		case <-c.sess.Done():
		case <-c.ctx.Done():
		}
		c.end()
	}()
	go c.watchGoAway()
	defer func() {
		c.end()
		close(c.jobs)
		c.wg.Wait()
	}()
	held := 0 // frames served since the answers were last published
	for {
		var wait time.Time // none
		if c.handedOff || held > 0 {
			wait = probe // take what is there, but do not wait yet
		}
		c.viewMu.RLock()
		f, err := c.tr.recv(wait)
		if err != nil {
			c.viewMu.RUnlock()
			if (c.handedOff || held > 0) && errors.Is(err, os.ErrDeadlineExceeded) {
				if held > 0 {
					c.tr.flush() // before we wait: the daemon waits for them
					held = 0
				}
				if c.handedOff {
					// The workers we handed requests to are queued on
					// our P and would wait behind our spinning: let them
					// run first.
					c.handedOff = false
					runtime.Gosched()
				}
				continue
			}
			var e *Error
			if errors.As(err, &e) && e.Code == CodeProto && c.sess.Err() == nil {
				c.sess.Abort(err) // the daemon learns why: never a bare EOF
			}
			return
		}
		if held == 0 {
			c.tr.hold()
		}
		c.serve(&f)
		c.tr.release()
		c.viewMu.RUnlock()
		// A burst of requests is answered with one publication (one index
		// store, at most one wake-up of the daemon), bounded so that a
		// daemon streaming requests still sees its answers.
		if held++; held == maxHeld || !c.tr.buffered() {
			c.tr.flush()
			held = 0
		}
	}
}

// maxHeld bounds the answers the reader holds back while it serves a burst.
const maxHeld = 32

// closeSession closes the session once the reader holds no view of its
// rings: it cancels the handlers (an Inline one returns, a reader waiting
// for a worker stops waiting), stops the reader, then closes.
func (c *serverConn) closeSession() {
	c.end()
	c.tr.stop()
	c.viewMu.Lock()
	defer c.viewMu.Unlock()
	c.sess.Close()
}

// serve checks one frame against the session's token and limits (the
// enforcer) and dispatches it. A refusal is answered with the request's
// correlation; a frame that breaks the protocol ends the session.
func (c *serverConn) serve(f *frame.Frame) {
	switch f.Type {
	case frame.TypeRequest:
	case frame.TypeSubscribe, frame.TypeUnsubscribe:
		c.serveSubscription(f)
		return
	case frame.TypeBulk:
		c.serveBulk(f)
		return
	default:
		c.sess.Abort(errorf(CodeProto, fmt.Sprintf("%v frame on the daemon's ring (docs/PROTOCOL.md §8.1)", f.Type)))
		return
	}
	if int(f.PayloadLen) > c.maxPayload && c.sess.Admits(f.CapRef) {
		c.deny(f.Correlation, "", CodeTooLarge, control.EventProtocol, "request payload above the session's max_payload")
		return
	}
	c.serveRequest(f, f.Payload, nil)
}

// serveRequest checks and dispatches a REQUEST whose payload is p: the
// frame's, or (span non-nil) the daemon's bulk span it names, which is
// released exactly once, whatever the outcome.
func (c *serverConn) serveRequest(f *frame.Frame, p []byte, span *wire.Bulk) {
	corr := f.Correlation
	refuse := func(op string, code Code, event, reason string, retry time.Duration) {
		if span != nil {
			c.releaseSpan(span)
		}
		c.denyRetry(corr, op, code, event, reason, retry)
	}
	if !c.sess.Admits(f.CapRef) {
		refuse("", CodeAuth, control.EventAuth, "cap_ref names no valid token of this session", 0)
		return
	}
	if span != nil && !c.bulkAllowed() {
		refuse("", CodePermission, control.EventPermission, "the token lacks the bulk right", 0)
		return
	}
	m := &c.req
	if err := m.Decode(p); err != nil {
		if span != nil {
			c.releaseSpan(span)
		}
		c.sess.Abort(&Error{Code: CodeProto, Message: "REQUEST payload", Err: err})
		return
	}
	rt := (*c.srv.routes.Load())[string(m.Method)]
	if rt == nil {
		refuse(string(m.Method), CodeNotFound, control.EventProtocol, "no such operation", 0)
		return
	}
	if need := rt.rights; need != 0 {
		if cp := c.sess.Capability(); cp == nil || cp.Rights&need != need {
			refuse(rt.op, CodePermission, control.EventPermission, "the token lacks the operation's rights", 0)
			return
		}
	}
	if corr != 0 {
		if c.admitted-c.done.Load() >= c.maxInFlight {
			refuse(rt.op, CodeResource, control.EventLimit, "more requests in flight than max_in_flight", time.Millisecond)
			return
		}
		c.admitted++
	}
	if l := c.srv.cfg.AuditGrants.Level(); c.srv.log.Enabled(c.ctx, l) {
		c.grant(l, rt.op, corr)
	}
	c.unanswered.Add(1)
	cl := &c.inline
	if !rt.inline {
		cl = calls.Get().(*call)
	}
	cl.rt = rt
	cl.req = Request{Op: rt.op, Peer: c.sess.Peer(), TokenID: f.CapRef, Correlation: corr, conn: c, inline: rt.inline}
	if cp := c.sess.Capability(); cp != nil {
		cl.req.Subject = cp.Subject
	}
	cl.ctx = c.ctx
	if m.Timeout > 0 {
		cl.dl = c.newReqContext()
		cl.dl.parent, cl.dl.deadline = c.ctx, time.Now().Add(m.Timeout)
		cl.ctx = cl.dl
	}
	switch {
	case span != nil:
		// The span is not the ring: a handler that holds it pins only
		// the daemon's bulk memory, released when it returns.
		cl.span, cl.spanned = *span, true
		cl.req.Body = m.Body
	case rt.inline:
		cl.req.Body = m.Body
	default:
		cl.body = append(cl.body[:0], m.Body...)
		cl.req.Body = cl.body
	}
	if rt.inline {
		c.handle(cl)
	} else {
		c.dispatch(cl)
	}
}

// newReqContext returns a fresh reqContext, never one used before: a
// handler may keep its context, wrongly, and must then not see another
// call's deadline. They are made reqContextChunk at a time, so that a
// call with a deadline costs a fraction of an allocation. Reader only.
func (c *serverConn) newReqContext() *reqContext {
	if len(c.ctxs) == 0 {
		c.ctxs = make([]reqContext, reqContextChunk)
	}
	rc := &c.ctxs[0]
	c.ctxs = c.ctxs[1:]
	return rc
}

// reqContextChunk is how many reqContexts newReqContext makes at once.
const reqContextChunk = 64

// dispatch hands cl to a worker, starting one if fewer than Workers run;
// with all busy it waits, which is the session's backpressure.
func (c *serverConn) dispatch(cl *call) {
	c.handedOff = true
	if c.workers < cap(c.jobs) {
		c.workers++
		c.wg.Add(1)
		go c.work()
	}
	select {
	case c.jobs <- cl:
		return
	default:
	}
	c.tr.flush() // the answers held back must not wait for a busy worker
	select {
	case c.jobs <- cl:
	case <-c.ctx.Done():
		if cl.spanned {
			c.releaseSpan(&cl.span)
		}
		c.finish(cl)
		c.answered()
		recycle(cl)
	}
}

func (c *serverConn) work() {
	defer c.wg.Done()
	for cl := range c.jobs {
		c.handle(cl)
	}
}

// handle runs the handler and answers (unless the request was one-way).
func (c *serverConn) handle(cl *call) {
	defer recycle(cl) // after answered: a drain sees the last answer only once it is written
	defer c.answered()
	body, err := c.invoke(cl)
	if cl.dl != nil {
		cl.dl.end()
	}
	reply, inSpan := c.takeReply(cl, body, err)
	if cl.spanned {
		// Before the answer, so that a daemon that has read it has its
		// span back; a reply that is part of the body (an echo) is copied
		// first, since the daemon may reuse the span as soon as it reads
		// the ACK.
		if overlaps(body, cl.req.Body) {
			cl.body = append(cl.body[:0], body...)
			body = cl.body
		}
		c.releaseSpan(&cl.span)
	}
	s := &c.srv.stats
	if cl.req.Correlation == 0 {
		if err != nil {
			s.failed.Add(1)
		} else {
			s.ok.Add(1)
		}
		return
	}
	// Out of flight before the answer can reach the daemon, which may send
	// its next request the moment it reads this one's (docs/PROTOCOL.md
	// §8.1): counted after, that request would find max_in_flight taken.
	c.finish(cl)
	if err == nil {
		if inSpan {
			err = c.sendReply(cl, reply)
		} else {
			cl.resp.Body = body
			err = c.tr.send(c.ctx, frame.Header{Type: frame.TypeResponse, Flags: frame.FlagEndStream, Correlation: cl.req.Correlation}, nil, &cl.resp, false)
		}
		if err == nil {
			s.ok.Add(1)
		} else if errors.Is(err, ErrTooLarge) {
			err = c.reply(cl, &Error{Code: CodeTooLarge, Message: "the handler's reply is above the session's max_payload and bulk region"})
		} else if errors.Is(err, bulk.ErrFull) {
			err = c.reply(cl, &Error{Code: CodeResource, Message: "no room in the kernel's bulk region for the reply before the write timeout"})
		}
	} else {
		s.failed.Add(1)
		err = c.reply(cl, err)
	}
	if err != nil {
		c.sendFailed(err)
	}
}

// invoke calls the handler, turning a panic into E_INTERNAL.
func (c *serverConn) invoke(cl *call) ([]byte, error) { return c.srv.run(cl.ctx, cl.rt, &cl.req) }

// run calls rt's handler, turning a panic into E_INTERNAL.
func (s *Server) run(ctx context.Context, rt *route, req *Request) (body []byte, err error) {
	defer func() {
		if p := recover(); p != nil {
			s.stats.panics.Add(1)
			s.log.LogAttrs(ctx, slog.LevelError, "sypas: handler panicked",
				slog.String("op", req.Op), slog.Any("panic", p), slog.String("stack", string(debug.Stack())))
			body, err = nil, errorf(CodeInternal, "the handler failed")
		}
	}()
	return rt.h(ctx, req)
}

// reply answers cl with ERROR for err (answerErr).
func (c *serverConn) reply(cl *call, err error) error {
	e := c.srv.answerErr(c.ctx, cl.req.Op, err)
	cl.emsg = wire.NewErrorMsg(e)
	if len(cl.emsg.Message) == 0 {
		cl.emsg.Message = []byte(e.Code.String())
	}
	return c.tr.send(c.ctx, frame.Header{Type: frame.TypeError, Correlation: cl.req.Correlation}, nil, &cl.emsg, false)
}

// answerErr is what a caller is told of a handler's error for op: an
// *Error's code and message; for a handler that gave up because its
// context ended, E_TIMEOUT (the caller's deadline) or E_UNAVAILABLE (the
// session or the server is closing); E_INTERNAL with no detail for any
// other error (its text is logged).
func (s *Server) answerErr(ctx context.Context, op string, err error) *Error {
	var e *Error
	switch {
	case errors.As(err, &e):
		return e
	case errors.Is(err, context.DeadlineExceeded):
		return &Error{Code: CodeTimeout, Message: "the call's deadline passed"}
	case errors.Is(err, context.Canceled):
		return &Error{Code: CodeUnavailable, Message: "the kernel is closing the session"}
	}
	s.log.LogAttrs(ctx, slog.LevelWarn, "sypas: handler error",
		slog.String("op", op), slog.String(control.LogKeyReason, err.Error()))
	return &Error{Code: CodeInternal, Message: "internal error"}
}

// finish ends cl's turn in flight (max_in_flight).
func (c *serverConn) finish(cl *call) {
	if cl.req.Correlation != 0 {
		c.done.Add(1)
	}
}

// answered counts a request answered (its answer written, or the handler of
// a one-way one returned), and wakes a drain waiting for the last.
func (c *serverConn) answered() {
	if c.unanswered.Add(-1) == 0 && c.draining.Load() {
		select {
		case c.idle <- struct{}{}:
		default:
		}
	}
}

// sendFailed ends the session when a reply cannot be written: the daemon
// does not read its ring (ErrResource after WriteTimeout), or the session
// is already gone.
func (c *serverConn) sendFailed(err error) {
	if c.sess.Err() == nil && errors.Is(err, ErrResource) {
		c.sess.Abort(&Error{Code: CodeResource, Message: "the daemon did not read its ring for WriteTimeout", Err: err})
	}
}

// deny refuses a request for op (empty if unknown yet) with code, answering
// it (unless one-way), counting and auditing the refusal.
func (c *serverConn) deny(corr uint64, op string, code Code, event, reason string) {
	c.denyRetry(corr, op, code, event, reason, 0)
}

func (c *serverConn) denyRetry(corr uint64, op string, code Code, event, reason string, retry time.Duration) {
	c.srv.refused(c.ctx, c.sess.AuditAttrs(), corr, op, code, event, reason)
	if corr == 0 {
		return
	}
	c.emsg = wire.ErrorMsg{Code: code, Message: []byte(reason), RetryAfterMs: uint32(retry / time.Millisecond)}
	if err := c.tr.send(c.ctx, frame.Header{Type: frame.TypeError, Correlation: corr}, nil, &c.emsg, false); err != nil {
		c.sendFailed(err)
	}
}

// refused counts and audits a refusal of the request corr for op (empty if
// unknown yet) of the peer and token that attrs describe.
func (s *Server) refused(ctx context.Context, attrs []slog.Attr, corr uint64, op string, code Code, event, reason string) {
	s.stats.denied.Add(1)
	attrs = append(attrs, slog.String(control.LogKeyCode, code.String()), slog.Uint64(control.LogKeyCorrelation, corr))
	if op != "" {
		attrs = append(attrs, slog.String(control.LogKeyOp, op))
	}
	attrs = append(attrs, slog.String(control.LogKeyDecision, control.DecisionDeny))
	control.Audit(ctx, s.cfg.Logger, slog.LevelWarn, "sypas: refused", event, reason, attrs...)
}

// grant writes the record of a request the enforcer admitted, at level.
func (c *serverConn) grant(level slog.Level, op string, corr uint64) {
	c.srv.granted(c.ctx, level, c.sess.AuditAttrs(), op, corr)
}

func (s *Server) granted(ctx context.Context, level slog.Level, attrs []slog.Attr, op string, corr uint64) {
	attrs = append(attrs, slog.Uint64(control.LogKeyCorrelation, corr),
		slog.String(control.LogKeyOp, op), slog.String(control.LogKeyDecision, control.DecisionGrant))
	control.Audit(ctx, s.log, level, "sypas: granted", control.EventGrant, "the token grants the operation's rights", attrs...)
}

// watchGoAway answers the daemon's GOAWAY: the daemon starts nothing new,
// so once the requests it sent are answered the session ends in order.
func (c *serverConn) watchGoAway() {
	select {
	case <-c.sess.GoAway():
		c.drain(c.ctx)
	case <-c.ctx.Done():
	}
}

// drain answers the daemon's GOAWAY (docs/PROTOCOL.md §6.8): it lets the
// reader take and serve every request the daemon sent before it, and
// those finish (within ctx), then ends the session in order: our GOAWAY,
// written after every answer, then close. (The kernel's own
// Shutdown sends GOAWAY first instead: Session.Shutdown.)
func (c *serverConn) drain(ctx context.Context) {
	c.draining.Store(true)
	// Every frame the daemon sent before its GOAWAY is in the ring by now
	// (it published them before it wrote GOAWAY): the reader takes them
	// all, and once it has released the last (drained, looked at first:
	// a request is counted unanswered before it is released) and
	// answered it, nothing is left.
	limit := time.NewTimer(cmp.Or(c.srv.cfg.DrainTimeout, control.DefaultDrainTimeout))
	defer limit.Stop()
	for !c.tr.drained() || c.unanswered.Load() > 0 {
		select {
		case <-c.idle:
		case <-limit.C: // §6.8: GOAWAY and close after the drain timeout
			c.tr.flush()
			c.sess.Drain(ctx)
			c.closeSession()
			return
		case <-ctx.Done():
			c.closeSession()
			return
		case <-c.sess.Done():
			return
		case <-time.After(10 * time.Millisecond): // a missed signal costs this much
		}
	}
	c.tr.flush() // the last answers may be held back by the reader (hold)
	c.sess.Drain(ctx)
	c.closeSession()
}
