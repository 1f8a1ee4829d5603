package bench

import (
	"sync/atomic"
	"unsafe"
)

// word views 4 bytes of a shared mapping as an atomic; mem is page-aligned
// (mmap) and stays mapped for the whole benchmark.
func word(mem []byte, off int) *atomic.Uint32 {
	_ = mem[off : off+4]
	return (*atomic.Uint32)(unsafe.Pointer(&mem[off]))
}
