package sypas

import (
	"cmp"
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sypas/go/frame"
	"github.com/sypas/go/wire"
)

// Event is one event a subscription received.
type Event struct {
	Topic string
	Body  []byte    // the event's body, the receiver's own copy
	Time  time.Time // the publisher's clock at Publish; zero if unknown
}

// SubscribeOptions configures a subscription. The zero value is the
// defaults.
type SubscribeOptions struct {
	// Pending bounds the events received and not yet taken from Events.
	// An event that finds it full is dropped and counted (Dropped), never
	// queued without bound. Zero means DefaultPending.
	Pending int
}

// DefaultPending is SubscribeOptions.Pending's default.
const DefaultPending = 256

// Subscription delivers the events published on one topic. It survives
// reconnections: the Client subscribes again on each new session (events
// published while no session existed are lost, and not counted).
type Subscription struct {
	c      *Client
	id     uint64
	topic  string
	events chan Event

	dropped atomic.Uint64
	mu      sync.Mutex // orders deliveries with close
	closed  bool

	// subMu orders this subscription's SUBSCRIBE and UNSUBSCRIBE: from
	// Subscribe, from the restore on a new session, and from Unsubscribe.
	// A one-slot channel, so that a waiter honours its context (a restore
	// holds it for as long as a kernel takes to answer).
	subMu chan struct{}
	on    *clientConn           // the session it is subscribed on; under subMu
	gone  atomic.Bool           // unsubscribed, or ended
	err   atomic.Pointer[error] // why it ended, if the kernel ended it
}

