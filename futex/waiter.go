package futex

import (
	"errors"
	"fmt"
	"math"
	"os"
	"sync/atomic"
	"time"
)

var (
	// ErrClosed is returned (wrapped) by Wait after Close.
	ErrClosed = os.ErrClosed
	// ErrInterrupted is what Wait returns after Interrupt(nil).
	ErrInterrupted = errors.New("futex: wait interrupted")

	errClosed = fmt.Errorf("futex: %w", ErrClosed) // made once: Wait must not allocate
	// errHogged ends PolicyAuto's busy phases after a yield to a hog (see
	// hogYield): the waiter parks. It never leaves Wait.
	errHogged = errors.New("futex: the CPU is hogged")
)

// spinCheckEvery is how many polls the spin phase makes between clock reads.
// A clock read costs about 20 ns, a poll plus PAUSE a few ns to ~40 ns
// depending on the CPU, so the clock adds a few percent at most while the
// budget and the deadline are still checked every microsecond or so.
const spinCheckEvery = 64

// maxBackoff bounds PolicyAuto's adaptive shrinking of the busy budgets to
// 1/32 of the configured ones: with the defaults, well under a microsecond,
// which the spin loop's clock check rounds up to about one check interval.
const maxBackoff = 5

// parkCost is about what parking costs the waiter in latency: a
// cross-process futex round trip on the reference machine. A busy wait that
// lasts longer than this was not worth its CPU.
const parkCost = 5 * time.Microsecond

// Sleep word values.
const (
	awake  = 0 // not parked: Notify does nothing
	parked = 1 // parked or about to park: Notify must swap to 0 and wake
)

// Notify wakes the peer parked on word, if any. It makes a FUTEX_WAKE system
// call only when the word says the peer is parked, and returns true if it did.
//
// Call it after publishing the data the peer waits for with an atomic store.
// When the peer is not parked it costs one load of a cache line nobody
// writes, and allocates nothing.
func Notify(word *atomic.Uint32) bool {
	raceFence() // order the caller's data store before our load of word
	if word.Load() != awake && word.Swap(awake) != awake {
		_, _ = Wake(word, 1) // fails only for a bad address, which Load would have faulted on
		return true
	}
	return false
}

// Waiter is the waiting side of one sleep word: the goroutine that waits for
// a condition which a peer, usually in another process, makes true and then
// signals with Notify on the same word.
//
// Only one goroutine may call Wait at a time. SetDeadline, Close and
// Interrupt may be called from any goroutine, concurrently with Wait.
type Waiter struct {
	// Written by the waiter (0/1) and by notifiers (swap to 0). Shared memory:
	// the peer may store anything here.
	word *atomic.Uint32
	cfg  Config // resolved; read-only after NewWaiter
	// poller: a Poller's, whose polls are system calls: no clock-free
	// first polls, the spin phase reads the clock after every poll, and
	// the budgets do not shrink (see Poller).
	poller bool

	// base is a monotonic reading taken by NewWaiter; deadlines and budgets are
	// durations since base, so wall-clock jumps do not affect them.
	base time.Time
	// deadline is the deadline as nanoseconds since base; 0 = none, and a
	// deadline at or before base is stored as -1 (past).
	deadline atomic.Int64

	// backoff is the PolicyAuto busy-budget shift, 0..maxBackoff, and burst
	// the polls its spin phase makes between two yields, 0..maxBurst. Only
	// Wait touches them; atomic so that successive Waits from different
	// goroutines need no other synchronization.
	backoff atomic.Uint32
	burst   atomic.Uint32
	// hogged is when (since base) a PolicyAuto yield last ran a hog (see
	// hogYield), 0 if none ever did; until hogUntil (0 once passed) Waits
	// park at once, and hogFor is how long that was, in ns.
	hogged   atomic.Int64
	hogUntil atomic.Int64
	hogFor   atomic.Int64

	closed atomic.Bool
	intr   atomic.Pointer[error] // first Interrupt error, nil if none

	// progressed is set by Progress, called from ready during Wait, and
	// cleared by park before each look at the condition: on Wait's goroutine
	// only, so a plain field.
	progressed bool
	// nap is the private word a throttled park sleeps on (napping), so that
	// kick can end that sleep at once; the shared word cannot serve, since
	// the peer that floods us with wake-ups also clears it.
	nap atomic.Uint32
	// throttled counts the naps, for Throttled.
	throttled atomic.Uint64
	// sleeps counts park's entries into and exits from FUTEX_WAIT on the
	// shared word: odd from before it reads the state it sleeps on until
	// FUTEX_WAIT returns (see kick).
	sleeps atomic.Uint32
}

