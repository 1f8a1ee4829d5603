package futex

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/sypas/go/internal/shm"
)

// stops are the ways to end a parked Wait from another goroutine, and what
// it then returns.
var stops = []struct {
	name string
	do   func(w *Waiter)
	want error
}{
	{"close", func(w *Waiter) { w.Close() }, ErrClosed},
	{"interrupt", func(w *Waiter) { w.Interrupt(nil) }, ErrInterrupted},
	{"deadline", func(w *Waiter) { w.SetDeadline(time.Now()) }, os.ErrDeadlineExceeded},
}

// TestWaiterCloseWakesPastPeerSleepers: the sleep word is shared, so a
// hostile peer can queue threads of its own in FUTEX_WAIT on it, ahead of
// our parked Waiter. A wake-up for one would then wake the peer's thread, and
// Close, Interrupt and SetDeadline would leave the Waiter asleep for good.
func TestWaiterCloseWakesPastPeerSleepers(t *testing.T) {
	for _, stop := range stops {
		t.Run(stop.name, func(t *testing.T) {
			region, err := shm.Create("futex-hostile", os.Getpagesize())
			require.NoError(t, err)
			defer region.Close()
			word := wordAt(region.Bytes(), 0)
			defer func() { word.Store(awake); _, _ = Wake(word, 1<<30) }() // frees any sleeper left

			// The peer's thread sleeps first, on "parked", as the peer may.
			word.Store(parked)
			peer := make(chan struct{})
			go func() {
				runtime.LockOSThread()
				defer runtime.UnlockOSThread()
				_ = Wait(word, parked, -1)
				close(peer)
			}()
			waitSleepers(t, word, 1)

			w := NewWaiter(word, Config{Policy: PolicyPark})
			done := waitAsync(w, never)
			waitSleepers(t, word, 2)
			stop.do(w)
			assert.ErrorIs(t, result(t, done, 10*time.Second), stop.want)
		})
	}
}

// waitSleepers waits until n threads of this process sleep in FUTEX_WAIT on
// word (/proc/self/task/*/syscall shows the system call and its address).
func waitSleepers(t *testing.T, word *atomic.Uint32, n int) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		if sleepersOn(word) >= n {
			return
		}
	}
	t.Fatalf("%d threads asleep on %p after 10 s, want %d", sleepersOn(word), word, n)
}

func sleepersOn(word *atomic.Uint32) int {
	want := fmt.Sprintf("%d %p ", unix.SYS_FUTEX, word)
	tasks, _ := filepath.Glob("/proc/self/task/*/syscall")
	n := 0
	for _, f := range tasks {
		if b, err := os.ReadFile(f); err == nil && strings.HasPrefix(string(b), want) {
			n++
		}
	}
	return n
}

// TestWaiterCloseWakesPastPeerRearm: a hostile peer can set the sleep word
// back to "parked" between the wake-up of Close, Interrupt or SetDeadline
// and the FUTEX_WAIT that the Waiter was about to enter with the state it
// read before: that FUTEX_WAIT must not sleep for good. The test holds the
// Waiter right before FUTEX_WAIT (beforeSleep) while the state changes and
// the peer re-arms the word.
func TestWaiterCloseWakesPastPeerRearm(t *testing.T) {
	for _, stop := range stops {
		t.Run(stop.name, func(t *testing.T) {
			var word atomic.Uint32
			var hostile atomic.Bool
			defer func() { hostile.Store(false); word.Store(awake); _, _ = Wake(&word, 1<<30) }()
			held, release := make(chan struct{}), make(chan struct{})
			var once atomic.Bool
			beforeSleep = func() {
				if once.CompareAndSwap(false, true) {
					close(held)
					<-release
				}
				for hostile.Load() {
					if word.Load() == awake {
						word.Store(parked) // the peer, right after the wake-up
						break
					}
				}
			}
			defer func() { beforeSleep = nil }()

			w := NewWaiter(&word, Config{Policy: PolicyPark})
			done := waitAsync(w, never)
			<-held // the Waiter read the state and is about to sleep
			hostile.Store(true)
			go stop.do(w) // with the fix, returns once the Waiter is awake
			for word.Load() != awake {
				runtime.Gosched() // until the wake-up's swap
			}
			close(release)
			assert.ErrorIs(t, result(t, done, 10*time.Second), stop.want)
		})
	}
}
