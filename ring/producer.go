package ring

import (
	"encoding/binary"
	"fmt"
	"runtime"
	"sync/atomic"
	"time"

	"github.com/sypas/go/futex"
)

// Producer is the writing end of a ring. Its methods are for one goroutine at a
// time, except SetDeadline, Close and Interrupt, which may be called from any
// goroutine (for example to abort a blocked Reserve).
type Producer struct {
	data     []byte // the data area; len == capacity
	capacity uint64 // private copy of the validated header field
	mask     uint64
	// owner, set by Region.NewProducer, keeps the region and its mapping
	// reachable; nil over plain memory. It took the place of a maxRecord
	// field (MaxRecord computes it): at 176 bytes the struct stays in its
	// size class, and one 8 bytes larger streamed 64-byte records 10-20%
	// slower across processes (BenchmarkStream/ring-batch64).
	owner *Region

	tail       *atomic.Uint64 // shared, written by us: end of published records
	head       *atomic.Uint64 // shared, written by the peer: untrusted
	peerSleep  *atomic.Uint32 // the consumer's sleep word: we clear it to wake it
	peerClosed *atomic.Uint32 // the consumer's closed flag: untrusted, only compared with 0
	closedFlag *atomic.Uint32 // our closed flag

	pos        uint64 // end of committed records, published or not
	limit      uint64 // a record may end here without checks; 0 after an error
	resCap     int    // reserved payload length + 1; 0 when nothing is reserved
	published  uint64 // the last value stored to tail
	cachedHead uint64 // the last validated head
	want       uint64 // free bytes the current wait needs; read by ready
	err        error  // sticky: corruption or a closed peer

	closed  atomic.Bool
	slow    atomic.Bool // set while reserveSlow runs: Close must not read what it writes
	intr    atomic.Bool // set by Interrupt: Close publishes nothing more
	waiter  *futex.Waiter
	readyFn func() bool // p.ready, bound once so waiting allocates nothing
}

// NewProducer attaches the producer end to a ring laid out by Init in mem,
// memory the caller owns: it must stay valid (mapped) until the producer is
// closed and every call on it has returned. For a Region, use its
// NewProducer method instead, which makes closing the region safe at any
// time. The producer validates the header once and never reads it again.
func NewProducer(mem []byte, cfg Config) (*Producer, error) {
	if err := cfg.Idle.Validate(); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	capacity, err := readHeader(mem)
	if err != nil {
		return nil, err
	}
	p := &Producer{
		data:       mem[DataOffset : DataOffset+capacity : DataOffset+capacity],
		capacity:   uint64(capacity),
		mask:       uint64(capacity) - 1,
		tail:       u64At(mem, ProducerSlotOffset+slotIndex),
		closedFlag: u32At(mem, ProducerSlotOffset+slotClosed),
		head:       u64At(mem, ConsumerSlotOffset+slotIndex),
		peerSleep:  u32At(mem, ConsumerSlotOffset+slotSleep),
		peerClosed: u32At(mem, ConsumerSlotOffset+slotClosed),
	}
	p.pos = p.tail.Load()
	p.published = p.pos
	p.cachedHead = p.head.Load()
	if !validIndexPair(p.cachedHead, p.pos, p.capacity) {
		return nil, fmt.Errorf("%w: indices at attach: head %d, tail %d", ErrCorrupt, p.cachedHead, p.pos)
	}
	p.waiter = futex.NewWaiter(u32At(mem, ProducerSlotOffset+slotSleep), cfg.Idle)
	p.readyFn = p.ready
	p.setLimit()
	return p, nil
}

// Capacity is the size of the data area in bytes.
func (p *Producer) Capacity() int { return int(p.capacity) }

// MaxRecord is the largest payload Reserve accepts.
func (p *Producer) MaxRecord() int { return MaxRecord(int(p.capacity)) }