// nap values.
const (
	napIdle    = 0
	napping    = 1
	napStopped = 2 // kick ended the nap
)

// Throttling of wake-ups that bring no progress (see park). A legitimate
// peer wakes us when it publishes, which is progress; a wake-up without any
// is a rare race or a signal, so a few in a row are free. Beyond that each
// one is followed by a sleep of minNap, doubling up to maxNap, so a peer that
// only wakes us costs us about one wake-up per maxNap. One that comes more
// than idleForgotten after the last starts the count again.
const (
	freeIdleWakes = 3
	minNap        = 20 * time.Microsecond
	maxNap        = time.Millisecond
	idleForgotten = 10 * time.Millisecond
)

// NewWaiter returns the waiting side of word, which must stay mapped until
// the Waiter is closed and its last Wait has returned. The word should start
// at 0. NewWaiter panics if word is nil or cfg is invalid (see
// Config.Validate).
func NewWaiter(word *atomic.Uint32, cfg Config) *Waiter {
	if word == nil {
		panic("futex: NewWaiter with nil word")
	}
	if err := cfg.Validate(); err != nil {
		panic(err)
	}
	w := &Waiter{word: word}
	w.init(cfg, false)
	return w
}

func (w *Waiter) init(cfg Config, poller bool) {
	w.cfg, w.base, w.poller = cfg.Resolved(), time.Now(), poller
	w.burst.Store(maxBurst)
}

// Config returns the Waiter's resolved configuration.
func (w *Waiter) Config() Config { return w.cfg }

// Wait returns nil as soon as ready reports true. Until then it idles as its
// Config says: spin (poll ready with a CPU pause hint), then yield (poll
// between sched_yield calls, letting another process run on this core), then
// park (sleep in FUTEX_WAIT until a Notify, with the sleep-word protocol).
//
// Wait returns os.ErrDeadlineExceeded when the deadline passes, an error
// matching ErrClosed (and os.ErrClosed) after Close, and the Interrupt error
// after Interrupt; Close takes precedence over Interrupt. As with net.Conn
// ("fail instead of blocking"), a deadline bounds waiting only: if ready
// already reports true, Wait returns nil even when the deadline has passed.
//
// ready must read what the peer publishes with an atomic load, must be cheap,
// and must not block. Passing a method value made once keeps Wait free of
// allocations.
func (w *Waiter) Wait(ready func() bool) error {
	ok, err := w.busy(ready)
	if ok || err != nil {
		return err
	}
	return w.park(ready)
}

