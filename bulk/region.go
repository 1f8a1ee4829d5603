package bulk

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"os"
	"sync"
	"sync/atomic"

	"github.com/sypas/go/frame"
	"github.com/sypas/go/internal/shm"
	"github.com/sypas/go/wire"
)

// castagnoli is the CRC32C table of the descriptor's optional checksum
// (docs/PROTOCOL.md §1); crc32 computes it with the CPU's instruction.
var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// States of a span, kept in the state word of its first block.
const (
	stFree = 0 // not a span (a free block, or the inside of another)
	stHeld = 1 // allocated, held by this process: being filled
	stSent = 2 // its descriptor was sent: the peer holds it until its ACK
	// stSending: Send is recording the length sent, between held and
	// sent; no other transition starts from it.
	stSending = 3
)

// A span's state word (Region.state, its first block's): gen<<32 |
// state<<8 | order.
func packState(gen uint32, st uint64, o int) uint64 { return uint64(gen)<<32 | st<<8 | uint64(o) }
func stateGen(w uint64) uint32                      { return uint32(w >> 32) }
func stateSt(w uint64) uint64                       { return (w >> 8) & 0xff }
func stateOrder(w uint64) int                       { return int(w & 0xff) }
func withState(w, st uint64) uint64                 { return w&^(0xff<<8) | st<<8 }

// Region is a bulk region its owner, the sender, allocates spans from: a
// sealed memfd the peer maps with OpenRegion, and a buddy allocator over it
// whose every table lives in this process's private memory. The peer can
// write any byte of the region (the memfd is shared read-write) but can
// change nothing about which span is free: the worst it can do is spoil
// the payloads it is sent.
//
// A span goes through three hands: Alloc gives it to the caller to fill
// (Span.Bytes); Send marks it sent and returns its descriptor, after which
// the peer owns it; Ack, given the peer's acknowledgement, or ReleaseAll, at
// the end of the session, returns it to the allocator. Free returns a span
// that was never sent, Unsend one whose descriptor could not be sent.
//
// All methods may be called concurrently, Close included. Close ends
// waiting Allocs with ErrClosed and releases the shared memory without
// unmapping an address a goroutine may still touch (see Close).
type Region struct {
	shm      *shm.Region
	mem      []byte // the mapping; never reassigned; touched only while not closed
	id       uint32
	size     int
	shift    uint // log2 of the block size
	nblocks  int
	maxOrder int    // log2(nblocks): the order of the whole region
	salt     uint64 // XORed into leases, so another region's leases do not decode

	lists [maxOrders]freeList
	next  []atomic.Uint32 // per block: the link of a free block (index+1, 0 = none)
	state []atomic.Uint64 // per block: gen<<32 | state<<8 | order, for the first block of a span
	sent  []atomic.Uint64 // per block: the length sent, for the first block of a sent span

	freeBlocks atomic.Int64 // blocks on the free lists
	spans      atomic.Int64 // spans held or sent
	waiters    atomic.Int32 // Allocs registered to be woken by a release

	mu       sync.Mutex    // the slow path: splitting, merging, waiting
	wake     chan struct{} // closed by a release to wake the waiters; nil when none wait
	epoch    uint64        // under mu: releases made while Allocs waited
	mergedAt uint64        // under mu: epoch of the last merge
	order    []int8        // coalesce's scratch table, one entry per block

	closed atomic.Bool
	done   chan struct{} // closed by Close

	acks, refused, released, waits, full, coalesces atomic.Uint64
}

// CreateRegion makes a sealed memfd of cfg.Size bytes, maps it and sets
// up the allocator over it, every span free. The peer gets File and maps
// it with OpenRegion(f, cfg.ID, cfg.Size).
//
// The memfd's pages are not touched here: the kernel provides them as
// spans are first written, so a large, little used region costs little.
func CreateRegion(cfg Config) (*Region, error) {
	cfg, err := cfg.normalize()
	if err != nil {
		return nil, err
	}
	var salt [8]byte
	_, _ = rand.Read(salt[:]) // never fails (crypto/rand panics rather)
	m, err := shm.Create(cfg.Name, cfg.Size)
	if err != nil {
		return nil, fmt.Errorf("bulk: %w", err)
	}
	nblocks := cfg.Size / cfg.BlockSize
	r := &Region{
		shm:      m,
		mem:      m.Bytes(),
		id:       cfg.ID,
		size:     cfg.Size,
		shift:    uint(log2(cfg.BlockSize)),
		nblocks:  nblocks,
		maxOrder: log2(nblocks),
		salt:     binary.LittleEndian.Uint64(salt[:]),
		next:     make([]atomic.Uint32, nblocks),
		state:    make([]atomic.Uint64, nblocks),
		sent:     make([]atomic.Uint64, nblocks),
		order:    make([]int8, nblocks),
		done:     make(chan struct{}),
	}
	r.push(0, r.maxOrder)
	return r, nil
}