// Reserve returns a slice of exactly n bytes inside the ring for the caller to
// fill, then Commit. It waits, following the idle strategy and the deadline,
// while the ring is full; nothing is ever dropped or overwritten. Before
// waiting it publishes committed records, so the consumer can make room.
// The slice is valid until Commit; a second Reserve before Commit fails.
func (p *Producer) Reserve(n int) ([]byte, error) {
	// The common case: the record ends before the limit, so the cached head
	// says it is free and it needs no padding.
	if buf := p.TryReserve(n); buf != nil {
		return buf, nil
	}
	return p.reserveSlow(n)
}

// TryReserve is Reserve for hot loops: it inlines into the caller, makes no
// call and one store, and never waits. It returns nil whenever Reserve would
// have more to do than hand out room already known to be free (start a new
// lap of the data area, padding its end if need be; re-read the consumer's
// index; wait; or report an error); call Reserve then:
//
//	buf := p.TryReserve(n)
//	if buf == nil {
//		if buf, err = p.Reserve(n); err != nil {
//			return err
//		}
//	}
//
// Across processes the producer is bound by its store buffer, where the call
// to Reserve costs stores of its own: TryReserve streams 64-byte messages
// about a fifth faster than Reserve alone (docs/BENCHMARKS.md). A non-nil
// result is exactly n bytes, even for n = 0, and follows Reserve's rules.
func (p *Producer) TryReserve(n int) []byte {
	if uint(n) <= MaxCapacity && p.pos+RecordHeaderSize+uint64(n) <= p.limit && p.resCap == 0 && !p.closed.Load() {
		start := p.pos&p.mask + RecordHeaderSize
		p.resCap = n + 1
		return p.data[start : start+uint64(n) : start+uint64(n)]
	}
	return nil
}

// reserveSlow is Reserve when the fast path does not apply: an error to
// report, a new lap to start (padding the old one's end if need be), or room
// to look for or wait for. It recomputes the limit for the fast path.
func (p *Producer) reserveSlow(n int) ([]byte, error) {
	// Set before usable reads closed, so that a Close from another goroutine
	// either sees it, or happens before that read and ends this call. Swap,
	// not Store: a read-modify-write orders the store before that load even
	// under the race detector, where Store is only a release (futex's
	// raceFence says more).
	p.slow.Swap(true)
	defer p.slow.Store(false)
	if err := p.usable(); err != nil {
		return nil, err
	}
	if p.resCap != 0 {
		return nil, fmt.Errorf("%w: a reservation is already pending (Commit or Abandon it first)", ErrInvalid)
	}
	if n < 0 {
		return nil, fmt.Errorf("%w: negative size %d", ErrInvalid, n)
	}
	if n > p.MaxRecord() {
		return nil, fmt.Errorf("%w: %d bytes, the maximum is %d", ErrTooLarge, n, p.MaxRecord())
	}
	size := align(RecordHeaderSize + uint64(n))
	off := p.pos & p.mask
	if rest := p.capacity - off; rest < size {
		// Records never wrap: pad to the end of the data area, start at 0.
		if err := p.waitFree(rest); err != nil {
			return nil, err
		}
		binary.LittleEndian.PutUint64(p.data[off:], packRecordHeader(uint32(rest-RecordHeaderSize), recordPadding))
		p.pos += rest
		off = 0
	}
	if err := p.waitFree(size); err != nil {
		return nil, err
	}
	// A new lap (after padding, or after a record that ended exactly at the
	// end of the data area) or a new head: either way the limit moves on.
	p.setLimit()
	p.resCap = n + 1
	start := off + RecordHeaderSize
	return p.data[start : start+uint64(n) : start+uint64(n)], nil
}

