package futex

import (
	"os"
	"os/exec"
	"runtime"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/sypas/go/internal/shm"
)

// TestWaiterWakeFlood: a peer that clears a parked Waiter's sleep word and
// calls FUTEX_WAKE in a loop, publishing nothing, must cost the Waiter little
// CPU, since wake-ups that bring no progress are slept off. The peer is a
// goroutine or another process; the Waiter runs on a thread of its own, whose
// CPU time is measured over a second. The bound is loose (a fifth of a core)
// and the figure is logged.
func TestWaiterWakeFlood(t *testing.T) {
	for _, p := range []struct {
		name  string
		cfg   Config
		flood func(t *testing.T, page *shm.Region) (stop func())
	}{
		{"goroutine/park", Config{Policy: PolicyPark}, floodGoroutine},
		{"goroutine/auto", Config{}, floodGoroutine},
		{"process/park", Config{Policy: PolicyPark}, floodProcess},
	} {
		t.Run(p.name, func(t *testing.T) {
			region, err := shm.Create("futex-flood", os.Getpagesize())
			require.NoError(t, err)
			defer region.Close()
			word := wordAt(region.Bytes(), 0)
			w := NewWaiter(word, p.cfg)
			stop := p.flood(t, region)
			defer stop()

			type waited struct {
				cpu, wall time.Duration
				err       error
			}
			done := make(chan waited, 1)
			go func() {
				runtime.LockOSThread() // the thread's CPU time is the Waiter's
				defer runtime.UnlockOSThread()
				w.SetDeadline(time.Now().Add(time.Second))
				start, cpu := time.Now(), threadCPU()
				err := w.Wait(never)
				done <- waited{threadCPU() - cpu, time.Since(start), err}
			}()
			r := <-done
			assert.ErrorIs(t, r.err, os.ErrDeadlineExceeded)
			t.Logf("the waiter used %v of CPU in %v (%.1f %% of a core); %d naps",
				r.cpu, r.wall, 100*r.cpu.Seconds()/r.wall.Seconds(), w.Throttled())
			assert.Less(t, r.cpu, r.wall/5, "wake-ups without progress cost the waiter at most a fifth of a core")
		})
	}
}

// threadCPU is the CPU time the calling thread has used.
func threadCPU() time.Duration {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_THREAD_CPUTIME_ID, &ts)
	return time.Duration(ts.Nano())
}

// floodGoroutine floods the word at offset 0 of page from a goroutine.
func floodGoroutine(t *testing.T, page *shm.Region) (stop func()) {
	word := wordAt(page.Bytes(), 0)
	var done atomic.Bool
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		for !done.Load() {
			floodOnce(word)
		}
	}()
	return func() { done.Store(true); <-stopped }
}

// floodProcess floods the word at offset 0 of page from a helper process
// (flood).
func floodProcess(t *testing.T, page *shm.Region) (stop func()) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$")
	cmd.Env = append(os.Environ(), "GO_WANT_HELPER_PROCESS=flood")
	cmd.ExtraFiles = []*os.File{page.File()} // fd 3 in the helper
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	require.NoError(t, cmd.Start())
	return func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }
}

func floodOnce(word *atomic.Uint32) {
	word.Store(awake)
	_, _ = Wake(word, 1)
}

// flood is the helper of floodProcess: it floods the word at offset 0 of the
// page it inherited as fd 3 until it is killed (or a minute has passed).
func flood() error {
	region, err := shm.Open(os.NewFile(3, "memfd"), os.Getpagesize())
	if err != nil {
		return err
	}
	defer region.Close()
	word := wordAt(region.Bytes(), 0)
	for start := time.Now(); time.Since(start) < time.Minute; {
		for range 1000 {
			floodOnce(word)
		}
	}
	return nil
}