// ID is the region id descriptors carry.
func (r *Region) ID() uint32 { return r.id }

// Size is the region's size in bytes, the largest span.
func (r *Region) Size() int { return r.size }

// BlockSize is the smallest span: every span's capacity is BlockSize times
// a power of two.
func (r *Region) BlockSize() int { return 1 << r.shift }

// File is the memfd, still owned by the region, to pass to the peer
// (SCM_RIGHTS with REGIONS role BULK, or exec.Cmd.ExtraFiles).
func (r *Region) File() *os.File { return r.shm.File() }

// Bytes is the whole mapping, nil after Close.
func (r *Region) Bytes() []byte { return r.shm.Bytes() }

// Span is a part of a Region held by this process: allocated, being filled,
// or sent and not yet acknowledged. It is a small value; copies name the
// same span. The zero Span holds nothing.
type Span struct {
	r     *Region
	off   uint64
	n     int
	idx   int32
	order int32
	lease uint64
}

// Bytes is the span's memory in the region, to fill in place: exactly Len
// bytes, capped so that append cannot run into the next span. It is nil
// after the region is closed. A slice taken before Close stays safe to
// touch while the Span (or the Region) is reachable, but is then private
// memory nobody reads (keep the Span alive, or runtime.KeepAlive it, as
// long as the slice is used).
//
// Write it before Send: once the descriptor is out the peer may be reading
// it, and after the peer's ACK the span may already be another caller's.
func (s Span) Bytes() []byte {
	if s.r == nil || s.r.closed.Load() {
		return nil
	}
	end := s.off + uint64(s.n)
	return s.r.mem[s.off:end:end]
}

// Len is the span's length: what Alloc was asked for, or what Trim left.
func (s Span) Len() int { return s.n }

// Cap is the size of the block the span occupies: Len rounded up to the
// region's BlockSize times a power of two. Trim may lengthen a span up to it.
func (s Span) Cap() int {
	if s.r == nil {
		return 0
	}
	return 1 << (uint(s.order) + s.r.shift)
}

// Offset is the span's byte offset in its region.
func (s Span) Offset() uint64 { return s.off }

// Lease is the span's handle, echoed by the peer's acknowledgement.
func (s Span) Lease() uint64 { return s.lease }

// Trim returns the span with length n, for a payload whose size was known
// only once written (a file read straight into a span allocated for its
// largest size). Like a slice expression, it panics unless 1 ≤ n ≤ Cap.
func (s Span) Trim(n int) Span {
	if n < 1 || n > s.Cap() {
		panic(fmt.Sprintf("bulk: Trim(%d) of a span of capacity %d", n, s.Cap()))
	}
	s.n = n
	return s
}

// lease packs a span's handle: its generation, first block and order,
// XORed with the region's salt. The generation changes each time the block
// is allocated, so a stale lease (a late or repeated ACK) does not match.
func (r *Region) lease(gen uint32, idx, o int) uint64 {
	return (uint64(gen)<<32 | uint64(idx)<<6 | uint64(o)) ^ r.salt
}

// unlease unpacks a lease the peer sent, or reports that no span of this
// region could have it.
func (r *Region) unlease(l uint64) (gen uint32, idx, o int, ok bool) {
	x := l ^ r.salt
	gen, idx, o = uint32(x>>32), int(uint32(x)>>6), int(x&63)
	ok = o <= r.maxOrder && idx < r.nblocks && idx&(1<<o-1) == 0
	return gen, idx, o, ok
}

// orderOf is the order of the block a span of n bytes takes.
func (r *Region) orderOf(n int) (int, error) {
	switch {
	case n < 1:
		return 0, fmt.Errorf("%w: span of %d bytes", ErrInvalid, n)
	case n > r.size:
		return 0, fmt.Errorf("%w: %d bytes, region %d", ErrTooLarge, n, r.size)
	}
	blocks := (n + 1<<r.shift - 1) >> r.shift
	return log2(nextPow2(blocks)), nil
}