// Commit ends the pending reservation with a record of its first n bytes
// (n may be less than reserved). The record header, with its length, is
// written last, after the payload. The record becomes visible to the consumer
// at the next Flush; commit several records and Flush once to publish them
// with one index store.
func (p *Producer) Commit(n int) error {
	// No calls and three stores, so that Commit inlines (TestHotPathsInline).
	if uint(n) < uint(p.resCap) && !p.closed.Load() {
		// The reserved record starts at pos: nothing moves pos in between.
		binary.LittleEndian.PutUint64(p.data[p.pos&p.mask:], uint64(n)|uint64(recordData)<<32)
		p.pos += align(RecordHeaderSize + uint64(n))
		p.resCap = 0
		return nil
	}
	if p.resCap == 0 {
		return ErrNoReservation
	}
	if p.closed.Load() {
		return ErrClosed // the reservation dies with the producer
	}
	return errCommitTooLong
}

// Abandon drops the pending reservation: nothing of it is published, and the
// next Reserve may hand out the same room again. Commit(0) would publish an
// empty record instead. Without a reservation, Abandon does nothing. Padding
// that Reserve wrote to start a new lap stays: the consumer skips it.
func (p *Producer) Abandon() { p.resCap = 0 }

// Flush publishes every committed record with one store of the tail index and
// wakes the consumer if, and only if, it is parked. It reports ErrPeerClosed
// once the consumer has closed, and ErrClosed after Close.
func (p *Producer) Flush() error {
	if err := p.usable(); err != nil {
		return err
	}
	if p.pos != p.published {
		p.tail.Store(p.pos)
		p.published = p.pos
		futex.Notify(p.peerSleep)
		if p.closed.Load() {
			// Close, from another goroutine, stored the closed flag before
			// this tail: the consumer may already have reported io.EOF.
			return fmt.Errorf("%w: records flushed while closing may not be delivered", ErrClosed)
		}
	}
	if p.peerClosed.Load() != 0 {
		p.fail(ErrPeerClosed)
		return p.err
	}
	return nil
}

// Write copies b into the ring as one record and publishes it: Reserve, copy,
// Commit, Flush.
func (p *Producer) Write(b []byte) (int, error) {
	buf := p.TryReserve(len(b))
	if buf == nil {
		var err error
		if buf, err = p.Reserve(len(b)); err != nil {
			return 0, err
		}
	}
	copy(buf, b)
	if err := p.Commit(len(b)); err != nil {
		return 0, err
	}
	if err := p.Flush(); err != nil {
		return 0, err
	}
	return len(b), nil
}

// SetDeadline bounds how long Reserve and Write wait for room: once it has
// passed, a call that would have to wait fails with an error matching
// os.ErrDeadlineExceeded. As with net.Conn, the zero time means no deadline and
// a change applies to a call already waiting; unlike net.Conn, a call that
// finds room succeeds even after the deadline, since the deadline bounds
// waiting, not work.
func (p *Producer) SetDeadline(t time.Time) {
	p.waiter.SetDeadline(t)
	runtime.KeepAlive(p) // the waiter touches the mapping, which p keeps (owner)
}

// SetWaitDeadline is SetDeadline for the goroutine that calls Reserve and
// Write, between its calls (a per-call deadline, say): it wakes no call in
// progress, so it makes no system call.
func (p *Producer) SetWaitDeadline(t time.Time) { p.waiter.SetWaitDeadline(t) }

// Interrupt makes a waiting or future wait for room fail with err; the control
// plane calls it when the consumer's process dies, or the session ends. The
// first error sticks. After it, Close publishes nothing more: nobody would
// read it, and the goroutine that ends a session need not know whether
// another is still committing.
func (p *Producer) Interrupt(err error) {
	p.intr.Store(true)
	p.waiter.Interrupt(err)
	runtime.KeepAlive(p) // the waiter touches the mapping, which p keeps (owner)
}

// Close publishes every record committed before it, then marks the producer
// closed: the consumer reads those records, then gets io.EOF. A pending
// reservation is dropped, and Reserve, Commit, Flush and Write fail with
// ErrClosed afterwards. Close is idempotent. It does not release the memory:
// Region.Close does, after closing the ends attached through it (without
// publishing: Region.Close, like Session.Close, may run while another
// goroutine commits).
//
// Close reads what the producer committed, so call it from the producer's
// goroutine, or from one that knows that goroutine is done with the producer
// (it returned, or signalled through a channel). From another goroutine, Close
// may also end a Reserve or Write that is waiting for room, which then returns
// ErrClosed: a producer publishes what it committed before it waits. Closing
// a producer that another goroutine is still committing to (outside such a
// wait) is a data race, unless Interrupt came first; stop that goroutine
// first, interrupt it, or close its Region instead.
func (p *Producer) Close() error { return p.close(true) }

