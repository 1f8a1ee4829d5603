package control

import (
	"context"
	"errors"
	"math/rand/v2"
	"sync"
	"time"
)

// Client keeps a daemon connected to a kernel: it dials, and whenever the
// session ends it dials again, each time with a fresh handshake, fresh rings
// and a fresh token. Failed attempts are spaced by cfg.Backoff (gRPC
// connection backoff). A session that lived at least the backoff's Base
// (1 s by default) resets it, so the first redial after
// losing a kernel is immediate; one that died sooner counts as a failure,
// so a kernel that drops every session at once is not redialed in a tight
// loop.
//
// While nobody listens at a Unix socket path (no socket, or a stale one), the Client
// also watches it (inotify on its directory, else a 10 ms poll) and dials
// as soon as a socket appears there, without waiting out the backoff: a
// restarted kernel is reconnected within milliseconds of its Listen. A
// kernel that listens but fails handshakes or drops sessions gets the
// whole backoff.
//
// Ownership: a session Session has returned is the caller's to Close once
// it is Done (the Client leaves it open, so that the caller can still read
// what the peer published before it ended). A session nobody asked for is
// closed by the Client. Client.Close closes the current session, even one
// Session returned: closing is safe at any time, and ring calls in flight
// on it return ring.ErrClosed (see Session).
type Client struct {
	path string // the address Dial takes
	sock string // the Unix socket path of path, watched while nobody listens; "" for other networks
	cfg  DialConfig
	rnd  func() float64

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	cur     *Session
	given   bool // cur was returned by Session
	lastErr error
	changed chan struct{} // closed and replaced at every change of cur or lastErr
	cfgErr  error         // cfg is invalid: Session returns it, nothing is dialed
}

// NewClient starts dialing path, an address as Dial takes it (a socket
// path, tcp://host:port...), in the background. An invalid cfg or address
// starts nothing: Session returns its error (wrapping ErrConfig) at once.
func NewClient(path string, cfg DialConfig) *Client {
	return newClient(path, cfg, rand.Float64)
}

func newClient(path string, cfg DialConfig, rnd func() float64) *Client {
	c := &Client{path: path, cfg: cfg, rnd: rnd, changed: make(chan struct{})}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	network, where, err := ParseAddress(path)
	if err == nil {
		err = cfg.check()
	}
	for _, a := range append([]string{path}, cfg.Fallbacks...) {
		if err == nil {
			_, err = cfg.checkAddress(a)
		}
	}
	if err != nil {
		c.cfgErr = err
		return c
	}
	if network == NetworkUnix {
		c.sock = where
	}
	c.wg.Add(1)
	go c.loop()
	return c
}

func (c *Client) loop() {
	defer c.wg.Done()
	minLife := c.cfg.Backoff.withDefaults().Base
	retries := 0 // consecutive failures: failed dials and short-lived sessions
	for {
		var before fileID
		if c.sock != "" {
			before = idOf(c.sock)
		}
		s, err := Dial(c.ctx, c.path, c.cfg)
		c.publish(s, err)
		if err == nil {
			start := time.Now()
			if !c.watch(s) {
				return
			}
			if time.Since(start) >= minLife {
				retries = 0
				continue // redial at once
			}
		}
		delay := c.cfg.Backoff.Delay(retries, c.rnd)
		if err != nil && c.sock != "" && nobodyListening(err) {
			waitSocket(c.ctx, c.sock, before, delay)
		} else {
			select {
			case <-c.ctx.Done():
			case <-sleep(delay):
			}
		}
		if c.ctx.Err() != nil {
			return
		}
		retries++
	}
}

// watch waits for s to end and reports whether the Client goes on. A
// session nobody claimed is the Client's: it answers the kernel's GOAWAY
// with Shutdown at once (nobody has work to finish), and closes it when it
// ends.
func (c *Client) watch(s *Session) bool {
	goAway := s.GoAway()
	for {
		select {
		case <-c.ctx.Done():
			s.Close()
			return false
		case <-goAway:
			goAway = nil
			c.mu.Lock()
			given := c.given
			c.mu.Unlock()
			if !given { // Session no longer hands it out: it is draining
				s.Shutdown(c.ctx)
			}
		case <-s.Done():
			c.mu.Lock()
			given := c.given
			c.mu.Unlock()
			if !given {
				s.Close()
			}
			c.publish(nil, s.Err())
			return true
		}
	}
}

func (c *Client) publish(s *Session, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if s != nil || err != nil {
		c.cur, c.lastErr, c.given = s, err, false
	}
	close(c.changed)
	c.changed = make(chan struct{})
}

// Session returns the current live session, waiting for a (re)connect if
// there is none. When ctx ends first it returns ctx's error joined with the
// last dial error. A Client made with an invalid DialConfig returns that
// error (wrapping ErrConfig) at once.
func (c *Client) Session(ctx context.Context) (*Session, error) {
	if c.cfgErr != nil {
		return nil, c.cfgErr
	}
	for {
		c.mu.Lock()
		s, last, ch := c.claim(), c.lastErr, c.changed
		c.mu.Unlock()
		if s != nil {
			return s, nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			if last != nil {
				return nil, errors.Join(ctx.Err(), last)
			}
			return nil, ctx.Err()
		case <-c.ctx.Done():
			return nil, ErrClientClosed
		}
	}
}

// Current is Session without waiting: the live session if there is one,
// else nil and the last dial error (nil while the first dial is under way,
// ErrClientClosed after Close).
func (c *Client) Current() (*Session, error) {
	if c.cfgErr != nil {
		return nil, c.cfgErr
	}
	if c.ctx.Err() != nil {
		return nil, ErrClientClosed
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if s := c.claim(); s != nil {
		return s, nil
	}
	return nil, c.lastErr
}

// claim returns the current session if it is live, marking it handed out;
// under mu. A draining session (GOAWAY received) is not handed out: the
// Client is about to replace it.
func (c *Client) claim() *Session {
	s := c.cur
	if s == nil || s.Err() != nil || !c.given && s.State() != StateOperation {
		return nil
	}
	c.given = true
	return s
}

// Close stops reconnecting and closes the current session, even one Session
// handed out: ring calls in flight on it, and later ones, return
// ring.ErrClosed. Idempotent.
func (c *Client) Close() error {
	c.cancel()
	c.wg.Wait()
	return nil
}
