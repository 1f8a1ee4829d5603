package futex

import (
	"errors"
	"math/rand/v2"
	"os"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/internal/affinity"
)

var policies = []struct {
	name string
	cfg  Config
}{
	{"auto", Config{}},
	{"spin", Config{Policy: PolicySpin}},
	{"park", Config{Policy: PolicyPark}},
	{"auto-no-spin", Config{Spin: Off}},
	{"auto-no-spin-no-yield", Config{Spin: Off, Yield: Off}},
}

func never() bool { return false }

// waitAsync runs w.Wait(ready) in a goroutine and returns its result channel.
func waitAsync(w *Waiter, ready func() bool) <-chan error {
	done := make(chan error, 1)
	go func() { done <- w.Wait(ready) }()
	return done
}

// result waits for a Wait started by waitAsync, failing the test if it takes
// longer than limit.
func result(t *testing.T, done <-chan error, limit time.Duration) error {
	t.Helper()
	select {
	case err := <-done:
		return err
	case <-time.After(limit):
		t.Fatalf("Wait did not return within %v", limit)
		return nil
	}
}

// settle gives a goroutine started by waitAsync time to reach its idle phase;
// for parking policies it waits until the sleep word says so.
func settle(w *Waiter, word *atomic.Uint32) {
	if w.cfg.Policy == PolicySpin {
		time.Sleep(5 * time.Millisecond)
		return
	}
	for start := time.Now(); word.Load() != parked && time.Since(start) < time.Second; {
		time.Sleep(100 * time.Microsecond)
	}
	time.Sleep(time.Millisecond) // from "about to park" to asleep in the kernel
}

func TestWaiterReadyAtOnce(t *testing.T) {
	for _, p := range policies {
		var word atomic.Uint32
		w := NewWaiter(&word, p.cfg)
		w.SetDeadline(time.Now().Add(-time.Hour))
		assert.NoError(t, w.Wait(func() bool { return true }), "%s: a ready condition wins over a passed deadline", p.name)
		assert.EqualValues(t, awake, word.Load(), p.name)
	}
}

func TestWaiterNotify(t *testing.T) {
	// Delays land the Notify in each phase: spin, yield, park.
	delays := []time.Duration{0, 5 * time.Microsecond, 30 * time.Microsecond, 2 * time.Millisecond}
	for _, p := range policies {
		t.Run(p.name, func(t *testing.T) {
			for _, d := range delays {
				var word atomic.Uint32
				var data atomic.Bool
				w := NewWaiter(&word, p.cfg)
				w.SetDeadline(time.Now().Add(10 * time.Second))
				go func() {
					for start := time.Now(); time.Since(start) < d; {
						cpuRelax()
					}
					data.Store(true)
					Notify(&word)
				}()
				assert.NoError(t, w.Wait(data.Load), "delay %v", d)
				assert.True(t, data.Load())
			}
		})
	}
}

func TestWaiterDeadlinePassed(t *testing.T) {
	for _, p := range policies {
		var word atomic.Uint32
		w := NewWaiter(&word, p.cfg)
		w.SetDeadline(time.Now().Add(-time.Millisecond))
		start := time.Now()
		err := w.Wait(never)
		assert.ErrorIs(t, err, os.ErrDeadlineExceeded, p.name)
		assert.True(t, os.IsTimeout(err), p.name)
		assert.Less(t, time.Since(start), 500*time.Millisecond, "%s: must fail at once", p.name)
	}
}

func TestWaiterDeadlineExpires(t *testing.T) {
	const d = 30 * time.Millisecond
	for _, p := range policies {
		var word atomic.Uint32
		w := NewWaiter(&word, p.cfg)
		start := time.Now()
		w.SetDeadline(start.Add(d))
		assert.ErrorIs(t, w.Wait(never), os.ErrDeadlineExceeded, p.name)
		elapsed := time.Since(start)
		assert.GreaterOrEqual(t, elapsed, d, p.name)
		assert.Less(t, elapsed, d+time.Second, p.name)
		assert.EqualValues(t, awake, word.Load(), "%s: the sleep word is cleared on return", p.name)

		w.SetDeadline(time.Time{})
		data := atomic.Bool{}
		data.Store(true)
		assert.NoError(t, w.Wait(data.Load), "%s: a zero deadline clears it", p.name)
	}
}

