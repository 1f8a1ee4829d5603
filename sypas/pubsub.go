package sypas

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sypas/go/control"
	"github.com/sypas/go/frame"
	"github.com/sypas/go/wire"
)

// publishing is what a Publish encodes from: recycled (publishings), since
// what is handed to the transport would otherwise be allocated on every
// call.
type publishing struct {
	ev  wire.Event
	ext [8]byte
}

var publishings = sync.Pool{New: func() any { return new(publishing) }}

func (p *publishing) done() {
	p.ev = wire.Event{}
	publishings.Put(p)
}

// SlowPolicy is what Publish does for a subscriber whose ring has no room
// for the event.
//
// There is no "drop oldest": the events that fill a subscriber's ring are
// already published to it, and a single-producer ring cannot take back
// what its consumer may be reading; the kernel keeps no queue of its own
// (it would be memory a slow daemon makes the kernel hold). A subscriber
// that wants the newest events rather than the oldest drains its
// Subscription's Events as they come (its own Pending bound drops the
// newest too) and reads Dropped to know what it missed.
type SlowPolicy uint8

const (
	// DropNewest drops the event for that subscriber at once, counts it,
	// and tells the subscriber how many it lost with its next event
	// (Subscription.Dropped). The publisher never waits.
	DropNewest SlowPolicy = iota
	// Block waits for room up to the publisher's context deadline (or
	// ServerConfig.WriteTimeout), then drops as DropNewest does and makes
	// Publish report it.
	Block
)

// topics is the server's subscription registry: topic name → subscribers,
// the whole map copied on write (subscriptions change rarely) so that
// Publish reads it with one load and no lock.
type topics struct {
	m     atomic.Pointer[map[string][]*subscriber] // never changed in place
	mu    sync.Mutex                               // orders the writers of m, and guards drops
	drops map[string]uint64                        // events dropped, by the topic Publish named
}

// subscriber is one SUBSCRIBE of one session, or one Feed of a Caller
// (feed set, conn nil).
type subscriber struct {
	conn    *serverConn
	feed    *Feed
	id      uint64
	topic   string
	dropped atomic.Uint64 // since the last event delivered
}

func (t *topics) init() {
	t.m.Store(&map[string][]*subscriber{})
	t.drops = make(map[string]uint64)
}

// update replaces topic's subscribers with f of them (none: the topic
// goes), in a new copy of the map; under mu.
func (t *topics) update(topic string, f func([]*subscriber) []*subscriber) {
	m := maps.Clone(*t.m.Load())
	if l := f(m[topic]); len(l) == 0 {
		delete(m, topic)
	} else {
		m[topic] = l
	}
	t.m.Store(&m)
}

// dropped counts n events dropped on topic.
func (t *topics) dropped(topic string, n uint64) {
	t.mu.Lock()
	t.drops[topic] += n
	t.mu.Unlock()
}

// dropCounts returns a copy of the drop counts by topic.
func (t *topics) dropCounts() map[string]uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	m := make(map[string]uint64, len(t.drops))
	for k, v := range t.drops {
		m[k] = v
	}
	return m
}

// list is topic's subscribers, read without a lock.
func (t *topics) list(topic string) []*subscriber { return (*t.m.Load())[topic] }

// add registers sub (its session checked its id).
func (t *topics) add(sub *subscriber) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.update(sub.topic, func(l []*subscriber) []*subscriber {
		return append(append([]*subscriber(nil), l...), sub)
	})
}

// remove unregisters c's subscription id on topic.
func (t *topics) remove(c *serverConn, id uint64, topic string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.update(topic, func(old []*subscriber) []*subscriber {
		l := make([]*subscriber, 0, len(old))
		for _, o := range old {
			if o.conn != c || o.id != id {
				l = append(l, o)
			}
		}
		return l
	})
}

// removeSub unregisters sub.
func (t *topics) removeSub(sub *subscriber) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.update(sub.topic, func(old []*subscriber) []*subscriber {
		l := make([]*subscriber, 0, len(old))
		for _, o := range old {
			if o != sub {
				l = append(l, o)
			}
		}
		return l
	})
}

// dropConn drops every subscription of c (its reader has returned).
func (t *topics) dropConn(c *serverConn) {
	for id, topic := range c.subs {
		t.remove(c, id, topic)
	}
}

