package futex

// This file holds the raw futex system calls. It is the only file of the
// package that imports unsafe: the address of the word must be passed to the
// kernel as a uintptr, converted inside the call expression so the pointer
// stays alive for the duration of the call.

import (
	"fmt"
	"os"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Futex operations from <linux/futex.h>. FUTEX_PRIVATE_FLAG (128) is
// deliberately absent: the word is shared between processes, and a private
// futex is keyed by the address space, so the peer's wake would never reach us.
const (
	futexWait = 0 // FUTEX_WAIT
	futexWake = 1 // FUTEX_WAKE
)

// Wait blocks while *addr == val, for at most timeout (timeout < 0 means no
// limit). It returns nil on a wake-up, when *addr already differed from val
// (EAGAIN) and when interrupted by a signal (EINTR): callers re-check their
// condition, and spurious returns are normal. It returns
// os.ErrDeadlineExceeded when the timeout expires. addr must be 4-byte
// aligned (atomic.Uint32 is).
func Wait(addr *atomic.Uint32, val uint32, timeout time.Duration) error {
	var ts unix.Timespec // relative timeout, CLOCK_MONOTONIC
	var tsp *unix.Timespec
	if timeout >= 0 {
		ts = unix.NsecToTimespec(int64(timeout))
		tsp = &ts
	}
	// Syscall6, not RawSyscall6: the call blocks, and the runtime must be able
	// to hand this thread's P to another goroutine meanwhile.
	_, _, errno := unix.Syscall6(unix.SYS_FUTEX, uintptr(unsafe.Pointer(addr)),
		futexWait, uintptr(val), uintptr(unsafe.Pointer(tsp)), 0, 0)
	switch errno {
	case 0, unix.EAGAIN, unix.EINTR:
		return nil
	case unix.ETIMEDOUT:
		return os.ErrDeadlineExceeded
	default:
		return fmt.Errorf("futex: wait: %w", errno)
	}
}

// Wake wakes up to n goroutines or threads, in any process, waiting on addr.
// It returns how many it woke.
func Wake(addr *atomic.Uint32, n int) (int, error) {
	// FUTEX_WAKE never blocks, so the cheaper RawSyscall6 is enough.
	r, _, errno := unix.RawSyscall6(unix.SYS_FUTEX, uintptr(unsafe.Pointer(addr)),
		futexWake, uintptr(n), 0, 0, 0)
	if errno != 0 {
		return 0, fmt.Errorf("futex: wake: %w", errno)
	}
	return int(r), nil
}

// osYield gives the CPU to another runnable thread, of any process, if there
// is one (sched_yield). runtime.Gosched would only let other goroutines of
// this process run.
func osYield() {
	unix.RawSyscall(unix.SYS_SCHED_YIELD, 0, 0, 0)
}
