package ring

import (
	"encoding/binary"
	"fmt"
	"io"
	"runtime"
	"sync/atomic"
	"time"

	"github.com/sypas/go/futex"
)

// Consumer is the reading end of a ring. Its methods are for one goroutine at
// a time, except SetDeadline, Close and Interrupt, which may be called from any
// goroutine (for example to abort a blocked Next).
type Consumer struct {
	data     []byte // the data area; len == capacity
	capacity uint64 // private copy of the validated header field
	mask     uint64

	head       *atomic.Uint64 // shared, written by us: start of unreleased records
	tail       *atomic.Uint64 // shared, written by the peer: untrusted
	peerSleep  *atomic.Uint32 // the producer's sleep word: we clear it to wake it
	peerClosed *atomic.Uint32 // the producer's closed flag: untrusted, only compared with 0
	closedFlag *atomic.Uint32 // our closed flag

	pos        uint64 // start of the next record to read
	released   uint64 // the last value stored to head
	lag        uint64 // ReadInto releases once pos is this far past released
	viewEnd    uint64 // end of the last record handed out by Next; 0 after ReadInto
	cachedTail uint64 // the last validated tail
	err        error  // sticky corruption
	eof        bool   // sticky: io.EOF was returned

	closed  atomic.Bool
	waiter  *futex.Waiter
	readyFn func() bool // c.ready, bound once so waiting allocates nothing
	owner   *Region     // attached through Region.NewConsumer: keeps the memory mapped; nil over plain memory
}

// NewConsumer attaches the consumer end to a ring laid out by Init in mem,
// memory the caller owns: it must stay valid (mapped) until the consumer is
// closed, every call on it has returned and every view it returned is
// dropped. For a Region, use its NewConsumer method instead, which makes
// closing the region safe at any time. The consumer validates the header once
// and never reads it again.
func NewConsumer(mem []byte, cfg Config) (*Consumer, error) {
	if err := cfg.Idle.Validate(); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	capacity, err := readHeader(mem)
	if err != nil {
		return nil, err
	}
	c := &Consumer{
		data:       mem[DataOffset : DataOffset+capacity : DataOffset+capacity],
		capacity:   uint64(capacity),
		mask:       uint64(capacity) - 1,
		head:       u64At(mem, ConsumerSlotOffset+slotIndex),
		closedFlag: u32At(mem, ConsumerSlotOffset+slotClosed),
		tail:       u64At(mem, ProducerSlotOffset+slotIndex),
		peerSleep:  u32At(mem, ProducerSlotOffset+slotSleep),
		peerClosed: u32At(mem, ProducerSlotOffset+slotClosed),
	}
	c.pos = c.head.Load()
	c.released = c.pos
	c.lag = min(uint64(capacity)/8, maxReadIntoLag)
	c.cachedTail = c.tail.Load()
	if !validIndexPair(c.pos, c.cachedTail, c.capacity) {
		return nil, fmt.Errorf("%w: indices at attach: head %d, tail %d", ErrCorrupt, c.pos, c.cachedTail)
	}
	c.waiter = futex.NewWaiter(u32At(mem, ConsumerSlotOffset+slotSleep), cfg.Idle)
	c.readyFn = c.ready
	return c, nil
}

// Capacity is the size of the data area in bytes.
func (c *Consumer) Capacity() int { return int(c.capacity) }

