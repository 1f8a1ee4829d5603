package ring

import (
	"sync/atomic"
	"unsafe"
)

// The only casts in the package: typed atomics over fixed, 8-byte aligned
// offsets of the region. They are safe because the caller keeps mem alive and
// mapped for the lifetime of the endpoint (documented on NewProducer and
// NewConsumer), every offset is a constant below DataOffset, and alignedForAtomics
// has checked the base address.

func alignedForAtomics(mem []byte) bool {
	return len(mem) > 0 && uintptr(unsafe.Pointer(&mem[0]))%8 == 0
}

func u64At(mem []byte, off int) *atomic.Uint64 {
	_ = mem[off : off+8] // bounds check without a read (the race detector would see one)
	return (*atomic.Uint64)(unsafe.Pointer(&mem[off]))
}

func u32At(mem []byte, off int) *atomic.Uint32 {
	_ = mem[off : off+4]
	return (*atomic.Uint32)(unsafe.Pointer(&mem[off]))
}
