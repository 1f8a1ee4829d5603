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
// # Closing
//
// Ends attached through a [Region] (its NewProducer and NewConsumer methods)
// make closing safe at any time, from any goroutine: [Region.Close] closes
// them, which wakes their waiting calls, and the calls in flight in other
// goroutines, as well as every later call, return an error matching
// [ErrClosed] (a call that already had its result may still return it). The
// region's shared memory is then swapped, in one step, for private zero
// pages at the same addresses, which are unmapped only once neither the region
// nor an end attached through it is reachable: a goroutine still inside a
// call, or still reading a view or filling a reservation, touches memory that
// is meaningless but mapped, and never faults. A view stays safe to touch for
// as long as the end that returned it (or the region, or the
// control.Session that owns it) is reachable: a view alone does not keep the
// memory mapped, so code that reads a view after its last use of the end
// keeps the end alive until then (runtime.KeepAlive).
//
// Ends made with [NewProducer] and [NewConsumer] over memory the caller
// manages keep the plain contract: close them, and let every call on them
// return, before that memory goes.
//
// # Waiting
//
// A consumer with nothing to read, or a producer with no room, waits with the
// idle strategy of package futex: spin, then yield, then park on a futex with a
// sleeping flag re-checked after it is set, so a notifier makes a FUTEX_WAKE
// system call only when its peer is really parked. While both sides are busy no
// system call is made and nothing is allocated.
package ring
