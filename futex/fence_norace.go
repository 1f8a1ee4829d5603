//go:build !race

package futex

// raceFence is empty: without the race detector, sync/atomic operations are
// sequentially consistent (see fence_race.go).
func raceFence() {}
