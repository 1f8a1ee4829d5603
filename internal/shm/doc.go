// Package shm creates and opens sealed memory files (memfd) mapped shared
// between processes.
//
// A region is a memfd sized once and then sealed against shrinking and
// growing: once both processes have mapped it, neither can change its size
// under the other's mapping, so a hostile or buggy peer cannot make the other
// side fault with SIGBUS by truncating the file. The file descriptor is what
// is passed to the peer (exec.Cmd.ExtraFiles or SCM_RIGHTS); Open re-checks
// the seals and the size before mapping anything.
//
// Close never unmaps memory that a goroutine may still touch: it swaps the
// shared mapping for private zero pages at the same addresses in one step
// (mmap MAP_FIXED), which releases the shared memory at once, and unmaps
// those addresses only when the Region is unreachable (a cleanup). Ring ends
// attached through a ring.Region keep it reachable.
package shm
