// Package frame implements the SYPAS frame: a fixed 48-byte little-endian
// header followed by an optional header extension and a payload. One frame is
// one record of a shared-memory ring, or one unit of a byte stream (Unix
// socket, TCP) when the rings are not available.
//
// The wire format is specified in docs/PROTOCOL.md, section 2. This package
// knows nothing about payload contents; the payload codecs live in package
// sypas.
//
// # Encoding
//
// [Frame.Len] is computable up front, [Frame.Append] appends to a caller's
// slice (quic-go style) and [Frame.EncodeTo] writes into a caller-provided
// slice such as a reserved ring slot. To build a frame fully in place, write
// the payload at slot[HeaderSize:], then [Header.Put] the header and, if
// [FlagChecksum] is set, call [SetChecksum]. None of these allocate.
//
// # Decoding
//
// [Frame.Decode] decodes into a caller-held [Frame] whose Extension and
// Payload fields are views into the caller's buffer. Every header field is
// read from the buffer exactly once into the struct and validated there;
// lengths are never re-read from the buffer after validation, so a hostile
// peer scribbling on shared memory cannot make the decoder read out of
// bounds. Sizes are checked against [Config] limits before anything is
// allocated. [Header.Decode] validates only the fixed header (a few ns).
//
// [Reader] decodes frames from a byte stream with one reused buffer; the
// frame it returns is valid until the next call to [Reader.ReadFrame].
// [Writer] writes one frame per Write call.
//
// All errors wrap the sentinels declared in errors.go and are matched with
// [errors.Is].
package frame
