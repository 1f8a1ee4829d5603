package sypas

import (
	"context"
	"sync"
	"time"

	"github.com/sypas/go/bulk"
	"github.com/sypas/go/control"
	"github.com/sypas/go/control/token"
)

// Request is one call as a handler sees it. It is valid until the handler
// returns.
type Request struct {
	// Op is the operation, as registered with Handle.
	Op string
	// Body is the request body. For an Inline handler it is a view into
	// the shared ring, which the daemon can still rewrite while the
	// handler reads it: copy what you validate before you act on it. Other
	// handlers get a private copy (a slow handler must not pin ring space
	// the session needs).
	Body []byte
	// Peer is the daemon as attested when it connected (uid, gid, pid,
	// executable).
	Peer control.PeerIdentity
	// Subject and TokenID identify the token the request was checked
	// against.
	Subject token.Subject
	TokenID uint64
	// Correlation is the request id; 0 for a one-way Send, which is never
	// answered.
	Correlation uint64

	// conn is the session the request came on (nil for a Request made
	// elsewhere); reply the span AllocReply reserved, if held; inline
	// says the handler runs on the session's reader.
	conn   *serverConn
	reply  bulk.Span
	held   bool
	inline bool
}

// reqContext is the context of a handler whose request has a deadline:
// the session's context, narrowed to that deadline. (A request without one
// gets the session's context itself.) Each is used once (newReqContext),
// and the timer a deadline needs is made only if the handler asks for
// Done, so a handler that never waits on its context allocates nothing.
type reqContext struct {
	parent   context.Context // ends with the session or the server
	deadline time.Time       // the request's, never zero

	once    sync.Once
	derived context.Context
	cancel  context.CancelFunc
}

func (c *reqContext) Deadline() (time.Time, bool) { return c.deadline, true }

func (c *reqContext) Done() <-chan struct{} {
	c.once.Do(c.arm)
	return c.derived.Done()
}

func (c *reqContext) arm() { c.derived, c.cancel = context.WithDeadline(c.parent, c.deadline) }

func (c *reqContext) Err() error {
	if err := c.parent.Err(); err != nil {
		return err
	}
	if !time.Now().Before(c.deadline) {
		return context.DeadlineExceeded
	}
	return nil
}

func (c *reqContext) Value(key any) any { return c.parent.Value(key) }

// end releases the deadline's timer, if one was made.
func (c *reqContext) end() {
	if c.cancel != nil {
		c.cancel()
	}
}