func TestWaiterSetDeadlineWakesParked(t *testing.T) {
	for _, p := range policies {
		t.Run(p.name, func(t *testing.T) {
			var word atomic.Uint32
			w := NewWaiter(&word, p.cfg)
			done := waitAsync(w, never)
			settle(w, &word)
			start := time.Now()
			w.SetDeadline(start.Add(10 * time.Millisecond))
			assert.ErrorIs(t, result(t, done, 5*time.Second), os.ErrDeadlineExceeded)
			assert.GreaterOrEqual(t, time.Since(start), 10*time.Millisecond)

			// Moving the deadline later while parked is honoured too.
			start = time.Now()
			w.SetDeadline(start.Add(20 * time.Millisecond))
			done = waitAsync(w, never)
			settle(w, &word)
			w.SetDeadline(start.Add(150 * time.Millisecond))
			assert.ErrorIs(t, result(t, done, 5*time.Second), os.ErrDeadlineExceeded)
			assert.GreaterOrEqual(t, time.Since(start), 150*time.Millisecond, "the extended deadline was re-read")
		})
	}
}

func TestWaiterCloseWakesParked(t *testing.T) {
	for _, p := range policies {
		t.Run(p.name, func(t *testing.T) {
			var word atomic.Uint32
			w := NewWaiter(&word, p.cfg)
			done := waitAsync(w, never)
			settle(w, &word)
			require.NoError(t, w.Close())
			err := result(t, done, 5*time.Second)
			assert.ErrorIs(t, err, ErrClosed)
			assert.ErrorIs(t, err, os.ErrClosed)
			assert.NoError(t, w.Close(), "Close is idempotent")
			assert.ErrorIs(t, w.Wait(func() bool { return true }), ErrClosed, "a closed Waiter fails even when ready")
		})
	}
}

func TestWaiterInterrupt(t *testing.T) {
	errPeerDied := errors.New("peer died")
	for _, p := range policies {
		t.Run(p.name, func(t *testing.T) {
			var word atomic.Uint32
			w := NewWaiter(&word, p.cfg)
			done := waitAsync(w, never)
			settle(w, &word)
			w.Interrupt(errPeerDied)
			assert.ErrorIs(t, result(t, done, 5*time.Second), errPeerDied)

			w.Interrupt(errors.New("second"))
			assert.ErrorIs(t, w.Wait(never), errPeerDied, "the first error sticks")
			require.NoError(t, w.Close())
			assert.ErrorIs(t, w.Wait(never), ErrClosed, "Close takes precedence")
		})
	}
	var word atomic.Uint32
	w := NewWaiter(&word, Config{})
	w.Interrupt(nil)
	assert.ErrorIs(t, w.Wait(never), ErrInterrupted)
}

// TestWaiterHostilePeer has a "peer" scribble on the sleep word while a
// Waiter waits: the Waiter must neither panic nor hang past its deadline, and
// Close must still wake it.
func TestWaiterHostilePeer(t *testing.T) {
	for _, p := range policies {
		t.Run(p.name, func(t *testing.T) {
			var word atomic.Uint32
			var stop atomic.Bool
			defer stop.Store(true)
			go func() {
				r := rand.New(rand.NewPCG(1, 2))
				for !stop.Load() {
					switch r.IntN(4) {
					case 0:
						word.Store(parked) // "parked", and nobody will wake us
					case 1:
						word.Store(r.Uint32())
					case 2:
						word.Store(awake)
					case 3:
						time.Sleep(50 * time.Microsecond)
					}
				}
			}()
			w := NewWaiter(&word, p.cfg)
			start := time.Now()
			w.SetDeadline(start.Add(50 * time.Millisecond))
			assert.ErrorIs(t, w.Wait(never), os.ErrDeadlineExceeded)
			assert.Less(t, time.Since(start), time.Second, "bounded by the deadline")

			w.SetDeadline(time.Time{})
			done := waitAsync(w, never)
			time.Sleep(20 * time.Millisecond)
			require.NoError(t, w.Close())
			assert.ErrorIs(t, result(t, done, 5*time.Second), ErrClosed)
		})
	}
}

