// Package ring is a lock-free single-producer/single-consumer ring of
// variable-length records over any []byte: a plain slice in one process, or a
// sealed memfd region shared by two processes.
//
// # Layout
//
// The region starts with a 128-byte header (magic, layout version, capacity),
// then a 128-byte producer control slot and a 128-byte consumer control slot,
// then a power-of-two data area. The exact byte layout is in docs/PROTOCOL.md
// ("Shared-memory layout"). Offsets are fixed constants, never a detected cache
// line size, so two processes always agree on them.
//
// # Ownership
//
// Each word of the region has one writer:
//
//   - header: written once by [Init], before either side attaches; read once by
//     each side at attach time into private copies.
//   - producer slot: tail and the producer's closed flag are written only by the
//     producer. The producer's sleep word is set (and cleared again) by the
//     producer around parking, and cleared by the consumer when it wakes it.
//   - consumer slot: the same, mirrored: head and closed by the consumer, the
//     consumer's sleep word set by the consumer and cleared by the producer.
//   - data bytes in [head, tail) belong to the consumer; all others to the
//     producer. Records are published by the tail store and handed back by the
//     head store; nothing else moves ownership.
//
// Indices are free-running 64-bit byte offsets; each side caches the other's
// index and reloads it only when its cached copy says it must wait.
//
// # Hot loops
//
// Across processes a streaming producer is bound by its store buffer: each
// record's stores wait for cache lines the consumer last held, so every extra
// store (a call's return address, a saved frame pointer) leaves fewer lines in
// flight. [Producer.TryReserve] and [Producer.Commit] therefore inline into the
// caller, and one [Producer.Flush] (whose index store is also a full barrier)
// per batch of records publishes them all. See [Producer.TryReserve] for the
// idiom, and docs/BENCHMARKS.md for what each step is worth.
//
// # A hostile peer
//
// The peer may write anything, at any time, to any byte of a shared region.
// Every value the peer controls (its index, record headers, the header) is read
// once into a private copy, validated and clamped before use. A violation is
// reported as an error matching [ErrCorrupt] and sticks: the endpoint never
// panics, never reads outside the region and never loops without bound.
// Payload views still point into shared memory, so their bytes may change under
// the reader; decode them once (the frame decoder does).
//
// # Waiting
//
// A consumer with nothing to read, or a producer with no room, waits with the
// idle strategy of package futex: spin, then yield, then park on a futex with a
// sleeping flag re-checked after it is set, so a notifier makes a FUTEX_WAKE
// system call only when its peer is really parked. While both sides are busy no
// system call is made and nothing is allocated.
package ring
