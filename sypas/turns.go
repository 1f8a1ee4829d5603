package sypas

import (
	"runtime"
	"sync/atomic"
)

// turns is how the senders of one transport take turns at its single
// writer (a ring's producer, a socket's buffer) and publish what they
// wrote once per burst.
//
// The lock is a one-slot channel rather than a mutex so that a sender
// waiting for its turn still honours its context (the transport's queue
// waits on it with ctx). A sender that sees another waiting for the lock
// leaves the publishing to it, so callers arriving together share one
// publication (on a ring, one index store and at most one FUTEX_WAKE);
// hold leaves it to flush, for a reader answering a burst.
type turns struct {
	lock    chan struct{}
	waiting atomic.Int32 // senders queued for the lock
	dirty   atomic.Bool  // written, not published; set under lock
	held    atomic.Bool  // hold: publishing is flush's

	publish func() error      // publishes what is written; under lock
	ended   func(error) error // the error of a failed publish, as callers see it
}

func (t *turns) init(publish func() error, ended func(error) error) {
	t.lock, t.publish, t.ended = make(chan struct{}, 1), publish, ended
}

// tryLock takes the lock if it is free.
func (t *turns) tryLock() bool {
	select {
	case t.lock <- struct{}{}:
		return true
	default:
		return false
	}
}

// unlock publishes what is written unless another sender waits for the
// lock (it will) or a holder holds, then releases the lock. A waiter that
// gives up after we looked (leave) finds the lock free and settles in our
// place.
func (t *turns) unlock(err error) error {
	for {
		if t.dirty.Load() && t.waiting.Load() == 0 && !t.held.Load() {
			t.dirty.Store(false)
			if perr := t.publish(); err == nil && perr != nil {
				err = &writtenErr{t.ended(perr)} // our frame went out with the others
			}
		}
		<-t.lock
		if t.waiting.Load() != 0 {
			// The lock went to a waiting sender, made runnable next on
			// our P: let it run now, rather than behind whatever we do
			// next (a caller that goes on to read replies spins there),
			// while every other sender waits for it.
			runtime.Gosched()
			return err
		}
		if !t.dirty.Load() || t.held.Load() {
			return err
		}
		if !t.tryLock() {
			return err // another sender holds the lock: it settles
		}
		// a waiter left after we looked: settle again
	}
}

// leave is a waiting sender giving up: if the holder left the publishing
// to it, it takes the lock (when free) and settles.
func (t *turns) leave() {
	t.waiting.Add(-1)
	if t.tryLock() {
		t.unlock(nil)
	}
}

func (t *turns) hold() { t.held.Store(true) }

// flush ends hold. If another sender holds the lock, it publishes as it
// leaves (unlock looks at held after letting the lock go).
func (t *turns) flush() {
	// A read-modify-write, not a store: it is ordered before our look at
	// the lock on every architecture (and under the race detector), so a
	// holder we find there sees held false when it leaves.
	t.held.Swap(false)
	if t.tryLock() {
		t.unlock(nil) // a failed publish: the session is ending, the reader sees it
	}
}
