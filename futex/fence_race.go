//go:build race

package futex

// raceFence restores the store→load ordering the sleep-word protocol needs
// when the race detector is on. There, sync/atomic Store is only a release
// store and Load only an acquire load (ThreadSanitizer's Go interface uses
// mo_release/mo_acquire, e.g. a plain MOV on amd64 instead of XCHG), so a
// notifier's "store data, load word" could be reordered and a wake-up lost.
// Without the race detector Go's atomics are sequentially consistent and
// raceFence is empty.
func raceFence() { fullFence() }