// TestWaiterPingPong hands a counter back and forth between two goroutines,
// each parking on its own sleep word, with random pacing.
func TestWaiterPingPong(t *testing.T) {
	n := 2000
	if testing.Short() {
		n = 200
	}
	for _, p := range policies {
		t.Run(p.name, func(t *testing.T) {
			var ping, pong, pingWord, pongWord atomic.Uint32
			a := NewWaiter(&pongWord, p.cfg) // waits for pong
			b := NewWaiter(&pingWord, p.cfg) // waits for ping
			watchdog := time.AfterFunc(20*time.Second, func() {
				a.Interrupt(errors.New("watchdog: lost wake-up in ping-pong"))
				b.Interrupt(errors.New("watchdog: lost wake-up in ping-pong"))
			})
			defer watchdog.Stop()

			errc := make(chan error, 1)
			go func() {
				r := rand.New(rand.NewPCG(3, 4))
				for i := uint32(1); i <= uint32(n); i++ {
					if err := b.Wait(func() bool { return ping.Load() >= i }); err != nil {
						errc <- err
						return
					}
					pace(r)
					pong.Store(i)
					Notify(&pongWord)
				}
				errc <- nil
			}()
			r := rand.New(rand.NewPCG(5, 6))
			for i := uint32(1); i <= uint32(n); i++ {
				ping.Store(i)
				Notify(&pingWord)
				require.NoError(t, a.Wait(func() bool { return pong.Load() >= i }), "hand-off %d", i)
				pace(r)
			}
			assert.NoError(t, <-errc)
			assert.EqualValues(t, n, pong.Load())
		})
	}
}

// pace delays a little, at random: usually not at all, sometimes a spin or a
// yield, rarely a sleep, so that hand-offs land in every phase of the peer.
func pace(r *rand.Rand) {
	switch x := r.IntN(100); {
	case x < 60:
	case x < 85:
		for range r.IntN(2000) {
			cpuRelax()
		}
	case x < 99:
		osYield()
	default:
		time.Sleep(time.Duration(r.IntN(100)) * time.Microsecond)
	}
}

// TestWaiterAdaptiveBudget checks that PolicyAuto shrinks its busy budgets
// when busy-waiting does not pay off and restores them when it does.
func TestWaiterAdaptiveBudget(t *testing.T) {
	var word atomic.Uint32
	var data atomic.Uint32
	w := NewWaiter(&word, Config{})
	w.SetDeadline(time.Now().Add(time.Minute))

	for i := uint32(1); i <= maxBackoff+2; i++ {
		go func() {
			time.Sleep(3 * time.Millisecond) // far beyond the busy budgets
			data.Store(i)
			Notify(&word)
		}()
		require.NoError(t, w.Wait(func() bool { return data.Load() >= i }))
	}
	assert.EqualValues(t, maxBackoff, w.backoff.Load(), "waits that ended parked shrink the budget")
	assert.Equal(t, Config{}.Resolved(), w.Config(), "the configured budgets are unchanged")

	var polls atomic.Int32
	quick := func() bool { return polls.Add(1)%4 == 0 } // ready after a few polls
	for range maxBackoff + 2 {
		require.NoError(t, w.Wait(quick))
	}
	assert.EqualValues(t, 0, w.backoff.Load(), "waits that busy-waiting satisfied restore it")

	p := NewWaiter(&word, Config{Policy: PolicyPark})
	data.Store(0)
	go func() { time.Sleep(time.Millisecond); data.Store(1); Notify(&word) }()
	require.NoError(t, p.Wait(func() bool { return data.Load() == 1 }))
	assert.EqualValues(t, 0, p.backoff.Load(), "PolicyPark has no budget to adapt")
}

func TestWaiterSpinPolicyDoesNotAdapt(t *testing.T) {
	var word, data atomic.Uint32
	w := NewWaiter(&word, Config{Policy: PolicySpin})
	go func() { time.Sleep(2 * time.Millisecond); data.Store(1) }() // no Notify: Spin never parks
	require.NoError(t, w.Wait(func() bool { return data.Load() == 1 }))
	assert.EqualValues(t, 0, w.backoff.Load())
}

