// Package shm creates and opens sealed memory files (memfd) mapped shared
// between processes.
//
// A region is a memfd sized once and then sealed against shrinking and
// growing: once both processes have mapped it, neither can change its size
// under the other's mapping, so a hostile or buggy peer cannot make the other
// side fault with SIGBUS by truncating the file. The file descriptor is what
// is passed to the peer (exec.Cmd.ExtraFiles or SCM_RIGHTS); Open re-checks
// the seals and the size before mapping anything.
package shm
