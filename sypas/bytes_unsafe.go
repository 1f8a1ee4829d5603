package sypas

import "unsafe"

// stringBytes is s as a byte slice without a copy, for the encoders that
// only read it (the method of a REQUEST, the topic of a SUBSCRIBE): a
// conversion would allocate on every call. The slice must never be
// written.
func stringBytes(s string) []byte { return unsafe.Slice(unsafe.StringData(s), len(s)) }