func nextPow2(n int) int {
	p := 1
	for p < n {
		p <<= 1
	}
	return p
}

// Alloc allocates a span of n bytes (1 ≤ n ≤ Size) for the caller to fill.
// Spans are blocks of BlockSize times a power of two, so a span takes less
// than twice its length (see Cap).
//
// When no block is free Alloc waits for a release (an Ack, a Free,
// ReleaseAll) until ctx ends, then fails with an error matching ErrFull
// (and wire.ErrResource, and ctx's error); a ctx already done means no
// waiting, not no allocation. It fails with ErrTooLarge if n is above Size,
// with ErrClosed once the region is closed. Waiters are not served in
// order: a large Alloc may wait while smaller ones succeed.
//
// Alloc takes no lock and allocates nothing while a block of the span's
// size is free (a compare-and-swap on the free list of its size).
func (r *Region) Alloc(ctx context.Context, n int) (Span, error) {
	return r.alloc(ctx, n)
}

// TryAlloc is Alloc that never waits: it takes a free span (splitting or
// merging blocks as Alloc does) or fails at once with an error matching
// ErrFull, which it does not count in Stats.Full: a caller that goes on to
// wait with Alloc, as one that needs a timer only when the region is full
// does, is counted there.
func (r *Region) TryAlloc(n int) (Span, error) {
	return r.alloc(nil, n)
}

// alloc is Alloc, or TryAlloc for a nil ctx.
func (r *Region) alloc(ctx context.Context, n int) (Span, error) {
	o, err := r.orderOf(n)
	if err != nil {
		return Span{}, err
	}
	if r.closed.Load() {
		return Span{}, fmt.Errorf("bulk: alloc: region %w", ErrClosed)
	}
	idx := r.pop(o)
	if idx < 0 {
		if idx, err = r.allocSlow(ctx, o, n); err != nil {
			return Span{}, err
		}
	}
	w := r.state[idx].Load() // the block is ours: nobody else writes its state
	gen := stateGen(w) + 1
	r.state[idx].Store(packState(gen, stHeld, o))
	r.spans.Add(1)
	return Span{r: r, off: uint64(idx) << r.shift, n: n, idx: int32(idx), order: int32(o), lease: r.lease(gen, idx, o)}, nil
}

// allocSlow takes a block of order o under r.mu, splitting or merging, and
// waits for releases while there is none.
//
// No wake-up is lost: a waiter counts itself in r.waiters before its last
// look at the lists, and a release pushes its block before it reads
// r.waiters (both sequentially consistent), so either the look finds the
// block or the release sees the waiter and closes r.wake, which it can only
// do once the waiter has taken the channel (both under r.mu).
//
// A waiter merges on its first look, and after a wake-up only if there was
// a release since the last merge: all the waiters one release wakes would
// otherwise merge the whole region in turn, under the mutex, for nothing.
// A release made while anyone waits counts in r.epoch (release).
func (r *Region) allocSlow(ctx context.Context, o, n int) (int, error) {
	for first := true; ; first = false {
		r.mu.Lock()
		r.waiters.Add(1)
		idx := r.takeLocked(o, first || r.mergedAt != r.epoch)
		var err error
		switch {
		case idx >= 0:
		case r.closed.Load():
			err = fmt.Errorf("bulk: alloc: region %w", ErrClosed)
		case ctx == nil: // TryAlloc
			err = fullError(n, errNoWait)
		case ctx.Err() != nil:
			r.full.Add(1)
			err = fullError(n, context.Cause(ctx))
		}
		if idx >= 0 || err != nil {
			r.waiters.Add(-1)
			r.mu.Unlock()
			return idx, err
		}
		if r.wake == nil {
			r.wake = make(chan struct{})
		}
		wake := r.wake
		r.mu.Unlock()
		r.waits.Add(1)
		select {
		case <-wake:
		case <-ctx.Done():
		case <-r.done:
		}
		r.waiters.Add(-1)
	}
}

// release returns the block of a span that is no longer held or sent, and
// wakes the Allocs waiting for one.
func (r *Region) release(idx, o int) {
	r.spans.Add(-1)
	r.push(idx, o)
	if r.waiters.Load() > 0 {
		r.mu.Lock()
		r.epoch++
		if r.wake != nil {
			close(r.wake)
			r.wake = nil
		}
		r.mu.Unlock()
	}
}