// Next returns the payload of the next record as a view into the ring,
// waiting (idle strategy, deadline) while the ring is empty. It returns io.EOF
// once the producer has closed and every record is read.
//
// Lifetime: the view stays valid, and its space stays out of the producer's
// reach, until Release or ReadInto is called; after that the producer may
// overwrite it at once. Release in batches to save index stores,
// but release before a Next that may wait if the producer could be waiting for
// that room. When the unreleased views cover the whole ring, so that nothing
// can ever arrive, Next returns ErrViewsHeld instead of waiting; short of
// that it cannot know what the producer waits for, and waits. In shared
// memory the view's bytes can still be changed by a hostile peer while you
// read them: copy or decode each byte once.
func (c *Consumer) Next() ([]byte, error) {
	if c.pos != c.cachedTail && c.err == nil && !c.closed.Load() {
		// The common case: a published data record, read without a call.
		off := c.pos & c.mask
		hdr := binary.LittleEndian.Uint64(c.data[off : off+RecordHeaderSize])
		length, size := uint64(uint32(hdr)), align(RecordHeaderSize+uint64(uint32(hdr)))
		if uint32(hdr>>32) == recordData && size <= c.cachedTail-c.pos && size <= c.capacity-off {
			start := off + RecordHeaderSize
			c.pos += size
			c.viewEnd = c.pos
			return c.data[start : start+length : start+length], nil
		}
	}
	return c.nextSlow()
}

// nextSlow is Next when the fast path does not apply: nothing published yet,
// padding to skip, or a record to reject.
func (c *Consumer) nextSlow() ([]byte, error) {
	if err := c.usable(); err != nil {
		return nil, err
	}
	for {
		if c.pos == c.cachedTail {
			if err := c.waitData(); err != nil {
				return nil, err
			}
		}
		view, next, isData, err := c.record()
		if err != nil {
			return nil, err
		}
		c.pos = next
		if isData {
			c.viewEnd = next
			return view, nil
		}
	}
}

// Buffered reports whether something the producer published is still
// unread as of the last look at its index: Next will then return without
// waiting, unless all that is left is padding (the end of a lap). It reads
// nothing the producer writes, so it costs a few private loads; a consumer
// uses it to batch its own work, answering a burst of requests with one
// publication instead of one each.
func (c *Consumer) Buffered() bool {
	return c.pos != c.cachedTail && c.err == nil && !c.closed.Load()
}

// Drained reports whether every record the producer has published so far
// has been read and released (or the consumer is closed). Unlike the other
// methods it may be called from any goroutine while another reads: it
// loads the two shared indices, the producer's untrusted, so a hostile
// producer can keep it false (bound a wait for it) but do nothing worse.
// A side draining its peer's last requests waits for it.
func (c *Consumer) Drained() bool {
	if c.closed.Load() {
		return true
	}
	d := c.head.Load() == c.tail.Load()
	runtime.KeepAlive(c) // the loads touch the mapping, which c keeps (owner)
	return d
}

// Release hands every record returned so far back to the producer with one
// store of the head index, and wakes the producer if, and only if, it is
// parked waiting for room. Views returned before Release must not be used after.
func (c *Consumer) Release() {
	if c.pos != c.released && !c.closed.Load() {
		c.head.Store(c.pos)
		c.released = c.pos
		futex.Notify(c.peerSleep)
	}
	runtime.KeepAlive(c) // Notify touches the mapping, which c keeps (owner)
}

// maxReadIntoLag bounds how much room ReadInto keeps from the producer
// before it releases: an eighth of the ring, at most this. Releasing costs a
// store to the index line the producer reads (and a load of its sleep word);
// once per 4 KiB it is noise, while once per 64-byte record it cost a
// copying consumer most of its speed.
const maxReadIntoLag = 4096

// ReadInto copies the next record into buf and returns its length. If buf is
// too short it returns ErrShortBuffer and the record stays in the ring.
//
// The copied record, and every record returned by Next before it (do not use
// their views any more), go back to the producer in batches: once the
// records not yet handed back reach an eighth of the ring (4 KiB at most),
// and before ReadInto or Next waits for more, so a producer waiting for that
// room is never kept waiting by a consumer that waits too. Call Release to
// hand them back at once, for example before blocking on something else.
func (c *Consumer) ReadInto(buf []byte) (int, error) {
	if c.pos != c.cachedTail && c.err == nil && !c.closed.Load() {
		// The common case, as in Next: a published data record that fits.
		off := c.pos & c.mask
		hdr := binary.LittleEndian.Uint64(c.data[off : off+RecordHeaderSize])
		length, size := uint64(uint32(hdr)), align(RecordHeaderSize+uint64(uint32(hdr)))
		if uint32(hdr>>32) == recordData && size <= c.cachedTail-c.pos && size <= c.capacity-off && length <= uint64(len(buf)) {
			start := off + RecordHeaderSize
			n := copy(buf, c.data[start:start+length])
			c.consumed(size)
			return n, nil
		}
	}
	return c.readIntoSlow(buf)
}

