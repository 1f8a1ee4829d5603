package token

import (
	"sync"
	"sync/atomic"
	"time"
)

// Revocations is the set of revoked token ids. An entry is kept until the
// token would have expired anyway, then Prune drops it. Safe for concurrent
// use.
type Revocations struct {
	mu    sync.RWMutex
	until map[uint64]int64 // token id -> unix nanos after which the entry is useless
	gen   atomic.Uint64    // bumped by every Revoke; lets Allows skip the lock

	wmu      sync.Mutex // held while watchers run
	watchers map[uint64]func(id uint64)
	nextW    uint64
}

// NewRevocations returns an empty set.
func NewRevocations() *Revocations { return &Revocations{until: make(map[uint64]int64)} }

// Revoke refuses token id from now on, until until (pass
// Capability.MintedExpiry). Cached capabilities see it on their next Allows,
// and every Watch function is called with id before Revoke returns (a
// control.Server ends the sessions holding the token).
func (r *Revocations) Revoke(id uint64, until time.Time) {
	r.mu.Lock()
	if old, ok := r.until[id]; !ok || until.UnixNano() > old {
		r.until[id] = until.UnixNano()
	}
	r.mu.Unlock()
	r.gen.Add(1)
	r.wmu.Lock()
	defer r.wmu.Unlock()
	for _, fn := range r.watchers {
		fn(id)
	}
}

// Watch calls fn with the id of every later Revoke, once the id is in the
// set, in the goroutine that called Revoke and before Revoke returns: fn
// must be quick (signal a goroutine) and must not call Revoke, Watch or a
// cancel. After cancel returns fn is not running and is not called again.
// cancel is idempotent.
func (r *Revocations) Watch(fn func(id uint64)) (cancel func()) {
	r.wmu.Lock()
	defer r.wmu.Unlock()
	if r.watchers == nil {
		r.watchers = make(map[uint64]func(uint64))
	}
	r.nextW++
	key := r.nextW
	r.watchers[key] = fn
	return func() {
		r.wmu.Lock()
		defer r.wmu.Unlock()
		delete(r.watchers, key)
	}
}

// Watching is the number of Watch functions registered: with a Server,
// one per live session (a check for leaks).
func (r *Revocations) Watching() int {
	r.wmu.Lock()
	defer r.wmu.Unlock()
	return len(r.watchers)
}

// Contains reports whether id is revoked.
func (r *Revocations) Contains(id uint64) bool {
	r.mu.RLock()
	_, ok := r.until[id]
	r.mu.RUnlock()
	return ok
}

// Prune drops entries whose tokens have expired by now and returns how many
// it dropped.
func (r *Revocations) Prune(now time.Time) int {
	n := now.UnixNano()
	r.mu.Lock()
	defer r.mu.Unlock()
	dropped := 0
	for id, until := range r.until {
		if until <= n {
			delete(r.until, id)
			dropped++
		}
	}
	return dropped
}

// Len is the number of entries held.
func (r *Revocations) Len() int {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return len(r.until)
}

func (r *Revocations) generation() uint64 { return r.gen.Load() }
