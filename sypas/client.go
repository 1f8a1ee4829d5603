package sypas

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sypas/go/control"
	"github.com/sypas/go/frame"
	"github.com/sypas/go/wire"
)

// ClientConfig configures a Client. The zero value works: it dials with
// the control plane's defaults and retries a failed call up to
// DefaultMaxAttempts times.
type ClientConfig struct {
	// DialConfig is the control plane's: the kernel uids to trust, ring
	// sizes to ask for, reconnection backoff, heartbeat limits, and the
	// Logger that receives one audit record per refusal (nil:
	// slog.Default()).
	control.DialConfig
	// MaxAttempts bounds the attempts of a call that fails with a
	// transient error (E_RESOURCE, E_INTERNAL, E_TIMEOUT, E_UNAVAILABLE
	// from the kernel): it is retried only if it never reached the kernel
	// or is marked Idempotent. 1 means no retry; zero means
	// DefaultMaxAttempts.
	MaxAttempts int
	// RetryBackoff spaces the attempts; the kernel's retry_after_ms, when
	// longer, wins. The zero value starts at 10 ms, ×2, capped at 1 s.
	RetryBackoff control.Backoff
}

// DefaultMaxAttempts is ClientConfig.MaxAttempts' default.
const DefaultMaxAttempts = 3

// CallOption marks a call.
type CallOption uint8

const (
	// Idempotent lets a call that may have reached the kernel be retried
	// after a transient error: running it twice must be harmless.
	Idempotent CallOption = 1 << iota
	// WaitForReady makes a call wait, until its context ends, for a
	// session when there is none (the kernel is restarting), rather than
	// fail at once with an error matching ErrUnavailable.
	WaitForReady
)

// Client is the daemon side of the bridge: it keeps a session with the
// kernel (reconnecting with backoff when the kernel goes away), and makes
// calls, one-way sends and subscriptions on it. Its methods are safe for
// many goroutines at once; each blocking one honours its context.
type Client struct {
	cfg ClientConfig
	ctl *control.Client
	rnd func() float64

	ctx    context.Context // ends with Close
	cancel context.CancelFunc
	wg     sync.WaitGroup

	cur     atomic.Pointer[clientConn]
	mu      sync.Mutex
	changed chan struct{} // closed and replaced when cur changes

	subs subRegistry

	inlineLogged atomic.Bool            // the fallback to inline is logged once
	fallbackAt   atomic.Pointer[string] // the fallback address last logged
}

// NewClient returns a Client that connects to the kernel at addr in the
// background, and again whenever the session ends. A call made before the
// first session is up fails with an error matching ErrUnavailable unless
// it is WaitForReady; Dial waits for the first session.
//
// addr is a Unix socket path or unix:///path (shared memory, or frames
// inline on the socket), tcp://host:port (TLS 1.3 with ClientConfig.TLS:
// the kernel's CA and this daemon's certificate), or grpc://host:port
// when a package providing it is built in (control.RegisterTransport).
// ClientConfig.Fallbacks lists addresses to use, in order, when the one
// before cannot be reached; Transport says which one is in use and why.
// An address that cannot work (tcp:// without TLS) is refused with an
// error matching ErrConfig.
func NewClient(addr string, cfg ClientConfig) (*Client, error) {
	if cfg.MaxAttempts < 0 {
		return nil, fmt.Errorf("%w: ClientConfig.MaxAttempts %d is negative", control.ErrConfig, cfg.MaxAttempts)
	}
	cfg.MaxAttempts = cmp.Or(cfg.MaxAttempts, DefaultMaxAttempts)
	cfg.Features = cmp.Or(cfg.Features, control.DefaultFeatures) | wire.FeatureSubscribe | wire.FeatureInline | wire.FeatureBulk
	if cfg.RetryBackoff == (control.Backoff{}) {
		cfg.RetryBackoff = control.Backoff{Base: 10 * time.Millisecond, Multiplier: 2, Max: time.Second}
	}
	ctl := control.NewClient(addr, cfg.DialConfig)
	if _, err := ctl.Current(); errors.Is(err, control.ErrConfig) {
		ctl.Close()
		return nil, err
	}
	c := &Client{cfg: cfg, ctl: ctl, rnd: rand.Float64, changed: make(chan struct{})}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	c.subs.init(c)
	c.wg.Add(1)
	go c.follow()
	return c, nil
}