// consumed moves past a record of size bytes that ReadInto copied, and
// releases if the lag is reached. Earlier views are released by contract,
// so waitData may release them all before it waits.
func (c *Consumer) consumed(size uint64) {
	c.pos += size
	c.viewEnd = 0
	if c.pos-c.released >= c.lag {
		c.Release()
	}
}

// readIntoSlow is ReadInto when the fast path does not apply.
func (c *Consumer) readIntoSlow(buf []byte) (int, error) {
	if err := c.usable(); err != nil {
		return 0, err
	}
	for {
		if c.pos == c.cachedTail {
			if err := c.waitData(); err != nil {
				return 0, err
			}
		}
		view, next, isData, err := c.record()
		if err != nil {
			return 0, err
		}
		if !isData {
			c.pos = next
			continue
		}
		if len(buf) < len(view) {
			return 0, fmt.Errorf("%w: record is %d bytes, buffer %d", ErrShortBuffer, len(view), len(buf))
		}
		n := copy(buf, view)
		c.consumed(next - c.pos)
		return n, nil
	}
}

// SetDeadline bounds how long Next and ReadInto wait for a record: once it
// has passed, a call that would have to wait fails with an error matching
// os.ErrDeadlineExceeded. As with net.Conn, the zero time means no deadline and
// a change applies to a call already waiting; unlike net.Conn, records already
// published are still returned after the deadline, since the deadline bounds
// waiting, not reading.
func (c *Consumer) SetDeadline(t time.Time) {
	c.waiter.SetDeadline(t)
	runtime.KeepAlive(c) // the waiter touches the mapping, which c keeps (owner)
}

// SetWaitDeadline is SetDeadline for the goroutine that calls Next and
// ReadInto, between its calls (a per-call deadline, say): it wakes no call
// in progress, so it makes no system call.
func (c *Consumer) SetWaitDeadline(t time.Time) { c.waiter.SetWaitDeadline(t) }

// Interrupt makes a waiting or future wait for records fail with err; the
// control plane calls it when the producer's process dies. Records already
// published can still be read. The first error sticks.
func (c *Consumer) Interrupt(err error) {
	c.waiter.Interrupt(err)
	runtime.KeepAlive(c)
}

// Close tells the producer that nothing more will be read (its writes then
// fail with ErrPeerClosed) and wakes a blocked Next, which returns ErrClosed;
// Next and ReadInto fail with ErrClosed afterwards and Release does nothing.
// It is idempotent and does not release the memory: Region.Close does, after
// closing the ends attached through it.
func (c *Consumer) Close() error {
	if r := c.owner; r != nil {
		r.endClose.Lock() // see Region.endClose
		defer r.endClose.Unlock()
	}
	if !c.closed.CompareAndSwap(false, true) {
		return nil
	}
	c.closedFlag.Store(1)
	wakePeer(c.peerSleep) // not Notify: see wakePeer
	err := c.waiter.Close()
	runtime.KeepAlive(c)
	return err
}

// usable reports why the consumer cannot be used any more, if it cannot.
func (c *Consumer) usable() error {
	if c.closed.Load() {
		return ErrClosed
	}
	return c.err
}