// busy runs Wait's phases before the park: it reports whether ready became
// true, or the error that ended the wait; false and nil mean park now.
func (w *Waiter) busy(ready func() bool) (bool, error) {
	if err := w.stopErr(); err != nil {
		return false, err
	}
	if ready() {
		return true, nil
	}
	cfg := &w.cfg
	hogged := cfg.Policy == PolicyAuto && w.hoggedRecently()
	polled := uint32(0) // polls of the spin phase already made
	if cfg.Policy != PolicyPark && !hogged && cfg.Spin > 0 && w.deadline.Load() == 0 && !w.poller {
		polled = quickPolls
		if cfg.Policy == PolicyAuto {
			polled = w.burst.Load() // the first burst, then a yield
		}
		if w.quickPoll(ready, polled) {
			return true, nil
		}
	}
	now := w.now()
	if err := w.checkDeadline(now); err != nil {
		return false, err
	}
	if cfg.Policy == PolicyPark || hogged {
		return false, nil
	}
	if cfg.Policy == PolicySpin {
		return w.busyWait(ready, now, cfg.Spin, Off, false, polled) // returns only when done
	}
	// PolicyAuto's busy budgets adapt (PolicySpin's stay whole): a Wait that
	// the busy phases satisfy faster than a park would have (parkCost)
	// doubles them back towards the configured values; one that took longer,
	// or spun and yielded in vain and then parked, halves them (down to
	// 1/2^maxBackoff). A peer that answers quickly keeps the budget whole; on
	// a machine so loaded that the peer rarely runs while we spin, we stop
	// burning the budget before parking.
	if w.poller {
		return w.busyWait(ready, now, cfg.Spin, cfg.Yield, true, polled) // bursts, as below
	}
	shift := w.backoff.Load()
	spin, yield := cfg.Spin>>shift, cfg.Yield>>shift // Off stays negative
	ok, err := w.busyWait(ready, now, spin, yield, true, polled)
	if err != nil {
		return false, err
	}
	if ok && w.now()-now <= parkCost {
		if shift > 0 {
			w.backoff.Store(shift - 1)
		}
		return true, nil
	}
	if shift < maxBackoff && (spin > 0 || yield > 0) {
		w.backoff.Store(shift + 1)
	}
	return ok, nil
}

// quickPolls bounds the first, clock-free part of PolicySpin's spin phase: a
// peer in the middle of a conversation answers within a few cache-line round
// trips, and reading the clock (~25 ns) would be a large part of that.
// PolicyAuto polls its current burst instead.
const quickPolls = 64

// Bursts (PolicyAuto). A waiter that spins on the CPU its peer needs (two
// processes that share a core, as they come to on a busy machine) delays the
// answer it waits for by every poll it makes before it yields: with a core
// to itself, spinning serves within a few polls; without, only yielding
// does, at once. So the spin phase polls in bursts and yields between them,
// and each yield tells which case holds: one after which the answer is
// there let the peer run here, and the burst halves, down to 0: yield
// first; one after which it is not, doubles it. (How long the yield took
// cannot tell: the peer's turn can be as short as a bare sched_yield, and
// with no yield ever made while nobody else wanted the CPU there is no bare
// one to compare with.) maxBurst (about 7 µs of polls here) bounds the polls
// between two yields; a yield that runs nobody else costs one system call
// per burst. A yield to a thread that does not hand the CPU back is another
// matter (see hogYield).
const maxBurst = 255

// hogYield is how long a sched_yield must take to show that it ran a thread
// that does not hand the CPU back (a hog), rather than a peer that answers
// and waits again within microseconds: a busy process on our CPU keeps it
// until the scheduler's next tick, milliseconds later, and the peer may well
// have answered on the other CPU meanwhile. Every such yield costs the wait
// that long, which is how, with more busy threads than CPUs, the default
// Config came to take milliseconds a round trip where park mode took 15 µs.
// So a PolicyAuto wait whose yield ran a hog parks (a wake-up preempts the
// hog), the burst does not shrink for it, and for a while after it the
// waits park at once, as PolicyPark does: spinning first would hold the CPU
// from a peer that shares it with us, and only a yield, which the hog may
// take, could tell whether it does. The while is minHogPark, doubling up to
// maxHogPark while the first yield after it (a probe, which costs at most a
// tick) runs a hog again: a hog that the scheduler brings to our CPU now and
// then costs little time in park mode, one that stays costs a probe per
// maxHogPark.
const hogYield = 50 * time.Microsecond

const (
	minHogPark = time.Millisecond
	maxHogPark = 100 * time.Millisecond
)

// quickPoll polls ready up to n times without reading the clock. Callers
// skip it when a deadline is set, so a passed deadline still fails at once.
// A success here is a fast one, which PolicyAuto's budgets reward.
func (w *Waiter) quickPoll(ready func() bool, n uint32) bool {
	for i := uint32(0); i < n; i++ {
		cpuRelax()
		if ready() {
			if w.cfg.Policy == PolicyAuto {
				if shift := w.backoff.Load(); shift > 0 {
					w.backoff.Store(shift - 1)
				}
			}
			return true
		}
	}
	return false
}