// transition moves span s from state from to state to, reporting whether
// s was in state from (its generation current).
func (r *Region) transition(s Span, from, to uint64) bool {
	if s.r != r || s.idx < 0 || int(s.idx) >= r.nblocks {
		return false
	}
	w := r.state[s.idx].Load()
	want := s.lease ^ r.salt
	if stateGen(w) != uint32(want>>32) || stateOrder(w) != int(s.order) || stateSt(w) != from {
		return false
	}
	return r.state[s.idx].CompareAndSwap(w, withState(w, to))
}

// Free returns a span this process holds and never sent: one allocated
// and then not needed. It fails with ErrInvalid, and changes nothing, for
// a span not held: freed already, acknowledged, released, or sent. A sent
// span is the peer's, which may be reading it: it comes back with Ack or
// ReleaseAll, or with Unsend if the frame carrying its descriptor never
// left. (Freeing it here would give its memory to another caller while the
// peer reads it, and make the peer's ACK a protocol error.)
func (r *Region) Free(s Span) error {
	if r.closed.Load() {
		return fmt.Errorf("bulk: free: region %w", ErrClosed)
	}
	if !r.transition(s, stHeld, stFree) {
		return fmt.Errorf("%w: free of a span not held (lease %#x): freed, released, or sent", ErrInvalid, s.lease)
	}
	r.release(int(s.idx), int(s.order))
	return nil
}

// Unsend returns a sent span whose descriptor never reached the peer: Send
// succeeded but the frame carrying it could not be written. Only the
// sender knows that the frame did not leave; a span the peer may have seen
// comes back with Ack or ReleaseAll instead. Unsend fails with ErrInvalid,
// and changes nothing, for a span not sent (held, or released already).
func (r *Region) Unsend(s Span) error {
	if r.closed.Load() {
		return fmt.Errorf("bulk: unsend: region %w", ErrClosed)
	}
	if !r.transition(s, stSent, stFree) {
		return fmt.Errorf("%w: unsend of a span not sent (lease %#x)", ErrInvalid, s.lease)
	}
	r.release(int(s.idx), int(s.order))
	return nil
}

// Send marks a filled span as sent and returns its descriptor, the
// payload of the BULK frame that carries a message of type inner (REQUEST,
// RESPONSE or EVENT) whose payload is the span. With flags BulkChecksum
// the descriptor carries the CRC32C of the span (a pass over its bytes:
// for callers who want corruption detected, not a defence against the
// peer, which can compute it).
//
// From here on the span is the peer's until its ACK (Ack) or the end of
// the session (ReleaseAll). Send fails with ErrInvalid for a span not held,
// or one sent already.
func (r *Region) Send(s Span, inner frame.Type, flags wire.BulkFlags) (wire.Bulk, error) {
	switch {
	case inner != frame.TypeRequest && inner != frame.TypeResponse && inner != frame.TypeEvent:
		return wire.Bulk{}, fmt.Errorf("%w: send a span as %v: want REQUEST, RESPONSE or EVENT", ErrInvalid, inner)
	case flags&^wire.BulkChecksum != 0:
		return wire.Bulk{}, fmt.Errorf("%w: send: bulk flags %#x", ErrInvalid, uint8(flags))
	case r.closed.Load():
		return wire.Bulk{}, fmt.Errorf("bulk: send: region %w", ErrClosed)
	case s.r != r || s.idx < 0 || int(s.idx) >= r.nblocks:
		return wire.Bulk{}, fmt.Errorf("%w: send of a span of another region", ErrInvalid)
	}
	// Claim the span before writing its length: a stale Span (sent, acked,
	// its block another span's now) must not touch the block's tables.
	if !r.transition(s, stHeld, stSending) {
		return wire.Bulk{}, fmt.Errorf("%w: send of a span not held (lease %#x)", ErrInvalid, s.lease)
	}
	d := wire.Bulk{InnerType: inner, Flags: flags, Region: r.id, Offset: s.off, Length: uint64(s.n), Lease: s.lease}
	if flags&wire.BulkChecksum != 0 {
		d.Checksum = crc32.Checksum(r.mem[s.off:s.off+uint64(s.n)], castagnoli)
	}
	// The length before the state: Ack reads it only after it sees the
	// span sent. Nothing else moves a span out of stSending.
	r.sent[s.idx].Store(uint64(s.n))
	r.state[s.idx].Store(withState(r.state[s.idx].Load(), stSent))
	return d, nil
}

