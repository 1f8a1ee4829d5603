package futex

import "time"

// Poller idles as a Waiter does before it parks (spin in bursts with a
// yield between them, then yield; after a yield that ran a hog, park at
// once for a while: see Waiter), for a condition that no Notify signals:
// bytes on a socket, say, whose wake-up comes another way once Poll gives
// up. Its ready may make a system call, so Poll reads the clock after
// every poll.
//
// Unlike a Waiter's, a Poller's budgets do not shrink after waits that
// took long: on a socket the answer comes after the peer's whole turn,
// which a Waiter's rule (a busy wait slower than a futex round trip was
// not worth its CPU) counts as a miss nearly every time, and the budgets
// then shrink until every wait parks. A wait thus costs at most the spin
// and yield budgets of CPU before it parks; the bursts' yields and the hog
// rule keep a peer that shares our CPU running.
//
// Only one goroutine may call Poll at a time.
type Poller struct {
	w Waiter // no sleep word: never parks, never kicked
}

// NewPoller returns a Poller idling as cfg says (see Config; Resolved
// gives the budgets). NewPoller panics if cfg is invalid (see
// Config.Validate).
func NewPoller(cfg Config) *Poller {
	if err := cfg.Validate(); err != nil {
		panic(err)
	}
	p := new(Poller)
	p.w.init(cfg, true)
	return p
}

// Config returns the Poller's resolved configuration.
func (p *Poller) Config() Config { return p.w.cfg }

// Poll polls ready until it reports true, spinning and yielding as the
// Config says, and reports whether it did; false means the busy phases
// are over, or deadline (zero: none) has passed, and the caller should
// park. Under PolicySpin only ready or the deadline ends it; under
// PolicyPark it polls once.
func (p *Poller) Poll(ready func() bool, deadline time.Time) bool {
	p.w.SetWaitDeadline(deadline)
	ok, _ := p.w.busy(ready) // only the deadline fails: never closed or interrupted
	return ok
}