// busyWait polls ready, spinning for the spin budget and then yielding for
// the yield budget (forever under PolicySpin). With bursts, the spin phase
// yields between bursts of polls and adapts their length (see maxBurst). It
// reports whether ready became true, or the error that ended the wait.
// polled is how many polls quickPoll made before.
func (w *Waiter) busyWait(ready func() bool, now, spin, yield time.Duration, bursts bool, polled uint32) (bool, error) {
	if spin > 0 {
		burst := uint32(math.MaxUint32)
		if bursts {
			burst = w.burst.Load()
		}
		ok, next, end, err := w.spinPhase(ready, now, now+spin, burst, polled)
		if bursts && next != burst {
			w.burst.Store(next)
		}
		if err == errHogged {
			return ok, nil
		}
		if ok || err != nil {
			return ok, err
		}
		now = end
	}
	forever := w.cfg.Policy == PolicySpin
	if forever || yield > 0 {
		end := now + yield
		for {
			last := now // read just before the yield
			osYield()
			now = w.now()
			hogged := !forever && w.ranHog(now-last, now)
			if ready() {
				return true, nil
			}
			if err := w.stopErr(); err != nil {
				return false, err
			}
			if err := w.checkDeadline(now); err != nil {
				return false, err
			}
			if hogged || (!forever && now >= end) {
				break
			}
		}
	}
	return false, nil
}

// spinPhase polls ready until end, yielding after every burst polls (the
// first burst has had polled of them already) and adapting burst. It
// returns whether ready became true, the next burst, the time it last read,
// or the error that ended the wait (errHogged: park now).
func (w *Waiter) spinPhase(ready func() bool, now, end time.Duration, burst, polled uint32) (bool, uint32, time.Duration, error) {
	for polls := polled; ; {
		if polls < burst {
			polls++
			cpuRelax()
			if ready() {
				return true, burst, now, nil
			}
			if polls%spinCheckEvery != 0 && !w.poller {
				continue
			}
		} else {
			polls = 0
			before := w.now()
			osYield()
			now = w.now()
			hogged := w.ranHog(now-before, now)
			ok := ready()
			if hogged {
				return ok, min(2*burst+1, maxBurst), now, errHogged
			}
			if ok {
				return true, burst / 2, now, nil // the peer ran, here
			}
			burst = min(2*burst+1, maxBurst)
		}
		if err := w.stopErr(); err != nil {
			return false, burst, now, err
		}
		now = w.now()
		if err := w.checkDeadline(now); err != nil {
			return false, burst, now, err
		}
		if now >= end {
			return false, burst, now, nil
		}
	}
}

// ranHog reports whether a yield that lasted took, ending at now, ran a
// hog, and if so remembers when.
func (w *Waiter) ranHog(took, now time.Duration) bool {
	if took < hogYield {
		return false
	}
	d := minHogPark
	last, prev := time.Duration(w.hogged.Load()), time.Duration(w.hogFor.Load())
	if last != 0 && now-last < 2*prev { // the probe after the last park mode
		d = min(2*prev, maxHogPark)
	}
	w.hogged.Store(int64(now))
	w.hogFor.Store(int64(d))
	w.hogUntil.Store(int64(now + d))
	return true
}

// hoggedRecently reports whether Waits park at once after a yield that ran
// a hog. Outside that while it costs a load: no clock read on the way to
// the spin.
func (w *Waiter) hoggedRecently() bool {
	u := w.hogUntil.Load()
	if u == 0 {
		return false
	}
	if w.now() < time.Duration(u) {
		return true
	}
	w.hogUntil.Store(0)
	return false
}

// Progress tells Wait that the peer moved without making the condition true
// yet: a consumer released some room, but less than the producer waits for.
// Call it from the ready function. Wait sleeps off wake-ups that bring
// neither the condition nor progress, so that a peer that only wakes us in a
// loop costs us little CPU; a ready function that never calls Progress makes
// every wake-up that leaves it false look like one.
func (w *Waiter) Progress() { w.progressed = true }

