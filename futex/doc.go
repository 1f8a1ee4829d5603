// Package futex blocks and wakes goroutines on 32-bit words in memory shared
// between processes (Linux futexes without FUTEX_PRIVATE_FLAG).
//
// Wait and Wake are the raw operations. Notify and Waiter implement a
// wake-up protocol on one "sleep word" per waiting side that makes the
// notifier's common case — the peer is not asleep — cost a single load, with
// no system call:
//
//   - the waiter, to park, stores 1 in its sleep word, then re-checks its
//     condition, and only then sleeps in FUTEX_WAIT while the word is 1;
//   - the notifier, after publishing its data with an atomic store, loads the
//     word and, if it is not 0, swaps it to 0 and calls FUTEX_WAKE.
//
// This is Dekker's pattern: the waiter stores the flag then loads the data,
// the notifier stores the data then loads the flag. Go's atomics are
// sequentially consistent, so at least one side sees the other's store and no
// wake-up is lost. Both the data store and the condition's load must be
// sync/atomic operations for this to hold.
//
// Under the race detector, sync/atomic Store is only a release store and Load
// only an acquire load, which Dekker's pattern cannot survive; this package
// compensates internally (see raceFence), as long as Notify is called right
// after the data store. The race detector also sees no happens-before edge
// through memory outside the Go heap, such as a mapped region.
//
// The sleep word must be 4-byte aligned (atomic.Uint32 is; a word cast from a
// mapping must sit at an offset that is a multiple of 4) and must stay mapped
// until every Wait on it has returned.
//
// Before parking, a Waiter can spin and then yield the CPU for a bounded time
// (see Config), which catches a busy peer without a system call.
//
// The peer may write anything to the shared word at any time, and queue
// threads of its own on it. A hostile peer can cost extra wake-ups or make a
// Wait sleep until its deadline, but never corrupt a Waiter's state, make it
// panic, or keep it asleep past Close, Interrupt or SetDeadline. Wake-ups that bring neither the
// condition nor progress (which ready reports with Waiter.Progress) are
// slept off after a few, so a peer that wakes us in a loop costs little CPU.
package futex
