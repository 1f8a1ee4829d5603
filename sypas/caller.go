package sypas

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sypas/go/control"
	"github.com/sypas/go/control/token"
	"github.com/sypas/go/frame"
	"github.com/sypas/go/wire"
)

// Caller is a peer the Server serves without a session: a stock gRPC
// client's unary Call and its Subscribe streams (package sypasgrpc), which
// bring no handshake of their own. Its transport attested the peer (the
// verified client certificate of mutual TLS, checked against the Policy);
// the Caller holds a token minted for that identity exactly as a session's
// is (ServerConfig's Keys, Rights, Scope and TokenTTL, bound to the peer's
// Subject), and every request is checked against it by the same enforcer
// as a session's frames, in the same order (docs/PROTOCOL.md §8.3.5, §10.3):
// the token valid and not revoked (E_AUTH), the body within max_payload
// (E_TOO_LARGE), the operation known (E_NOT_FOUND), the token's rights
// (E_PERMISSION), the Caller's requests in flight within max_in_flight
// (E_RESOURCE). Refusals are counted in ServerStats.Denied and written to
// the audit log with the keys of package control; grants at AuditGrants.
//
// The token is minted when the Caller is made and again when it expires.
// A revoked one refuses the request (E_AUTH), and the next request mints
// a new token: as a session's daemon would reconnect and be attested
// again. To shut an identity out for good, change the Policy.
//
// A Caller is safe for concurrent use; its calls run on the caller's
// goroutine (the gRPC server's, one per call), not on a session's workers.
type Caller struct {
	srv   *Server
	peer  control.PeerIdentity
	attrs []slog.Attr // the peer's audit attributes

	mu    sync.Mutex                       // serializes minting
	capab atomic.Pointer[token.Capability] // nil: mint one at the next request

	maxPayload  int
	maxInFlight int64
	inFlight    atomic.Int64
	corr        atomic.Uint64 // Request.Correlation of each call, from 1
	subs        atomic.Int64  // its feeds open
}

// NewCaller returns a Caller for peer, which the caller's transport has
// attested and checked against the Policy, with a fresh token. It fails
// (E_INTERNAL) only if the token cannot be minted.
func (s *Server) NewCaller(peer control.PeerIdentity) (*Caller, error) {
	c := &Caller{
		srv: s, peer: peer, attrs: control.PeerAttrs(peer),
		maxPayload:  int(cmp.Or(s.cfg.MaxPayload, frame.DefaultMaxPayload)),
		maxInFlight: int64(cmp.Or(s.cfg.MaxInFlight, control.DefaultMaxInFlight)),
	}
	if _, err := c.mint(); err != nil {
		return nil, err
	}
	return c, nil
}

// Peer is the identity the Caller was made for.
func (c *Caller) Peer() control.PeerIdentity { return c.peer }

// callerRights is what a token grants when ServerConfig.Rights is zero:
// control's default for sessions less the bulk right, which a Caller has
// no use for (its requests and replies are gRPC messages, never spans).
const callerRights = token.RightRequest | token.RightSubscribe | token.RightPublish

// mint mints and verifies a token for the peer, as control does for a
// session (with the server's revocations and clock, so that the cached
// Capability sees later revocations).
func (c *Caller) mint() (*token.Capability, error) {
	cfg := &c.srv.cfg
	now := c.now()
	b, err := cfg.Keys.Mint(token.Claims{
		Subject: c.peer.Subject(), Rights: cmp.Or(cfg.Rights, callerRights), Scope: cfg.Scope,
		Expiry: now.Add(cmp.Or(cfg.TokenTTL, control.DefaultTokenTTL)),
	})
	if err != nil {
		return nil, &Error{Code: CodeInternal, Message: "mint token", Err: err}
	}
	v := token.Verifier{Keys: cfg.Keys, Revoked: cfg.Revoked, Clock: cfg.Clock}
	cp, err := v.Verify(b, c.peer.Subject())
	if err != nil {
		return nil, &Error{Code: CodeInternal, Message: "verify own token", Err: err}
	}
	c.capab.Store(cp)
	return cp, nil
}

