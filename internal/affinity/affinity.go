package affinity

import (
	"os"
	"runtime"
	"strconv"

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

// PinProcess moves every thread of the process to cpu; threads started
// later inherit it. For a helper process whose work runs on goroutines the
// caller does not control (a server's session readers), where Pin would
// pin only the calling thread.
func PinProcess(cpu int) error {
	var set unix.CPUSet
	set.Set(cpu)
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return err
	}
	for _, t := range tasks {
		tid, err := strconv.Atoi(t.Name())
		if err != nil {
			continue
		}
		if err := unix.SchedSetaffinity(tid, &set); err != nil && err != unix.ESRCH {
			return err
		}
	}
	return nil
}
