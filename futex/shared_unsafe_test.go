package futex

// Casts into raw memory for tests, kept in one file like the package's own
// unsafe code.

import (
	"fmt"
	"sync/atomic"
	"unsafe"
)

// wordAt returns the 32-bit word at byte offset off of b, which must be in
// range and 4-byte aligned (b from mmap is page-aligned). It is how a ring
// maps its sleep words onto a shared region.
func wordAt(b []byte, off int) *atomic.Uint32 {
	if off < 0 || off+4 > len(b) {
		panic(fmt.Sprintf("wordAt: offset %d out of range [0,%d)", off, len(b)-3))
	}
	p := unsafe.Pointer(&b[off])
	if uintptr(p)%4 != 0 {
		panic(fmt.Sprintf("wordAt: offset %d is misaligned", off))
	}
	return (*atomic.Uint32)(p)
}

// misalignedWord returns a pointer the kernel must refuse (EINVAL). Only the
// kernel dereferences it; the test never does an atomic operation on it.
func misalignedWord(b []byte) *atomic.Uint32 {
	p := unsafe.Pointer(&b[0])
	return (*atomic.Uint32)(unsafe.Add(p, 4-uintptr(p)%4+1))
}