// Ack releases the span an acknowledgement from the peer names: the
// descriptor of a BULK frame with flag ACK, which echoes the one Send
// returned. Everything in it is untrusted: the region id must be this
// region's, the lease one this region sent and has not released since, and
// the offset and length those of that span; otherwise Ack fails with an
// error matching ErrLease (wire.ErrProto: the peer broke the protocol),
// counts it in Stats.Refused, and changes nothing. Two ACKs of one span
// release it once, wherever they race.
//
// Ack takes no lock and allocates nothing when it succeeds.
func (r *Region) Ack(d *wire.Bulk) error {
	if r.closed.Load() {
		return fmt.Errorf("bulk: ack: region %w", ErrClosed)
	}
	if d.Region != r.id {
		return r.refuse("lease %#x names region %d, this is region %d", d.Lease, d.Region, r.id)
	}
	gen, idx, o, ok := r.unlease(d.Lease)
	if !ok {
		return r.refuse("lease %#x was never issued by region %d", d.Lease, r.id)
	}
	w := r.state[idx].Load()
	if stateGen(w) != gen || stateOrder(w) != o || stateSt(w) != stSent {
		return r.refuse("lease %#x is not outstanding: never sent, or released already", d.Lease)
	}
	if d.Offset != uint64(idx)<<r.shift || d.Length != r.sent[idx].Load() {
		return r.refuse("lease %#x acknowledged as %d+%d, sent as %d+%d",
			d.Lease, d.Offset, d.Length, uint64(idx)<<r.shift, r.sent[idx].Load())
	}
	if !r.state[idx].CompareAndSwap(w, withState(w, stFree)) {
		return r.refuse("lease %#x released twice at once", d.Lease)
	}
	r.acks.Add(1)
	r.release(idx, o)
	return nil
}

func (r *Region) refuse(format string, args ...any) error {
	r.refused.Add(1)
	return fmt.Errorf("%w: "+format, append([]any{ErrLease}, args...)...)
}

// ReleaseAll releases every span the peer holds (sent, not acknowledged),
// at the end of a session: the peer is gone or will read nothing more, and
// its ACKs for those spans, should any still arrive, are refused. Spans
// this process still holds (being filled) are left to their holders, who
// Free them. It returns the number of spans released. It scans the whole
// region: not a hot path.
func (r *Region) ReleaseAll() int {
	n := 0
	for idx := range r.state {
		w := r.state[idx].Load()
		if stateSt(w) == stSent && r.state[idx].CompareAndSwap(w, withState(w, stFree)) {
			r.release(idx, stateOrder(w))
			n++
		}
	}
	r.released.Add(uint64(n))
	return n
}

// Stats are a region's counters, each read atomically (not all at one
// instant).
type Stats struct {
	Spans     int64  // spans allocated and not released: held here or sent
	FreeBytes int64  // bytes in free blocks (a moment's view while a merge runs)
	Acks      uint64 // spans released by the peer's ACK
	Refused   uint64 // ACKs refused (ErrLease): the peer misbehaved
	Released  uint64 // spans released by ReleaseAll
	Waits     uint64 // times an Alloc waited for a release
	Full      uint64 // Allocs that failed with ErrFull
	Coalesces uint64 // merges of free blocks, the allocator's slow path
}

// Stats returns the region's counters.
func (r *Region) Stats() Stats {
	return Stats{
		Spans:     r.spans.Load(),
		FreeBytes: r.freeBlocks.Load() << r.shift,
		Acks:      r.acks.Load(),
		Refused:   r.refused.Load(),
		Released:  r.released.Load(),
		Waits:     r.waits.Load(),
		Full:      r.full.Load(),
		Coalesces: r.coalesces.Load(),
	}
}

// Close ends waiting Allocs (they and every later call fail with
// ErrClosed), then releases the shared memory and closes the memfd. Span
// memory a goroutine still touches stays mapped, as private zero pages,
// until neither the Region nor a Span of it is reachable (internal/shm):
// nothing faults. The peer's mapping is not affected. Close is idempotent.
func (r *Region) Close() error {
	if !r.closed.CompareAndSwap(false, true) {
		return nil
	}
	close(r.done)
	return r.shm.Close()
}
