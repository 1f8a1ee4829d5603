package bulk

import "sync/atomic"

// The free lists of the buddy allocator: one lock-free stack per order,
// private to the sender's process (nothing here lives in shared memory, so
// the peer can corrupt payload bytes but never the allocator).
//
// Ownership: a block on a list belongs to the list; pop hands it, and the
// block's next link, to the caller alone; push hands them back. A block's
// link is written only by the goroutine pushing it. A popper may read the
// link of a block another goroutine popped and reused meanwhile: the head's
// tag, bumped by every push and pop, makes its compare-and-swap fail then
// (no ABA).

// freeList is a Treiber stack of block indices. head is tag<<32 | index+1
// of the top block (0: empty). Padded to its own 128 bytes: the lists of
// different orders are used by different senders at once.
type freeList struct {
	head atomic.Uint64
	_    [120]byte
}

// maxOrders bounds the orders a region can have: MaxSize / MinBlockSize
// blocks, 2^18, are orders 0..18.
const maxOrders = 19

// push puts block idx, of order o, on its free list.
func (r *Region) push(idx, o int) {
	l := &r.lists[o]
	for {
		h := l.head.Load()
		r.next[idx].Store(uint32(h))
		if l.head.CompareAndSwap(h, (h>>32+1)<<32|uint64(idx+1)) {
			r.freeBlocks.Add(1 << o)
			return
		}
	}
}

// pop takes a block of order o from its free list, or returns -1.
func (r *Region) pop(o int) int {
	l := &r.lists[o]
	for {
		h := l.head.Load()
		top := uint32(h)
		if top == 0 {
			return -1
		}
		nx := r.next[top-1].Load()
		if l.head.CompareAndSwap(h, (h>>32+1)<<32|uint64(nx)) {
			r.freeBlocks.Add(-1 << o)
			return int(top - 1)
		}
	}
}

// takeLocked finds a block of order o on the slow path, r.mu held: a
// larger free block split in halves (the halves it does not keep go back
// to the lists), or, if merge is set and the free blocks add up to enough,
// the same after merging free buddies. It returns -1 when no block of
// order o is free.
func (r *Region) takeLocked(o int, merge bool) int {
	if idx := r.split(o); idx >= 0 {
		return idx
	}
	if !merge || r.freeBlocks.Load() < 1<<o {
		return -1 // merging cannot help
	}
	r.coalesce()
	return r.split(o)
}

// split pops the smallest free block of order ≥ o and halves it down to
// order o, pushing the upper halves.
func (r *Region) split(o int) int {
	for k := o; k <= r.maxOrder; k++ {
		idx := r.pop(k)
		if idx < 0 {
			continue
		}
		for j := k - 1; j >= o; j-- {
			r.push(idx+1<<j, j)
		}
		return idx
	}
	return -1
}

// coalesce merges free buddies, r.mu held. Frees never merge (a free is a
// push, so that it stays lock-free); the merging is done here, only when an
// allocation finds no block large enough: it drains every list into
// r.order (the order of the free block starting at each index, -1 for
// none), merges pairs bottom-up, and pushes the result back. O(blocks):
// 1024 for a default region, 2^18 at most. Blocks popped or pushed by
// other goroutines meanwhile are simply not merged this time.
func (r *Region) coalesce() {
	ord := r.order
	for i := range ord {
		ord[i] = -1
	}
	for o := 0; o <= r.maxOrder; o++ {
		// Bounded: each pop takes a distinct block, and at most r.nblocks
		// blocks exist; concurrent frees can only add blocks that were in use.
		for idx := r.pop(o); idx >= 0; idx = r.pop(o) {
			ord[idx] = int8(o)
		}
	}
	for o := 0; o < r.maxOrder; o++ {
		for idx := 0; idx < r.nblocks; idx += 2 << o {
			if ord[idx] == int8(o) && ord[idx+1<<o] == int8(o) {
				ord[idx], ord[idx+1<<o] = int8(o+1), -1
			}
		}
	}
	for idx, o := range ord {
		if o >= 0 {
			r.push(idx, int(o))
		}
	}
	r.mergedAt = r.epoch
	r.coalesces.Add(1)
}
