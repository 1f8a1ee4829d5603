package ring

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"

	"github.com/sypas/go/futex"
	"github.com/sypas/go/internal/shm"
)

// Region is the memory of one ring in a sealed memfd, mapped into this
// process. The creator passes File to the other process (ExtraFiles, or
// SCM_RIGHTS over the control socket), which maps it with OpenRegion; each side
// then attaches its end with the region's NewProducer or NewConsumer.
//
// Closing a region is safe at any time, from any goroutine, even while other
// goroutines are blocked in or streaming through calls on the ends attached
// through it: Close closes those ends first (their calls in flight, and every
// later call, return an error matching ErrClosed), then releases the shared
// memory without ever unmapping an address a goroutine may still touch. See
// Close.
type Region struct {
	shm      *shm.Region
	capacity int

	mu     sync.Mutex // guards the fields below
	prod   *Producer  // attached through NewProducer, closed by Close
	cons   *Consumer  // attached through NewConsumer, closed by Close
	closed bool

	// endClose is held by the Close of an end attached through the region
	// for its whole run, so that Close, which closes the ends before it
	// swaps the mapping, waits for one already under way in another
	// goroutine: its wake-ups must reach the shared words.
	endClose sync.Mutex
}

// regionPage is the unit of region sizes: memfds are passed and mapped in
// whole pages (docs/PROTOCOL.md §3.14 and §5.1).
const regionPage = 4096

// RegionSize is the size of the memfd holding a ring of capacity data bytes:
// Size(capacity) rounded up to whole 4096-byte pages. The ring occupies the
// first Size(capacity) bytes; the rest of the last page is unused.
func RegionSize(capacity int) int { return (Size(capacity) + regionPage - 1) &^ (regionPage - 1) }

// CreateRegion makes a sealed memfd of RegionSize(capacity) bytes and lays out
// an empty ring of capacity data bytes in it.
func CreateRegion(capacity int) (*Region, error) {
	if err := checkCapacity(uint64(capacity)); err != nil {
		return nil, err
	}
	r, err := shm.Create("sypas-ring", RegionSize(capacity))
	if err != nil {
		return nil, fmt.Errorf("ring: %w", err)
	}
	if err := Init(r.Bytes(), capacity); err != nil {
		r.Close()
		return nil, err
	}
	return &Region{shm: r, capacity: capacity}, nil
}

// OpenRegion maps a ring region received from a peer, whose capacity was
// agreed beforehand. It takes ownership of f: on failure f is closed. The
// memfd must be sealed against shrinking and growing and be exactly
// RegionSize(capacity) bytes, or the error matches ErrCorrupt (the peer
// passed bad memory); a nil f or a bad capacity matches ErrInvalid. The ring
// header is validated when an end attaches.
func OpenRegion(f *os.File, capacity int) (*Region, error) {
	if f == nil {
		return nil, fmt.Errorf("%w: open region: nil file", ErrInvalid)
	}
	if err := checkCapacity(uint64(capacity)); err != nil {
		f.Close()
		return nil, err
	}
	r, err := shm.Open(f, RegionSize(capacity))
	if errors.Is(err, shm.ErrNotSealed) || errors.Is(err, shm.ErrSize) {
		return nil, fmt.Errorf("%w: peer's memfd refused: %w", ErrCorrupt, err)
	}
	if err != nil {
		return nil, fmt.Errorf("ring: %w", err)
	}
	return &Region{shm: r, capacity: capacity}, nil
}

// NewProducer attaches the producer end to the region's ring (see the
// function NewProducer). The producer keeps the region's memory reserved for
// as long as it is reachable, and the region's Close closes it. A region has
// at most one producer attached this way; after Close it fails with
// ErrClosed.
func (r *Region) NewProducer(cfg Config) (*Producer, error) {
	return attach(r, &r.prod, cfg, NewProducer, "producer")
}

// NewConsumer attaches the consumer end to the region's ring, as
// NewProducer does the producer end.
func (r *Region) NewConsumer(cfg Config) (*Consumer, error) {
	return attach(r, &r.cons, cfg, NewConsumer, "consumer")
}