// beforeSleep, set by tests only, runs in park right before FUTEX_WAIT.
var beforeSleep func()

// Throttled is how many times Wait has slept off wake-ups that brought
// neither the condition nor progress (see Progress). It stays at or near 0
// with a well-behaved peer; one that keeps growing means the peer wakes us
// without publishing anything: a bug or an attack, worth reporting.
func (w *Waiter) Throttled() uint64 { return w.throttled.Load() }

// park runs the waiter's side of the sleep-word protocol until ready reports
// true or the wait fails.
func (w *Waiter) park(ready func() bool) error {
	woken := false             // the last FUTEX_WAIT returned: the next look judges the wake-up
	idle := 0                  // wake-ups in a row that brought no progress
	var lastIdle time.Duration // when the last of them was judged
	for {
		// Publish "parked" before the last look at the condition: a notifier
		// that stored its data after our look will see the flag and wake us.
		// The same holds for SetDeadline, Close and Interrupt, which swap the
		// word after changing their state (see kick). Swap rather than Store:
		// a read-modify-write is a full barrier even under the race detector,
		// where Store is only a release (see raceFence).
		w.word.Swap(parked)
		w.progressed = false
		if ready() {
			w.word.Store(awake)
			return nil
		}
		if err := w.stopErr(); err != nil {
			w.word.Store(awake)
			return err
		}
		if w.progressed {
			idle = 0
		} else if woken {
			// Woken for nothing: by a peer that published nothing (or wrote
			// garbage in the word, which makes FUTEX_WAIT return at once), a
			// signal, or a stale Notify. Past a few in a row, sleep it off.
			now := w.now()
			if now-lastIdle > idleForgotten {
				idle = 0
			}
			idle++
			lastIdle = now
			if idle > freeIdleWakes {
				w.throttled.Add(1)
				w.word.Store(awake)
				w.sleepOff(min(minNap<<min(idle-freeIdleWakes-1, 16), maxNap))
				woken = false
				continue
			}
		}
		// Odd from before the state is read below until FUTEX_WAIT returns:
		// kick, which changes the state before it reads sleeps, either has
		// its change read below or sees this sleep begun and wakes it until
		// it is over.
		w.sleeps.Add(1)
		timeout, err := w.sleepTimeout()
		if err != nil {
			w.sleeps.Add(1)
			w.word.Store(awake)
			return err
		}
		// Sleeps only while the word is still "parked": a Notify or kick since
		// our Store makes this return at once. A timeout is not trusted: the
		// loop re-reads the (maybe moved) deadline against the clock.
		if hook := beforeSleep; hook != nil {
			hook()
		}
		err = Wait(w.word, parked, timeout)
		w.sleeps.Add(1)
		if err != nil && err != os.ErrDeadlineExceeded {
			w.word.Store(awake)
			return err
		}
		woken = err == nil
	}
}

// sleepTimeout returns how long park may sleep in FUTEX_WAIT (negative: no
// limit), or the error Wait must fail with instead.
func (w *Waiter) sleepTimeout() (time.Duration, error) {
	if err := w.stopErr(); err != nil {
		return 0, err
	}
	if dl := w.deadline.Load(); dl != 0 {
		if timeout := time.Duration(dl) - w.now(); timeout > 0 {
			return timeout, nil
		}
		return 0, os.ErrDeadlineExceeded
	}
	return -1, nil
}

// sleepOff sleeps for d, or until the deadline, Close, Interrupt or a new
// deadline, on the private nap word that kick wakes.
func (w *Waiter) sleepOff(d time.Duration) {
	w.nap.Swap(napping) // before the looks below, as the word is before ready
	defer w.nap.Store(napIdle)
	if w.stopErr() != nil {
		return
	}
	if dl := w.deadline.Load(); dl != 0 {
		if d = min(d, time.Duration(dl)-w.now()); d <= 0 {
			return
		}
	}
	_ = Wait(&w.nap, napping, d)
}

// SetDeadline sets the time after which Wait fails with
// os.ErrDeadlineExceeded instead of waiting; the zero time means none. It
// applies to a pending Wait too: one parked with the old deadline is woken to
// re-read it, as by Close.
func (w *Waiter) SetDeadline(t time.Time) {
	w.SetWaitDeadline(t)
	w.kick()
}