// TestWaiterProgressIsNotThrottled: a peer that makes progress in small
// steps, waking the parked Waiter for each, is never throttled when ready
// reports the progress; the same wake-ups unreported are, after a few.
func TestWaiterProgressIsNotThrottled(t *testing.T) {
	for _, report := range []bool{true, false} {
		var word, data atomic.Uint32
		w := NewWaiter(&word, Config{Policy: PolicyPark})
		w.SetDeadline(time.Now().Add(time.Minute))
		const steps = 200
		go func() {
			for i := uint32(1); i <= steps; i++ {
				for word.Load() != parked { // each step wakes a parked Waiter
					runtime.Gosched()
				}
				data.Store(i)
				Notify(&word)
			}
		}()
		var last uint32
		require.NoError(t, w.Wait(func() bool {
			v := data.Load()
			if v != last && report {
				w.Progress()
			}
			last = v
			return v >= steps
		}))
		if report {
			assert.Zero(t, w.Throttled(), "progress reported: no wake-up is slept off")
		} else {
			assert.NotZero(t, w.Throttled(), "progress not reported: the wake-ups look idle")
		}
	}
}

// TestWaiterYieldsToPeerOnSharedCPU: two goroutines hand a counter back and
// forth on threads pinned to one CPU, as two processes come to share a core
// on a busy machine. There the peer can answer only once the waiter gives
// the CPU up, so every poll before that delays the answer: PolicyAuto must
// learn to yield at once. After a warm-up, many Waits (nearly all on an idle
// machine) poll their condition at most 4 times; before the bursts,
// quickPoll alone made 64 polls, and 0 to 8 of 2000 waits did. When a yield
// judged by its length whether it had run the peer, about one run in ten
// on an idle machine never converged (0 of 2000), and under load most did
// not. A third thread that takes the CPU for a tick (hogYield) makes the
// waiters park at once for a while, which polls as little.
func TestWaiterYieldsToPeerOnSharedCPU(t *testing.T) {
	if runtime.NumCPU() < 2 {
		t.Skip("no spinning with one CPU")
	}
	var ping, pong, pingWord, pongWord atomic.Uint32
	a := NewWaiter(&pongWord, Config{}) // waits for pong
	b := NewWaiter(&pingWord, Config{}) // waits for ping
	const n, warm = 3000, 1000
	errc := make(chan error, 1)
	go func() {
		defer affinity.Pin(0)()
		var i uint32
		pinged := func() bool { return ping.Load() >= i }
		for i = 1; i <= n; i++ {
			if err := b.Wait(pinged); err != nil {
				errc <- err
				return
			}
			pong.Store(i)
			Notify(&pongWord)
		}
		errc <- nil
	}()
	defer affinity.Pin(0)()
	var i uint32
	polls := 0
	ponged := func() bool { polls++; return pong.Load() >= i }
	few := 0 // waits after the warm-up that polled at most 4 times
	for i = 1; i <= n; i++ {
		ping.Store(i)
		Notify(&pingWord)
		polls = 0
		require.NoError(t, a.Wait(ponged))
		if i > warm && polls <= 4 {
			few++
		}
	}
	require.NoError(t, <-errc)
	t.Logf("%d of %d waits polled at most 4 times", few, n-warm)
	assert.Greater(t, few, (n-warm)/4, "the waiter yields to the peer that shares its CPU instead of spinning")
}

// TestWaiterParksRatherThanYieldToAHog: a thread that never hands the CPU
// back (a busy process on our CPU) keeps it for the rest of its time slice,
// milliseconds, each time we sched_yield to it, while the peer we wait for
// may well run on the other CPU. So a PolicyAuto Waiter whose yield ran such
// a thread must park, where the peer's wake-up preempts the hog, rather than
// yield to it again and again for its whole budget. Budgets of a minute make
// the difference plain; the bound is 10 s.
func TestWaiterParksRatherThanYieldToAHog(t *testing.T) {
	if runtime.NumCPU() < 2 {
		t.Skip("no spinning with one CPU")
	}
	var stop atomic.Bool
	hogging := make(chan struct{})
	go func() {
		defer affinity.Pin(0)()
		close(hogging)
		for !stop.Load() {
		}
	}()
	defer stop.Store(true)
	<-hogging

	var word atomic.Uint32
	w := NewWaiter(&word, Config{Spin: time.Minute, Yield: time.Minute})
	done := make(chan error, 1)
	go func() {
		defer affinity.Pin(0)()
		done <- w.Wait(never)
	}()
	start := time.Now()
	for word.Load() != parked && time.Since(start) < 10*time.Second {
		time.Sleep(time.Millisecond)
	}
	assert.EqualValues(t, parked, word.Load(), "parked rather than yield to a hog for a minute")
	t.Logf("parked after %v", time.Since(start))
	require.NoError(t, w.Close())
	assert.ErrorIs(t, <-done, ErrClosed)
}
