package bulk

import (
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"sync/atomic"

	"github.com/sypas/go/internal/shm"
	"github.com/sypas/go/wire"
)

// PeerRegion is the peer's bulk region as the receiver maps it: the memory
// the peer's descriptors point into. The receiver only reads it; the peer
// owns it and allocates in it.
//
// Everything about it is untrusted. OpenRegion refuses a memfd that the
// peer could shrink under the mapping (SIGBUS) or that is not the size
// announced; View refuses a descriptor that leaves the region. Bytes in a
// view can still change while they are read (the peer writes the region
// whenever it likes): copy before validating (ReadInto).
//
// All methods may be called concurrently, Close included.
type PeerRegion struct {
	shm     *shm.Region
	id      uint32
	size    uint64
	refused atomic.Uint64
}

// OpenRegion maps the bulk region the peer announced with id and size (a
// REGIONS entry of role BULK) and passed as f. It takes ownership of f: on
// failure f is closed. It fails with ErrInvalid for a size that is not a
// whole number of pages up to MaxSize (check the announced size with this
// before trusting it), and with ErrRegion when the memfd is not sealed
// against shrinking and growing or is not exactly size bytes.
func OpenRegion(f *os.File, id uint32, size int) (*PeerRegion, error) {
	if f == nil {
		return nil, fmt.Errorf("%w: open region %d: nil file", ErrInvalid, id)
	}
	if size <= 0 || size%wire.PageSize != 0 || size > MaxSize {
		f.Close()
		return nil, fmt.Errorf("%w: region %d of %d bytes: want a multiple of %d up to %d",
			ErrInvalid, id, size, wire.PageSize, MaxSize)
	}
	m, err := shm.Open(f, size)
	if errors.Is(err, shm.ErrNotSealed) || errors.Is(err, shm.ErrSize) {
		return nil, fmt.Errorf("%w: region %d: %w", ErrRegion, id, err)
	}
	if err != nil {
		return nil, fmt.Errorf("bulk: region %d: %w", id, err)
	}
	return &PeerRegion{shm: m, id: id, size: uint64(size)}, nil
}

// ID is the region id descriptors must name.
func (p *PeerRegion) ID() uint32 { return p.id }

// Size is the region's size in bytes.
func (p *PeerRegion) Size() int { return int(p.size) }

// View returns the span a descriptor names, in place: no copy. d is the
// receiver's private copy of a BULK payload (decoded once by wire.Bulk):
// View checks it against the region (its id, and offset+length within the
// region's size, computed without overflow) and fails with ErrDescriptor
// otherwise; it never returns a slice outside the region.
//
// Lifetime: the view is valid until the span is released, i.e. until the
// BULK frame with flag ACK for it is sent; after that the peer may give the
// memory to another payload. Until then, too, the peer can rewrite any of
// its bytes, at any moment: parse or check a private copy (ReadInto), not
// the view, and never read a length or an offset from the view twice. A
// view taken before Close stays safe to touch while the PeerRegion is
// reachable, but then reads zeros. View allocates nothing.
func (p *PeerRegion) View(d *wire.Bulk) ([]byte, error) {
	mem := p.shm.Bytes()
	switch {
	case mem == nil:
		return nil, fmt.Errorf("bulk: view: region %w", ErrClosed)
	case d.Region != p.id:
		p.refused.Add(1)
		return nil, fmt.Errorf("%w: names region %d, this is region %d", ErrDescriptor, d.Region, p.id)
	case d.Length == 0 || d.Offset > p.size || d.Length > p.size-d.Offset:
		p.refused.Add(1)
		return nil, fmt.Errorf("%w: span %d+%d outside region %d of %d bytes",
			ErrDescriptor, d.Offset, d.Length, p.id, p.size)
	}
	end := d.Offset + d.Length
	return mem[d.Offset:end:end], nil
}

// ReadInto copies the span d names into dst, the copying variant of View:
// the copy is private, so what is checked in it stays checked. If d carries
// a checksum (wire.BulkChecksum) it is verified on the copy, and a mismatch
// fails with ErrChecksum (the copy is still in dst[:n]). A dst shorter than
// the span fails with io.ErrShortBuffer and copies nothing. The span may be
// released as soon as ReadInto returns.
func (p *PeerRegion) ReadInto(dst []byte, d *wire.Bulk) (int, error) {
	v, err := p.View(d)
	if err != nil {
		return 0, err
	}
	if len(dst) < len(v) {
		return 0, fmt.Errorf("bulk: span of %d bytes into %d: %w", len(v), len(dst), io.ErrShortBuffer)
	}
	n := copy(dst, v)
	if d.Flags&wire.BulkChecksum != 0 {
		if sum := crc32.Checksum(dst[:n], castagnoli); sum != d.Checksum {
			return n, fmt.Errorf("%w: span %d+%d has CRC32C %#08x, descriptor says %#08x",
				ErrChecksum, d.Offset, d.Length, sum, d.Checksum)
		}
	}
	return n, nil
}

// Refused counts the descriptors View refused (ErrDescriptor).
func (p *PeerRegion) Refused() uint64 { return p.refused.Load() }

// Close unmaps the region (swapping the mapping for private zero pages, so
// views still in use never fault; see internal/shm) and closes the memfd.
// Later Views fail with ErrClosed. Close is idempotent.
func (p *PeerRegion) Close() error { return p.shm.Close() }
