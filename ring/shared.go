package ring

import (
	"errors"
	"fmt"
	"os"

	"github.com/sypas/sypas/internal/shm"
)

// Region is the memory of one ring in a sealed memfd, mapped into this
// process. The creator passes File to the other process (ExtraFiles, or
// SCM_RIGHTS over the control socket), which maps it with OpenRegion; each side
// then attaches its end with NewProducer or NewConsumer on Bytes.
type Region struct {
	shm      *shm.Region
	capacity int
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

// Bytes is the mapped region, for NewProducer or NewConsumer.
func (r *Region) Bytes() []byte { return r.shm.Bytes() }

// File is the memfd, still owned by the region, to pass to the peer.
func (r *Region) File() *os.File { return r.shm.File() }

// Capacity is the size of the ring's data area.
func (r *Region) Capacity() int { return r.capacity }

// Close unmaps the region and closes the memfd. First close the ring's ends
// and wait until every call on them has returned and no view is in use:
// touching the memory afterwards faults. It is idempotent.
func (r *Region) Close() error { return r.shm.Close() }