// close marks the producer closed, publishing first what was committed if
// publish is set and nothing else may be writing (see Close).
func (p *Producer) close(publish bool) error {
	if r := p.owner; r != nil {
		r.endClose.Lock() // see Region.endClose
		defer r.endClose.Unlock()
	}
	if !p.closed.CompareAndSwap(false, true) {
		return nil
	}
	// A producer in Reserve's slow path (waiting for room, say) may be
	// writing what we would read: leave publishing to its own Flush, which
	// it makes before it waits. After Interrupt there is nobody to publish to.
	if publish && !p.intr.Load() && !p.slow.Load() && p.err == nil && p.pos != p.published {
		// Before the closed flag: a consumer that sees the flag loads tail
		// once more, and so gets these records before io.EOF.
		p.tail.Store(p.pos)
		p.published = p.pos
	}
	p.closedFlag.Store(1)
	wakePeer(p.peerSleep) // not Notify: see wakePeer
	err := p.waiter.Close()
	runtime.KeepAlive(p)
	return err
}

func (p *Producer) usable() error {
	if p.closed.Load() {
		return ErrClosed
	}
	return p.err
}

func (p *Producer) free() uint64 { return p.capacity - (p.pos - p.cachedHead) }

// fail makes err sticky.
func (p *Producer) fail(err error) {
	p.err = err
	p.limit = 0
}

// setLimit recomputes limit: the nearer of the end of the room the cached
// head shows and the end of the current lap of the data area. A sticky error
// sets it to 0, which sends every reservation to the slow path. Between two
// calls it can only be too small: pos and the cached head only move forward.
func (p *Producer) setLimit() {
	if p.err != nil {
		p.limit = 0
		return
	}
	p.limit = min(p.cachedHead+p.capacity, p.pos-p.pos&p.mask+p.capacity)
}

// waitFree returns once `need` bytes after pos are free.
func (p *Producer) waitFree(need uint64) error {
	if p.free() >= need {
		return nil
	}
	if !p.refreshHead() {
		return p.err
	}
	if p.free() >= need {
		return nil
	}
	if err := p.Flush(); err != nil {
		return err
	}
	p.want = need
	if err := p.waiter.Wait(p.readyFn); err != nil {
		return err
	}
	if p.closed.Load() { // before p.err: a peer that closed in answer to our Close
		return ErrClosed
	}
	return p.err
}

// ready is the wait condition: room, a broken peer, or a closed one. A head
// that moved without making room enough is progress all the same, which
// the waiter must not mistake for a wake-up for nothing (futex.Progress).
func (p *Producer) ready() bool {
	head := p.cachedHead
	if !p.refreshHead() {
		return true
	}
	if p.peerClosed.Load() != 0 {
		p.fail(ErrPeerClosed)
		return true
	}
	if p.free() >= p.want || p.closed.Load() {
		return true
	}
	if p.cachedHead != head {
		p.waiter.Progress()
	}
	return false
}

// refreshHead reads the consumer's index once and validates it: a multiple
// of 8 that only moves forward and never past what we published. It reports
// false, and sets the sticky error, on a violation.
func (p *Producer) refreshHead() bool {
	h := p.head.Load()
	if h < p.cachedHead || h > p.published || h&(RecordAlign-1) != 0 {
		p.fail(p.closedOr(fmt.Errorf("%w: consumer index %d outside [%d, %d]", ErrCorrupt, h, p.cachedHead, p.published)))
		return false
	}
	p.cachedHead = h
	p.setLimit() // even if the reservation then fails on its deadline
	return true
}