// Dial is NewClient, then waits (within ctx) for the first session.
func Dial(ctx context.Context, addr string, cfg ClientConfig) (*Client, error) {
	c, err := NewClient(addr, cfg)
	if err != nil {
		return nil, err
	}
	if _, err := c.conn(ctx, true); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// follow installs each session the control plane establishes, restores
// the subscriptions on it, and answers its end.
func (c *Client) follow() {
	defer c.wg.Done()
	for {
		s, err := c.ctl.Session(c.ctx)
		if err != nil {
			return // Close
		}
		cc := newClientConn(c, s)
		c.setCur(cc)
		c.subs.restore(cc)
		c.watch(cc)
		c.setCur(nil)
		cc.closeSession(context.Background(), false)
	}
}

func (c *Client) setCur(cc *clientConn) {
	c.cur.Store(cc)
	c.mu.Lock()
	close(c.changed)
	c.changed = make(chan struct{})
	c.mu.Unlock()
}

// watch waits for cc's session to end. On GOAWAY it starts nothing new on
// it and, once the calls in flight are answered (or DrainTimeout), ends it
// in order; Close ends it at once.
func (c *Client) watch(cc *clientConn) {
	select {
	case <-cc.sess.Done():
		return
	case <-c.ctx.Done():
		return
	case <-cc.sess.GoAway():
	}
	cc.draining.Store(true)
	c.setCur(nil) // new calls wait for (or fail without) the next session
	t := time.NewTimer(c.drainTimeout())
	defer t.Stop()
	for cc.pending.Load() > 0 {
		select {
		case <-cc.idle:
		case <-t.C:
			cc.closeSession(context.Background(), false)
			return
		case <-cc.sess.Done():
			return
		case <-c.ctx.Done():
			return
		case <-time.After(10 * time.Millisecond):
		}
	}
	cc.closeSession(c.ctx, true)
}

func (c *Client) drainTimeout() time.Duration {
	return cmp.Or(c.cfg.DrainTimeout, control.DefaultDrainTimeout)
}

// conn returns the session's clientConn: at once, or (wait) when one is
// up, within ctx.
func (c *Client) conn(ctx context.Context, wait bool) (*clientConn, error) {
	for {
		if cc := c.cur.Load(); cc != nil && cc.sess.State() != control.StateClosed && !cc.draining.Load() {
			return cc, nil
		}
		if c.ctx.Err() != nil {
			return nil, fmt.Errorf("sypas: %w", ErrClosed)
		}
		c.mu.Lock()
		ch := c.changed
		c.mu.Unlock()
		if cc := c.cur.Load(); cc != nil && cc.sess.State() != control.StateClosed && !cc.draining.Load() {
			return cc, nil
		}
		if !wait {
			_, last := c.ctl.Current()
			if last == nil {
				last = errors.New("connecting")
			}
			return nil, unavailable(last)
		}
		select {
		case <-ch:
		case <-ctx.Done():
			_, last := c.ctl.Current()
			if last != nil {
				return nil, errors.Join(ctx.Err(), unavailable(last))
			}
			return nil, ctx.Err()
		case <-c.ctx.Done():
			return nil, fmt.Errorf("sypas: %w", ErrClosed)
		}
	}
}

// Call calls op with body and returns the reply, a new slice the caller
// owns (the one allocation of a call). An error from the kernel is an
// *Error (match it with errors.Is against ErrNotFound, ErrPermission...);
// a call whose session ended or could not start matches ErrUnavailable;
// ctx's error when ctx ends first. A body above the session's max_payload
// goes in bulk, copied once into the session's bulk region, where the
// kernel reads it in place (waiting for room until ctx's deadline, then
// an error matching ErrResource); one above the bulk region, or above
// max_payload on a session without bulk (inline), fails with ErrTooLarge
// before anything is sent. AllocSpan and CallSpan avoid the copy.
func (c *Client) Call(ctx context.Context, op string, body []byte, opts ...CallOption) ([]byte, error) {
	return c.do(ctx, op, body, modeOwn, nil, nil, false, opts)
}

// CallInto is Call with the reply appended to dst (which may be nil) and
// returned: with a dst of enough capacity, a call allocates nothing.
func (c *Client) CallInto(ctx context.Context, op string, body, dst []byte, opts ...CallOption) ([]byte, error) {
	return c.do(ctx, op, body, modeInto, dst, nil, false, opts)
}

// CallFunc is Call with the reply handed to fn instead of returned: a
// view, in place in the shared ring when this goroutine read the reply
// itself, or in the kernel's bulk region for a reply over max_payload
// (whoever read it; the span is released when fn returns), valid only
// until fn returns (copy what you keep; the kernel can
// still change bytes of shared memory under a view). fn's error is
// CallFunc's, and a panic in fn reaches CallFunc's caller once the call is
// over (the Client stays usable). fn runs while this goroutine reads the
// ring for everyone: keep it short, and make no call on the Client from
// it (that call's reply would wait for fn to return).
func (c *Client) CallFunc(ctx context.Context, op string, body []byte, fn func(reply []byte) error, opts ...CallOption) error {
	_, err := c.do(ctx, op, body, modeView, nil, fn, false, opts)
	return err
}

// Send calls op one-way: the kernel runs it and answers nothing, not even
// an error (its refusals are counted and audited on the kernel's side).
// Send returns once the request is in the kernel's ring.
func (c *Client) Send(ctx context.Context, op string, body []byte, opts ...CallOption) error {
	_, err := c.do(ctx, op, body, modeOwn, nil, nil, true, opts)
	return err
}

// Health calls the kernel's health operation: "SERVING", or "NOT_SERVING"
// while it shuts down.
func (c *Client) Health(ctx context.Context) (string, error) {
	b, err := c.Call(ctx, HealthOp, nil)
	return string(b), err
}

func (c *Client) do(ctx context.Context, op string, body []byte, mode uint8, dst []byte, fn func([]byte) error, oneWay bool, opts []CallOption) ([]byte, error) {
	var o CallOption
	for _, x := range opts {
		o |= x
	}
	if op == "" || len(op) > wire.MaxNameLen {
		return nil, fmt.Errorf("sypas: op of %d bytes: %w (1..%d)", len(op), ErrInvalidOp, wire.MaxNameLen)
	}
	reauthed := false
	for attempt := 1; ; attempt++ {
		cc, err := c.conn(ctx, o&WaitForReady != 0)
		if err != nil {
			return nil, err
		}
		if n := 10 + len(op) + len(body); n > cc.tr.maxPayload() {
			return nil, &Error{Code: CodeTooLarge, Message: fmt.Sprintf("request of %d bytes, the session's limit is %d", n, cc.tr.maxPayload())}
		} else if oneWay && cc.own != nil && n > int(cc.sess.Params().MaxPayload) {
			// A one-way request in bulk: its ACK must be read though no
			// caller waits for an answer (bulk.go).
			cc.startSubReader()
		}
		s, err := cc.acquire(ctx)
		if err != nil {
			if ctx.Err() == nil && o&WaitForReady != 0 {
				continue // the session ended: wait for the next
			}
			return nil, err
		}
		s.mode, s.dst = mode, dst
		s.req.Method, s.req.Body, s.req.Timeout = stringBytes(op), body, 0
		if dl, ok := ctx.Deadline(); ok {
			s.req.Timeout = max(time.Until(dl), 1)
		}
		reply, sent, err := cc.call(ctx, s, frame.TypeRequest, &s.req, oneWay, fn)
		if err == nil || ctx.Err() != nil {
			return reply, err
		}
		var se *sessionEnded
		lost := errors.As(err, &se)
		switch {
		case ClassOf(err) == Reauthenticate && !reauthed && (!lost || !sent || o&Idempotent != 0):
			// A fresh attestation and token, once: the next session. The
			// kernel refused the call (an E_AUTH answer), or it never went
			// out; a call in flight when its session ended with E_AUTH (a
			// revoked token) may have run, and goes again only if
			// Idempotent.
			reauthed = true
			cc.closeSession(context.Background(), false)
			wctx, cancel := ctx, context.CancelFunc(func() {})
			if o&WaitForReady == 0 {
				// A fail-fast call waits for the new session only as
				// long as a reconnection takes, not for a kernel away.
				wctx, cancel = context.WithTimeout(ctx, reauthGrace)
			}
			_, werr := c.waitNext(wctx, cc)
			cancel()
			if werr != nil {
				if ctx.Err() != nil {
					return nil, werr
				}
				return nil, errors.Join(err, unavailable(werr))
			}
			continue
		case lost && o&WaitForReady != 0 && (!sent || o&Idempotent != 0):
			continue // wait for the next session, and try again there
		case !lost && Retryable(err) && (!sent || o&Idempotent != 0) && attempt < c.cfg.MaxAttempts:
			if err := c.backoff(ctx, attempt, err); err != nil {
				return nil, err
			}
			continue
		}
		return nil, err
	}
}

// ErrInvalidOp is a call with an empty or over-long op name.
var ErrInvalidOp = errors.New("sypas: invalid op name")

// waitNext waits for a session other than cc's.
func (c *Client) waitNext(ctx context.Context, cc *clientConn) (*clientConn, error) {
	for {
		n, err := c.conn(ctx, true)
		if err != nil || n != cc {
			return n, err
		}
		select { // cc's end is being noticed
		case <-cc.sess.Done():
			c.setCur(nil)
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// reauthGrace bounds how long a call that is not WaitForReady waits for
// the new session of a re-authentication.
const reauthGrace = time.Second

// maxRetryAfter bounds the kernel's retry_after_ms that a retry honours
// (a u32 of milliseconds reaches 49 days).
const maxRetryAfter = time.Minute

// backoff sleeps before attempt+1: the retry backoff, or the kernel's
// retry_after when longer (up to maxRetryAfter); within ctx. A sleep that
// would outlast ctx's deadline returns err at once.
func (c *Client) backoff(ctx context.Context, attempt int, err error) error {
	d := c.cfg.RetryBackoff.Delay(attempt-1, c.rnd)
	var e *Error
	if errors.As(err, &e) && e.RetryAfter > d {
		d = min(e.RetryAfter, maxRetryAfter)
	}
	if dl, ok := ctx.Deadline(); ok && time.Until(dl) < d {
		return err
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return errors.Join(ctx.Err(), err)
	}
}

// Close ends the session and stops reconnecting. Calls in flight return
// an error matching ErrUnavailable; later ones ErrClosed. Idempotent.
func (c *Client) Close() error {
	c.cancel()
	c.wg.Wait() // follow closes the session once no reader holds a frame
	err := c.ctl.Close()
	c.subs.closeAll()
	return err
}
