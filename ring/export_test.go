package ring

import "unsafe"

// unsafeBytes views an aligned []uint64 as bytes, for tests that need an
// 8-byte aligned region without mmap.
func unsafeBytes(words []uint64) []byte {
	return unsafe.Slice((*byte)(unsafe.Pointer(&words[0])), len(words)*8)
}
