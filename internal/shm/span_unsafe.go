package shm

import (
	"os"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The only unsafe code of the package: a mapping is an address range the
// garbage collector knows nothing about, so its lifetime is managed here by
// hand. Bytes views it as a slice; the slice is valid for as long as the range
// stays mapped, which is until the Region is closed and unreachable (see
// span.release).

// span is the address range of one region's mapping. It is referenced by its
// Region and by the Region's cleanup, never by anything a user holds.
type span struct {
	addr   unsafe.Pointer // start, page-aligned; outside the Go heap
	length uintptr        // whole pages
	closed atomic.Bool    // Close has run: the range may go once the Region is unreachable
}

// mapped counts the spans mapped and not yet unmapped (Mapped).
var mapped atomic.Int64

// mapShared maps size bytes of f shared read-write and returns the span and
// a slice of exactly size bytes over it.
func mapShared(f *os.File, size int) (*span, []byte, error) {
	page := os.Getpagesize()
	length := uintptr((size + page - 1) &^ (page - 1))
	addr, err := unix.MmapPtr(int(f.Fd()), 0, nil, length, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, nil, err
	}
	mapped.Add(1)
	return &span{addr: addr, length: length}, unsafe.Slice((*byte)(addr), size), nil
}

// retire replaces the shared mapping, in one step, by private zero pages
// over the same range (MAP_FIXED: the kernel swaps the mapping under its
// lock, so the range is never unmapped in between). The shared pages are
// released (once the peer lets go of them too); a goroutine still touching
// the range reads zeros and writes to its own private copy, and never
// faults. Neither the peer nor a later region sees those writes.
func (s *span) retire() error {
	s.closed.Store(true)
	_, err := unix.MmapPtr(-1, 0, s.addr, s.length, unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_FIXED|unix.MAP_NORESERVE)
	return err
}

// release unmaps a closed span. It runs as the Region's cleanup, once nothing
// that could touch the range (the Region, ring ends attached through it) is
// reachable any more. A region dropped without Close keeps its mapping: ends
// attached over Bytes alone do not keep the Region reachable, and unmapping
// under them would fault.
func (s *span) release() {
	if s.closed.Load() && unix.MunmapPtr(s.addr, s.length) == nil {
		mapped.Add(-1)
	}
}