// waitData returns once a record is published past pos, or with why not.
func (c *Consumer) waitData() error {
	if err := c.usable(); err != nil {
		return err
	}
	if c.eof {
		return io.EOF
	}
	if c.refreshTail() {
		return c.err
	}
	if c.peerClosed.Load() != 0 {
		// Checked before waiting, so that a clean end of stream is reported
		// as io.EOF even after an Interrupt (the producer's process exited
		// after closing).
		return c.endOfStream()
	}
	if c.released >= c.viewEnd {
		// The caller holds no views, so whatever lies between released and
		// pos is padding we skipped: hand it back before waiting, or a
		// producer waiting for that room and we would wait for each other.
		c.Release()
	}
	if c.pos-c.released == c.capacity {
		// Everything up to tail is read and nothing released: the producer
		// has no free byte, and the smallest record takes 8, so nothing can
		// ever arrive. With any byte free it might write a record that fits;
		// only the caller knows whether it will.
		return fmt.Errorf("%w: %d bytes unreleased; Release before waiting", ErrViewsHeld, c.pos-c.released)
	}
	if err := c.waiter.Wait(c.readyFn); err != nil {
		return err
	}
	if c.err != nil || c.pos != c.cachedTail {
		return c.err
	}
	if c.closed.Load() {
		return ErrClosed
	}
	return c.endOfStream()
}

// endOfStream is called once the producer's closed flag is seen. The
// producer stored its last tail before the flag, so one more load of tail
// sees every record it published; if there is none, the stream has ended,
// for good: records published after the flag are never delivered.
func (c *Consumer) endOfStream() error {
	if c.refreshTail() {
		return c.err
	}
	c.eof = true
	return io.EOF
}

// ready is the wait condition: a record, a broken peer, a closed producer, or
// our own Close. Any move of tail satisfies it, so it never has progress
// short of the condition to report (futex.Progress).
func (c *Consumer) ready() bool {
	return c.refreshTail() || c.peerClosed.Load() != 0 || c.closed.Load()
}

// refreshTail reads the producer's index once and validates it against our
// private copies: a multiple of 8 that only moves forward, and never more than
// a capacity ahead of what we released. It reports whether there is something
// new to look at: records, or a violation (then the sticky error is set).
func (c *Consumer) refreshTail() bool {
	t := c.tail.Load()
	if t == c.cachedTail {
		return false
	}
	if t-c.cachedTail > c.capacity || t-c.released > c.capacity || t&(RecordAlign-1) != 0 {
		c.err = c.closedOr(fmt.Errorf("%w: producer index %d, last %d, released %d, capacity %d", ErrCorrupt, t, c.cachedTail, c.released, c.capacity))
		return true
	}
	c.cachedTail = t
	return true
}

// record parses the record at pos, which is below cachedTail. The header is
// read once; its length and type are checked against the published range and
// the end of the data area before any slice is made.
func (c *Consumer) record() (view []byte, next uint64, isData bool, err error) {
	off := c.pos & c.mask
	avail := c.cachedTail - c.pos // in (0, capacity], a multiple of 8
	contig := c.capacity - off    // bytes before the end of the data area
	hdr := binary.LittleEndian.Uint64(c.data[off : off+RecordHeaderSize])
	length, typ := uint64(uint32(hdr)), uint32(hdr>>32)
	switch typ {
	case recordData:
		size := align(RecordHeaderSize + length)
		if size > avail || size > contig {
			break
		}
		start := off + RecordHeaderSize
		return c.data[start : start+length : start+length], c.pos + size, true, nil
	case recordPadding:
		// Padding runs exactly to the end of the data area and is never at
		// offset 0 (a record always fits there), so at most one is skipped
		// between two records: a peer cannot keep us skipping laps.
		if RecordHeaderSize+length != contig || contig > avail || off == 0 {
			break
		}
		return nil, c.pos + contig, false, nil
	}
	c.err = c.closedOr(fmt.Errorf("%w: record at %d: type %d, length %d, %d bytes published, %d before the end", ErrCorrupt, c.pos, typ, length, avail, contig))
	return nil, 0, false, c.err
}