// lockSub takes subMu, within ctx.
func (s *Subscription) lockSub(ctx context.Context) error {
	select {
	case s.subMu <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (s *Subscription) unlockSub() { <-s.subMu }

// Events delivers the events, in the order they were published. It is
// closed by Unsubscribe and by the Client's Close.
func (s *Subscription) Events() <-chan Event { return s.events }

// Topic is the topic subscribed to.
func (s *Subscription) Topic() string { return s.topic }

// Dropped counts the events this subscription lost: those the kernel
// could not write to a full ring (it reports them with the next event it
// delivers) and those that found Pending events not yet taken.
func (s *Subscription) Dropped() uint64 { return s.dropped.Load() }

// Err reports why the subscription ended when it did not end by
// Unsubscribe or the Client's Close: a new session's kernel refused to
// subscribe it again after a reconnection (or did not answer), and Events
// was closed. It is nil otherwise.
func (s *Subscription) Err() error {
	if p := s.err.Load(); p != nil {
		return *p
	}
	return nil
}

// Unsubscribe ends the subscription at once (Events is closed) and tells
// the kernel, if a session is up, within ctx. If ctx ends first, which a
// re-subscription on a new session in progress can make it do, the kernel
// is not told and Unsubscribe returns ctx's error: the session's end
// drops the kernel's side, and events that still come are dropped here.
func (s *Subscription) Unsubscribe(ctx context.Context) error {
	if s.gone.Swap(true) {
		return nil
	}
	s.c.subs.remove(s)
	if err := s.lockSub(ctx); err != nil {
		return err
	}
	defer s.unlockSub()
	if cc := s.on; cc != nil && cc.sess.Err() == nil {
		return cc.subscribe(ctx, frame.TypeUnsubscribe, &wire.Unsubscribe{SubscriptionID: s.id})
	}
	return nil // no session: nothing to tell
}

// subscribeOn subscribes s on cc's session, unless it is already, or was
// unsubscribed.
func (s *Subscription) subscribeOn(ctx context.Context, cc *clientConn) error {
	if err := s.lockSub(ctx); err != nil {
		return err
	}
	defer s.unlockSub()
	if s.gone.Load() || s.on == cc {
		return nil
	}
	err := cc.subscribe(ctx, frame.TypeSubscribe, &wire.Subscribe{SubscriptionID: s.id, Topic: stringBytes(s.topic)})
	if err == nil {
		s.on = cc
	}
	return err
}

func (s *Subscription) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.closed {
		s.closed = true
		close(s.events)
	}
}

// subRegistry is a Client's subscriptions, by id.
type subRegistry struct {
	c    *Client
	mu   sync.RWMutex
	m    map[uint64]*Subscription
	next atomic.Uint64
}

func (r *subRegistry) init(c *Client) { r.c, r.m = c, make(map[uint64]*Subscription) }

func (r *subRegistry) remove(s *Subscription) bool {
	r.mu.Lock()
	_, ok := r.m[s.id]
	delete(r.m, s.id)
	r.mu.Unlock()
	if ok {
		s.close()
	}
	return ok
}

func (r *subRegistry) closeAll() {
	r.mu.Lock()
	subs := r.m
	r.m = make(map[uint64]*Subscription)
	r.mu.Unlock()
	for _, s := range subs {
		s.close()
	}
}

// Subscribe subscribes to topic (an exact name): events published on it
// from now on arrive on the Subscription's Events. It needs a session
// (it waits for one within ctx).
func (c *Client) Subscribe(ctx context.Context, topic string, opts SubscribeOptions) (*Subscription, error) {
	if topic == "" || len(topic) > wire.MaxNameLen {
		return nil, fmt.Errorf("sypas: topic of %d bytes: %w (1..%d)", len(topic), ErrInvalidOp, wire.MaxNameLen)
	}
	if opts.Pending < 0 {
		return nil, fmt.Errorf("sypas: SubscribeOptions.Pending %d is negative", opts.Pending)
	}
	s := &Subscription{c: c, id: c.subs.next.Add(1), topic: topic, subMu: make(chan struct{}, 1),
		events: make(chan Event, cmp.Or(opts.Pending, DefaultPending))}
	cc, err := c.conn(ctx, true)
	if err != nil {
		return nil, err
	}
	c.subs.mu.Lock()
	c.subs.m[s.id] = s
	c.subs.mu.Unlock()
	if err := s.subscribeOn(ctx, cc); err != nil {
		c.subs.remove(s)
		return nil, err
	}
	cc.startSubReader()
	return s, nil
}

// subscribe sends a SUBSCRIBE or UNSUBSCRIBE and waits for its answer.
func (cc *clientConn) subscribe(ctx context.Context, t frame.Type, m wire.Message) error {
	s, err := cc.acquire(ctx)
	if err != nil {
		return err
	}
	s.mode = modeOwn
	_, _, err = cc.call(ctx, s, t, m, false, nil)
	return err
}

// restore subscribes every subscription again on a new session.
func (r *subRegistry) restore(cc *clientConn) {
	r.mu.RLock()
	subs := make([]*Subscription, 0, len(r.m))
	for _, s := range r.m {
		subs = append(subs, s)
	}
	r.mu.RUnlock()
	if len(subs) == 0 {
		return
	}
	cc.startSubReader()
	for _, s := range subs {
		// One refused (a kernel with fewer MaxSubscriptions, say) stops
		// none of the others; on a failing session each fails fast, and
		// the next session tries again.
		ctx, cancel := context.WithTimeout(r.c.ctx, r.c.drainTimeout())
		err := s.subscribeOn(ctx, cc)
		cancel()
		if err != nil && cc.sess.Err() == nil && r.c.ctx.Err() == nil {
			// The kernel refused it, or did not answer: it ends, and
			// says why, rather than wait for events that never come.
			s.end(fmt.Errorf("sypas: subscribing to %q again on a new session: %w", s.topic, err))
		}
	}
}

// end ends s because of err (Err), closing Events.
func (s *Subscription) end(err error) {
	if s.gone.Swap(true) {
		return
	}
	s.err.Store(&err) // before remove closes Events: a reader sees it then
	s.c.subs.remove(s)
}

// deliver hands an EVENT to its subscription (reader goroutine).
func (r *subRegistry) deliver(f *frame.Frame) error {
	var m wire.Event
	if err := m.Decode(f.Payload); err != nil {
		return &Error{Code: CodeProto, Message: "EVENT payload", Err: err}
	}
	r.mu.RLock()
	s := r.m[m.SubscriptionID]
	r.mu.RUnlock()
	if s == nil {
		return nil // unsubscribed meanwhile
	}
	if d := dropCount(f); d != 0 {
		s.dropped.Add(d)
	}
	ev := Event{Topic: s.topic, Body: append([]byte(nil), m.Body...)}
	if m.Timestamp != 0 {
		ev.Time = time.Unix(0, int64(m.Timestamp))
	}
	s.mu.Lock()
	if !s.closed {
		select {
		case s.events <- ev:
		default:
			s.dropped.Add(1)
		}
	}
	s.mu.Unlock()
	return nil
}