// serveSubscription answers SUBSCRIBE and UNSUBSCRIBE (reader goroutine).
func (c *serverConn) serveSubscription(f *frame.Frame) {
	corr := f.Correlation
	if corr == 0 {
		c.sess.Abort(errorf(CodeProto, fmt.Sprintf("%v without a correlation", f.Type)))
		return
	}
	if !c.sess.Admits(f.CapRef) {
		c.deny(corr, "", CodeAuth, control.EventAuth, "cap_ref names no valid token of this session")
		return
	}
	if c.sess.Params().Features&wire.FeatureSubscribe == 0 {
		c.deny(corr, "", CodeProto, control.EventProtocol, "SUBSCRIBE was not granted in WELCOME")
		return
	}
	if cp := c.sess.Capability(); cp == nil || cp.Rights&RightSubscribe == 0 {
		c.deny(corr, "", CodePermission, control.EventPermission, "the token lacks the subscribe right")
		return
	}
	if f.Type == frame.TypeUnsubscribe {
		var m wire.Unsubscribe
		if err := m.Decode(f.Payload); err != nil {
			c.sess.Abort(&Error{Code: CodeProto, Message: "UNSUBSCRIBE payload", Err: err})
			return
		}
		topic, ok := c.subs[m.SubscriptionID]
		if !ok {
			c.deny(corr, "", CodeNotFound, control.EventProtocol, "no such subscription")
			return
		}
		delete(c.subs, m.SubscriptionID)
		c.srv.topics.remove(c, m.SubscriptionID, topic)
		c.ack(corr)
		return
	}
	var m wire.Subscribe
	if err := m.Decode(f.Payload); err != nil {
		c.sess.Abort(&Error{Code: CodeProto, Message: "SUBSCRIBE payload", Err: err})
		return
	}
	if m.Options&wire.SubLastValue != 0 {
		// This kernel keeps no last value per topic (it would be memory
		// that grows with every topic published on): say so, rather than
		// subscribe and ignore the option.
		c.deny(corr, "", CodeProto, control.EventProtocol, "SUBSCRIBE option LAST_VALUE is not supported")
		return
	}
	if _, dup := c.subs[m.SubscriptionID]; dup {
		c.deny(corr, "", CodeProto, control.EventProtocol, "subscription id already in use in this session")
		return
	}
	if len(c.subs) >= c.srv.cfg.MaxSubscriptions {
		c.deny(corr, "", CodeResource, control.EventLimit, "more subscriptions than the kernel's MaxSubscriptions in one session")
		return
	}
	// Copied: the payload is shared memory, and the name outlives it.
	sub := &subscriber{conn: c, id: m.SubscriptionID, topic: string(m.Topic)}
	c.subs[sub.id] = sub.topic
	c.srv.topics.add(sub)
	c.ack(corr)
}

// deliverFeed queues a copy of the event for f; under Block it waits for
// room until ctx's deadline, or WriteTimeout when ctx has none, as a
// session's ring would.
func (s *Server) deliverFeed(ctx context.Context, f *Feed, topic string, body []byte, ts uint64, noWait bool) bool {
	if _, ok := ctx.Deadline(); !ok && !noWait {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, s.cfg.WriteTimeout)
		defer cancel()
	}
	return f.deliver(ctx, Event{Topic: topic, Body: append([]byte(nil), body...), Time: time.Unix(0, int64(ts))}, noWait)
}

// ack answers corr with an empty final RESPONSE.
func (c *serverConn) ack(corr uint64) {
	c.resp.Body = nil
	if err := c.tr.send(c.ctx, frame.Header{Type: frame.TypeResponse, Flags: frame.FlagEndStream, Correlation: corr}, nil, &c.resp, false); err != nil {
		c.sendFailed(err)
	}
}

// Publish sends body as an event on topic to every session subscribed to
// it, as an EVENT with the subscription's id (docs/PROTOCOL.md §8.3). A
// subscriber with no room meets the topic's SlowPolicy
// (ServerConfig.Topics): it loses the event, counted, and learns how many
// it lost with its next event. Publish returns an error matching
// ErrResource if some subscriber lost this event under Block (after
// waiting until ctx's deadline), or ErrTooLarge if the event exceeds a
// session's max_payload; the other subscribers still got it. Publish may be
// called from any goroutine; the body is copied into each ring.
func (s *Server) Publish(ctx context.Context, topic string, body []byte) error {
	subs := s.topics.list(topic)
	if len(subs) == 0 {
		return nil
	}
	noWait := s.cfg.Topics[topic] == DropNewest
	p := publishings.Get().(*publishing)
	defer p.done()
	ev, ext := &p.ev, &p.ext
	*ev = wire.Event{Timestamp: uint64(time.Now().UnixNano()), Topic: stringBytes(topic), Body: body}
	var lost, tooLarge int
	var drops uint64
	for _, sub := range subs {
		if sub.feed != nil {
			if s.deliverFeed(ctx, sub.feed, topic, body, ev.Timestamp, noWait) {
				s.stats.published.Add(1)
			} else {
				s.stats.dropped.Add(1)
				drops++
				if !noWait {
					lost++
				}
			}
			continue
		}
		ev.SubscriptionID = sub.id
		var x []byte
		d := sub.dropped.Load()
		if d != 0 {
			binary.LittleEndian.PutUint64(ext[:], d)
			x = ext[:]
		}
		err := sub.conn.tr.send(ctx, frame.Header{Type: frame.TypeEvent}, x, ev, noWait)
		switch {
		case err == nil:
			if d != 0 {
				sub.dropped.Add(^(d - 1)) // told: subtract what this event reported
			}
			s.stats.published.Add(1)
		case errors.Is(err, ErrTooLarge):
			tooLarge++
		default:
			sub.dropped.Add(1)
			s.stats.dropped.Add(1)
			drops++
			if !noWait {
				lost++
			}
		}
	}
	if drops > 0 {
		s.topics.dropped(topic, drops)
	}
	switch {
	case tooLarge > 0:
		return &Error{Code: CodeTooLarge, Message: fmt.Sprintf("event on %q above the max_payload of %d subscribers", topic, tooLarge)}
	case lost > 0:
		s.log.LogAttrs(ctx, slog.LevelDebug, "sypas: subscribers lost an event", slog.String("topic", topic), slog.Int("lost", lost))
		return &Error{Code: CodeResource, Message: fmt.Sprintf("%d subscribers of %q had no room before the deadline", lost, topic)}
	}
	return nil
}
