package fuzz

import "unsafe"

// asBytes views words as bytes: an 8-byte aligned region without mmap.
func asBytes(words []uint64) []byte {
	return unsafe.Slice((*byte)(unsafe.Pointer(&words[0])), len(words)*8)
}

// within reports whether v lies inside area (an empty v anywhere in or at the
// end of area counts).
func within(v, area []byte) bool {
	if len(area) == 0 {
		return len(v) == 0
	}
	lo := uintptr(unsafe.Pointer(unsafe.SliceData(area)))
	hi := lo + uintptr(len(area))
	p := uintptr(unsafe.Pointer(unsafe.SliceData(v)))
	return p >= lo && p+uintptr(len(v)) <= hi
}