// SetWaitDeadline is SetDeadline for the goroutine that calls Wait, between
// its waits: it wakes no Wait in progress (there is none), so it makes no
// system call. A deadline set this way while another goroutine waits
// applies to that wait only from its next round.
func (w *Waiter) SetWaitDeadline(t time.Time) {
	var dl int64
	if !t.IsZero() {
		dl = max(int64(t.Sub(w.base)), -1)
		if dl == 0 {
			dl = -1
		}
	}
	w.deadline.Store(dl)
}

// Close makes any pending and future Wait fail with ErrClosed, waking a
// parked one. It returns once a Wait asleep in FUTEX_WAIT has left it (see
// kick; at most a second), but does not wait for the Wait to return: callers
// must not unmap the word until it has. Close is idempotent and always
// returns nil.
func (w *Waiter) Close() error {
	if w.closed.CompareAndSwap(false, true) {
		w.kick()
	}
	return nil
}

// Interrupt makes any pending and future Wait fail with err (ErrInterrupted
// if err is nil), waking a parked one: for example when the control plane
// sees the peer die. The first error sticks. A parked Wait is woken as by
// Close.
func (w *Waiter) Interrupt(err error) {
	if err == nil {
		err = ErrInterrupted
	}
	if w.intr.CompareAndSwap(nil, &err) {
		w.kick()
	}
}

// kick wakes a parked or parking Wait after a local state change. The peer
// never touches the word on our behalf here, so we do what Notify does, but
// wake unconditionally: the swap makes a Wait that is about to enter
// FUTEX_WAIT return at once, and the wake reaches one already asleep even if
// a hostile peer reset the word. It wakes every thread asleep on the word,
// not one: the word is shared, and the peer may have queued threads of its
// own on it, ahead of ours. And the peer may set the word back to "parked"
// between our swap and a FUTEX_WAIT that park was about to enter with the
// state it read before ours changed; sleeps tells, and rewake wakes that
// sleep too.
func (w *Waiter) kick() {
	raceFence()
	w.word.Swap(awake)
	_, _ = Wake(w.word, math.MaxInt32)
	if w.nap.Swap(napStopped) == napping {
		_, _ = Wake(&w.nap, 1)
	}
	if s := w.sleeps.Load(); s%2 != 0 {
		w.rewake(s)
	}
}

// maxRewake bounds rewake. A Waiter woken by then has surely left
// FUTEX_WAIT; one still short of it after so long is merely descheduled, and
// the peer would also have to re-arm the word in that very moment.
const maxRewake = time.Second

// rewake wakes the Waiter again and again until the sleep that sleeps showed
// begun (s, odd) is over, or maxRewake has passed: yielding the CPU at first,
// which lets a Waiter that our first wake-up reached run at once, then
// sleeping.
func (w *Waiter) rewake(s uint32) {
	start := time.Now()
	for i := 0; w.sleeps.Load() == s; i++ {
		if i < 100 {
			osYield()
		} else if time.Since(start) < maxRewake {
			time.Sleep(100 * time.Microsecond)
		} else {
			return
		}
		w.word.Swap(awake)
		_, _ = Wake(w.word, math.MaxInt32)
	}
}

// stopErr returns the error Wait must fail with after Close or Interrupt.
func (w *Waiter) stopErr() error {
	if w.closed.Load() {
		return errClosed
	}
	if p := w.intr.Load(); p != nil {
		if w.closed.Load() { // closed after our first look: Close still wins
			return errClosed
		}
		return *p
	}
	return nil
}

// now returns the monotonic time since w.base.
func (w *Waiter) now() time.Duration { return time.Since(w.base) }

// checkDeadline returns os.ErrDeadlineExceeded if the deadline is set and now
// is at or past it.
func (w *Waiter) checkDeadline(now time.Duration) error {
	if dl := w.deadline.Load(); dl != 0 && now >= time.Duration(dl) {
		return os.ErrDeadlineExceeded
	}
	return nil
}
