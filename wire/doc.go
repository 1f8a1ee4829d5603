// Package wire holds the SYPAS message layer: the payload codecs of every
// frame type (messages.go) and the protocol error codes with their retry
// classes (errors.go). It sits below package control, which speaks the
// control plane with it; applications use package sypas, which re-exports
// the error codes and sentinels.
//
// Every payload type implements [Message]: Len, Append (append-style, no
// allocation when the slice has room) and Decode (zero-copy: byte fields
// are views into the payload, validated for length before use, never
// panicking on any input). Payload layouts, limits and the per-message rule
// for trailing bytes are specified in docs/PROTOCOL.md, section 3.
//
// Decoded views share the lifetime of the frame payload they were decoded
// from: for a frame read by a frame.Reader, until its next ReadFrame; for a
// ring record, until the record is released. When the payload lives in
// shared memory, the peer can change the bytes under a view at any time:
// numbers and lengths decoded into the struct are private copies and stay
// valid, but the contents of Method, Topic, Body, ... must be copied before
// they are validated and acted on if that matters.
//
// Errors: a protocol error is a [Code] (E_AUTH, E_RESOURCE, ...) with a
// [RetryClass]; [Error] carries a code as a Go error that matches the
// sentinels [ErrAuth], [ErrResource], ... with errors.Is. Malformed payloads
// fail with errors wrapping [ErrMalformed].
package wire