// capability returns the Caller's valid token, minting a new one when it
// expired (or a revocation dropped it); nil and the refusal's reason when
// it is revoked.
func (c *Caller) capability() (*token.Capability, string) {
	cp := c.capab.Load()
	if cp != nil {
		err := cp.Valid(c.now())
		if err == nil {
			return cp, ""
		}
		if errors.Is(err, token.ErrRevoked) {
			c.capab.CompareAndSwap(cp, nil) // the next request is attested anew
			return nil, "the token was revoked"
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if cp2 := c.capab.Load(); cp2 != nil && cp2 != cp && cp2.Valid(c.now()) == nil {
		return cp2, "" // another request minted it
	}
	cp, err := c.mint()
	if err != nil {
		return nil, err.Error()
	}
	return cp, ""
}

func (c *Caller) now() time.Time {
	if c.srv.cfg.Clock != nil {
		return c.srv.cfg.Clock()
	}
	return time.Now()
}

// auditAttrs are the audit attributes of a request from the peer that
// attrs describe, checked against cp.
func (c *Caller) auditAttrs(attrs []slog.Attr, cp *token.Capability) []slog.Attr {
	a := append([]slog.Attr(nil), attrs...)
	if cp != nil {
		a = append(a, slog.String(control.LogKeyTokenID, "0x"+strconv.FormatUint(cp.ID, 16)))
	}
	return a
}

// deny refuses a request: counted, audited, and returned as the *Error the
// caller is told.
func (c *Caller) deny(ctx context.Context, attrs []slog.Attr, cp *token.Capability, corr uint64, op string, code Code, event, reason string) error {
	c.srv.refused(ctx, c.auditAttrs(attrs, cp), corr, op, code, event, reason)
	return &Error{Code: code, Message: reason}
}

// begin is the first checks of every request: the Server serving
// (E_UNAVAILABLE, not a refusal) and the token (E_AUTH). It numbers the
// request (corr) and returns the token it is checked against.
func (c *Caller) begin(ctx context.Context, attrs []slog.Attr, op string) (*token.Capability, uint64, error) {
	if c.srv.stopped() {
		return nil, 0, &Error{Code: CodeUnavailable, Message: "the kernel is shutting down"}
	}
	corr := c.corr.Add(1)
	cp, why := c.capability()
	if cp == nil {
		return nil, corr, c.deny(ctx, attrs, nil, corr, op, CodeAuth, control.EventAuth, why)
	}
	return cp, corr, nil
}

// Call runs op with body for the Caller, through the enforcer (see the
// type's comment), and returns the handler's reply or the *Error the
// caller is told. The handler's context ends with ctx, at its deadline, or
// when the Server closes; Request.Body is body itself (the caller's), and
// Request.Correlation counts the Caller's calls.
func (c *Caller) Call(ctx context.Context, op string, body []byte) ([]byte, error) {
	return c.call(ctx, c.peer, c.attrs, op, body)
}

// CallFrom is Call for a request that peer made: the Caller's identity
// (the same Subject: its certificate) on a connection of its own, which
// Request.Peer and the audit records name (peer_addr) instead of the one
// the Caller was made for. A peer of another Subject is refused with
// E_PERMISSION: a Caller, its token and its limits are one identity's.
func (c *Caller) CallFrom(ctx context.Context, peer control.PeerIdentity, op string, body []byte) ([]byte, error) {
	attrs, err := c.from(peer)
	if err != nil {
		return nil, err
	}
	return c.call(ctx, peer, attrs, op, body)
}

// from is the audit attributes of peer, one of the Caller's identity.
func (c *Caller) from(peer control.PeerIdentity) ([]slog.Attr, error) {
	if peer.Subject() != c.peer.Subject() {
		return nil, &Error{Code: CodePermission, Message: "the peer is not the Caller's identity"}
	}
	if peer.Remote == c.peer.Remote {
		return c.attrs, nil
	}
	return control.PeerAttrs(peer), nil
}

func (c *Caller) call(ctx context.Context, peer control.PeerIdentity, attrs []slog.Attr, op string, body []byte) ([]byte, error) {
	s := c.srv
	cp, corr, err := c.begin(ctx, attrs, op)
	if err != nil {
		return nil, err
	}
	if len(body) > c.maxPayload {
		return nil, c.deny(ctx, attrs, cp, corr, "", CodeTooLarge, control.EventProtocol, "request payload above the session's max_payload")
	}
	if len(op) > wire.MaxNameLen {
		// No route has such a name; the peer's bytes (up to gRPC's
		// metadata limit, 16 MiB) are not copied into the audit log.
		return nil, c.deny(ctx, attrs, cp, corr, "", CodeNotFound, control.EventProtocol, fmt.Sprintf("an operation name of %d bytes (at most %d)", len(op), wire.MaxNameLen))
	}
	rt := (*s.routes.Load())[op]
	if rt == nil {
		return nil, c.deny(ctx, attrs, cp, corr, op, CodeNotFound, control.EventProtocol, "no such operation")
	}
	if need := rt.rights; need != 0 && cp.Rights&need != need {
		return nil, c.deny(ctx, attrs, cp, corr, rt.op, CodePermission, control.EventPermission, "the token lacks the operation's rights")
	}
	if c.inFlight.Add(1) > c.maxInFlight {
		c.inFlight.Add(-1)
		return nil, c.deny(ctx, attrs, cp, corr, rt.op, CodeResource, control.EventLimit, "more requests in flight than max_in_flight")
	}
	defer c.inFlight.Add(-1)
	if !s.enter(nil) {
		return nil, &Error{Code: CodeUnavailable, Message: "the kernel is shutting down"}
	}
	defer s.active.Done()
	if l := s.cfg.AuditGrants.Level(); s.log.Enabled(ctx, l) {
		s.granted(ctx, l, c.auditAttrs(attrs, cp), rt.op, corr)
	}
	s.stats.direct.Add(1)
	defer s.stats.direct.Add(-1)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(s.base, cancel) // Close ends the handler's context
	defer stop()
	req := Request{Op: rt.op, Body: body, Peer: peer, Subject: cp.Subject, TokenID: cp.ID, Correlation: corr}
	reply, err := s.run(ctx, rt, &req)
	if err != nil {
		s.stats.failed.Add(1)
		return nil, s.answerErr(ctx, rt.op, err)
	}
	if len(reply) > c.maxPayload {
		s.stats.failed.Add(1)
		return nil, &Error{Code: CodeTooLarge, Message: "the handler's reply is above the session's max_payload"}
	}
	s.stats.ok.Add(1)
	return reply, nil
}

// Feed is a Caller's subscription to a topic: the events published on it
// arrive on C, at most Pending of them waiting (then the topic's
// SlowPolicy drops, counted in Dropped and ServerStats.Dropped). Done is
// closed when the feed ends: Close, or the Server shutting down or
// closing; C is never closed.
type Feed struct {
	C <-chan Event

	c       chan Event
	sub     *subscriber
	caller  *Caller
	done    chan struct{}
	once    sync.Once
	dropped atomic.Uint64
}

// Subscribe subscribes the Caller to topic (an exact name), with the
// checks a session's SUBSCRIBE gets: a valid token (E_AUTH), the subscribe
// right (E_PERMISSION), a topic of 1..1024 bytes (E_PROTO), at most
// MaxSubscriptions feeds for the Caller (E_RESOURCE). pending bounds the
// events waiting on the Feed (zero: DefaultPending). Close the Feed when
// done with it.
func (c *Caller) Subscribe(ctx context.Context, topic string, pending int) (*Feed, error) {
	return c.subscribe(ctx, c.attrs, topic, pending)
}

// SubscribeFrom is Subscribe for peer, as CallFrom is Call.
func (c *Caller) SubscribeFrom(ctx context.Context, peer control.PeerIdentity, topic string, pending int) (*Feed, error) {
	attrs, err := c.from(peer)
	if err != nil {
		return nil, err
	}
	return c.subscribe(ctx, attrs, topic, pending)
}

func (c *Caller) subscribe(ctx context.Context, attrs []slog.Attr, topic string, pending int) (*Feed, error) {
	s := c.srv
	cp, corr, err := c.begin(ctx, attrs, "")
	if err != nil {
		return nil, err
	}
	if cp.Rights&RightSubscribe == 0 {
		return nil, c.deny(ctx, attrs, cp, corr, "", CodePermission, control.EventPermission, "the token lacks the subscribe right")
	}
	if topic == "" || len(topic) > wire.MaxNameLen {
		return nil, c.deny(ctx, attrs, cp, corr, "", CodeProto, control.EventProtocol, fmt.Sprintf("a topic is 1..%d bytes", wire.MaxNameLen))
	}
	if c.subs.Add(1) > int64(s.cfg.MaxSubscriptions) {
		c.subs.Add(-1)
		return nil, c.deny(ctx, attrs, cp, corr, "", CodeResource, control.EventLimit, "more subscriptions than the kernel's MaxSubscriptions")
	}
	ch := make(chan Event, cmp.Or(pending, DefaultPending))
	f := &Feed{C: ch, c: ch, caller: c, done: make(chan struct{})}
	f.sub = &subscriber{feed: f, topic: topic}
	s.topics.add(f.sub)
	go func() {
		select {
		case <-f.done:
		case <-s.quit:
			f.Close()
		}
	}()
	return f, nil
}

// Done is closed when the feed has ended.
func (f *Feed) Done() <-chan struct{} { return f.done }

// Dropped is how many events the feed lost to a full C.
func (f *Feed) Dropped() uint64 { return f.dropped.Load() }

// Close ends the feed. Idempotent.
func (f *Feed) Close() {
	f.once.Do(func() {
		f.caller.srv.topics.removeSub(f.sub)
		f.caller.subs.Add(-1)
		close(f.done)
	})
}

// deliver queues an event for the feed: at once or not at all (noWait),
// or waiting for room until ctx ends. It reports whether it was queued.
func (f *Feed) deliver(ctx context.Context, ev Event, noWait bool) bool {
	select {
	case f.c <- ev:
		return true
	default:
	}
	if !noWait {
		select {
		case f.c <- ev:
			return true
		case <-ctx.Done():
		case <-f.done:
		}
	}
	f.dropped.Add(1)
	return false
}