// attach makes an end of the region's ring with newEnd and records it in
// *slot, which Close reads.
func attach[E interface {
	*Producer | *Consumer
	setOwner(*Region)
}](r *Region, slot *E, cfg Config, newEnd func([]byte, Config) (E, error), what string) (E, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil, fmt.Errorf("ring: attach a %s: region %w", what, ErrClosed)
	}
	if *slot != nil {
		return nil, fmt.Errorf("%w: a %s is already attached to this region", ErrInvalid, what)
	}
	e, err := newEnd(r.shm.Bytes(), cfg)
	if err != nil {
		return nil, err
	}
	e.setOwner(r)
	*slot = e
	return e, nil
}

// Bytes is the mapped region, nil after Close. Prefer the region's
// NewProducer and NewConsumer to the functions of the same name on Bytes:
// ends attached over Bytes are neither closed by Close nor keep the region
// reachable, so they must be closed, and their calls must have returned,
// before the region is closed or dropped.
func (r *Region) Bytes() []byte { return r.shm.Bytes() }

// File is the memfd, still owned by the region, to pass to the peer.
func (r *Region) File() *os.File { return r.shm.File() }

// Capacity is the size of the ring's data area.
func (r *Region) Capacity() int { return r.capacity }

// Close closes the ends attached through the region, which wakes their
// waiting calls, then releases the shared memory and closes the memfd. It
// may run at any time, from any goroutine: calls in flight on those ends
// return an error matching ErrClosed, as does every later call, and views
// and reservations they handed out stay safe to touch, while the region or
// the end is reachable, but hold meaningless bytes (the mapping is replaced in one step by private zero pages; its
// addresses are unmapped once neither the region nor its ends are
// reachable). The peer's own mapping is not affected: it sees this side's
// ends closed. Close is idempotent.
func (r *Region) Close() error {
	r.mu.Lock()
	prod, cons := r.prod, r.cons
	r.closed = true
	r.mu.Unlock()
	// Ends first: a waiter parked in FUTEX_WAIT on the shared word must be
	// woken while the word is still shared. A wake on the same address once
	// the mapping is replaced would target a private futex and miss it. A
	// waiter about to park re-checks the closed flag after setting its sleep
	// word, and one whose FUTEX_WAIT comes after the replacement finds the
	// private word at 0, not parked, and returns at once. An end's Close
	// under way in another goroutine has won the ends' own closed flags:
	// their Close here waits for it to finish (endClose), wake-ups included.
	var errs []error
	if prod != nil {
		errs = append(errs, prod.close(false)) // another goroutine may be committing
	}
	if cons != nil {
		errs = append(errs, cons.Close())
	}
	errs = append(errs, r.shm.Close())
	return errors.Join(errs...)
}

// setOwner ties the end to the region it was attached through, so that the
// region, and with it the mapped memory, stays reachable while the end is.
func (p *Producer) setOwner(r *Region) { p.owner = r }

func (c *Consumer) setOwner(r *Region) { c.owner = r }

// wakePeer clears the peer's sleep word and wakes the peer, whatever the word
// said; Close uses it, after storing its closed flag, where the other calls
// use futex.Notify. A Notify in another goroutine (a Flush or Release racing
// with Close) may have cleared the word just before, found the peer parked
// and still have its FUTEX_WAKE to make, which Region.Close may overtake:
// once the mapping is replaced, that wake reaches a private futex and wakes
// nobody, and Notify here would skip its own wake on the cleared word. This
// one is made before the mapping goes, so a peer parked on the shared word is
// woken; one about to park finds the word cleared, or sees the closed flag.
func wakePeer(word *atomic.Uint32) {
	word.Swap(0)
	_, _ = futex.Wake(word, 1)
}

// closedOr returns ErrClosed rather than err, a corruption just seen, once
// the end is closed: after Close the mapping may already be the private zero
// pages that replaced it (Region.Close), and what looks corrupt is the close.
func (p *Producer) closedOr(err error) error {
	if p.closed.Load() {
		return ErrClosed
	}
	return err
}

func (c *Consumer) closedOr(err error) error {
	if c.closed.Load() {
		return ErrClosed
	}
	return err
}
