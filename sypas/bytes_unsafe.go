package sypas

import "unsafe"

// stringBytes is s as a byte slice without a copy, for the encoders that
// only read it (the method of a REQUEST, the topic of a SUBSCRIBE): a
// conversion would allocate on every call. The slice must never be
// written.
func stringBytes(s string) []byte { return unsafe.Slice(unsafe.StringData(s), len(s)) }

// overlaps reports whether a and b share memory: a handler's reply that is
// (part of) its request body, when that body is a bulk span about to be
// released. Comparing addresses reads no memory.
func overlaps(a, b []byte) bool {
	if len(a) == 0 || len(b) == 0 {
		return false
	}
	pa, pb := uintptr(unsafe.Pointer(unsafe.SliceData(a))), uintptr(unsafe.Pointer(unsafe.SliceData(b)))
	return pa < pb+uintptr(len(b)) && pb < pa+uintptr(len(a))
}
