package affinity

import (
	"runtime"

	"golang.org/x/sys/unix"
)

// Pin locks the calling goroutine to its thread and the thread to cpu. It
// returns the function that undoes both.
func Pin(cpu int) (unpin func()) {
	runtime.LockOSThread()
	var set unix.CPUSet
	set.Set(cpu)
	_ = unix.SchedSetaffinity(0, &set)
	return func() {
		var all unix.CPUSet
		for i := 0; i < runtime.NumCPU(); i++ {
			all.Set(i)
		}
		_ = unix.SchedSetaffinity(0, &all)
		runtime.UnlockOSThread()
	}
}
