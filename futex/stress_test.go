package futex

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/internal/shm"
)

// Layout of the page shared by TestStressCrossProcess and its helper: one
// 128-byte slot per word, so no two writers share a cache line.
const (
	offHead      = 0 * 128 // items produced; written by the producer (parent)
	offTail      = 1 * 128 // items consumed; written by the consumer (helper)
	offProdSleep = 2 * 128 // producer's sleep word: it parks when the window is full
	offConsSleep = 3 * 128 // consumer's sleep word: it parks when there is nothing to consume
	offConsWakes = 4 * 128 // FUTEX_WAKEs made by the consumer, stored when it is done
	stressSize   = 4096
	helperEnv    = "SYPAS_FUTEX_HELPER"
)

type stressLayout struct {
	head, tail, prodSleep, consSleep, consWakes *atomic.Uint32
}

func layoutOf(mem []byte) stressLayout {
	return stressLayout{
		head:      wordAt(mem, offHead),
		tail:      wordAt(mem, offTail),
		prodSleep: wordAt(mem, offProdSleep),
		consSleep: wordAt(mem, offConsSleep),
		consWakes: wordAt(mem, offConsWakes),
	}
}

// stressParams is what the parent tells the helper, through helperEnv.
type stressParams struct {
	policy Policy
	window uint32
	items  uint32
	seed   uint64
}

func (p stressParams) String() string {
	return fmt.Sprintf("%d,%d,%d,%d", p.policy, p.window, p.items, p.seed)
}

func parseStressParams(s string) (p stressParams, err error) {
	f := strings.Split(s, ",")
	if len(f) != 4 {
		return p, fmt.Errorf("bad %s=%q", helperEnv, s)
	}
	var v [4]uint64
	for i := range f {
		if v[i], err = strconv.ParseUint(f[i], 10, 64); err != nil {
			return p, fmt.Errorf("bad %s=%q: %w", helperEnv, s, err)
		}
	}
	return stressParams{Policy(v[0]), uint32(v[1]), uint32(v[2]), v[3]}, nil
}

// TestStressCrossProcess hands thousands of items from this process to a
// helper process (this test binary re-executed) through a counter in a shared
// memfd page, each side parking on its own sleep word, with random pacing on
// both sides. A lost wake-up shows as both sides stuck; a watchdog then fails
// the test with both sides' state instead of hanging.
//
// SYPAS_STRESS=full runs far more hand-offs (make test does, without -race).
func TestStressCrossProcess(t *testing.T) {
	items := uint32(10_000)
	switch {
	case os.Getenv("SYPAS_STRESS") == "full":
		items = 200_000
	case testing.Short():
		items = 300
	}
	for _, policy := range []Policy{PolicyPark, PolicyAuto} {
		for _, window := range []uint32{1, 16} {
			p := stressParams{policy: policy, window: window, items: items, seed: rand.Uint64()}
			t.Run(fmt.Sprintf("%v/window%d", policy, window), func(t *testing.T) {
				runCrossProcess(t, p)
			})
		}
	}
}

func runCrossProcess(t *testing.T, p stressParams) {
	t.Logf("params %s (policy,window,items,seed)", p)
	region, err := shm.Create("futex-stress", stressSize)
	require.NoError(t, err)
	defer region.Close()
	l := layoutOf(region.Bytes())

	var out bytes.Buffer
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$")
	cmd.Env = append(os.Environ(), "GO_WANT_HELPER_PROCESS=1", helperEnv+"="+p.String(),
		// Under -race, a process sleeps 1 s at exit by default.
		"GORACE="+strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0"))
	cmd.ExtraFiles = []*os.File{region.File()} // fd 3 in the helper
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	require.NoError(t, cmd.Start())
	// exited is closed once the helper has exited and exitErr is set: both
	// this function and the watchdog watch it.
	exited := make(chan struct{})
	var exitErr error
	go func() { exitErr = cmd.Wait(); close(exited) }()
	defer func() {
		_ = cmd.Process.Kill() // no-op once it has exited
		<-exited
	}()

	w := NewWaiter(l.prodSleep, Config{Policy: p.policy})
	defer w.Close()
	// The watchdog reads the shared page: it must be gone before the deferred
	// region.Close unmaps it.
	stop, watchdogDone := make(chan struct{}), make(chan struct{})
	defer func() { close(stop); <-watchdogDone }()
	go func() { defer close(watchdogDone); watchdog(w, l, p, stop, exited) }()

	r := rand.New(rand.NewPCG(p.seed, 1))
	var next uint32
	hasRoom := func() bool { return next-l.tail.Load() <= p.window }
	wakes := 0
	for next = 1; next <= p.items; next++ {
		if err := w.Wait(hasRoom); err != nil {
			if _, ok := err.(helperExited); ok {
				err = fmt.Errorf("%w (%v); helper output:\n%s", err, exitErr, out.String())
			}
			require.NoError(t, err, "producing item %d", next)
		}
		l.head.Store(next)
		if Notify(l.consSleep) {
			wakes++
		}
		pace(r)
	}

	select {
	case <-exited:
		require.NoError(t, exitErr, "helper output:\n%s", out.String())
	case <-time.After(30 * time.Second):
		t.Fatalf("helper did not exit; tail=%d of %d", l.tail.Load(), p.items)
	}
	assert.Equal(t, p.items, l.tail.Load(), "every item consumed")
	t.Logf("FUTEX_WAKEs: producer %d, consumer %d", wakes, l.consWakes.Load())
	if p.policy == PolicyPark {
		// PolicyPark parks on every wait: hand-offs must have gone through the
		// kernel both ways, or this test did not test the sleep words.
		assert.Positive(t, wakes, "producer never woke the consumer")
		assert.Positive(t, l.consWakes.Load(), "consumer never woke the producer")
	}
}

// helperExited is the producer's error when the helper dies before the end.
type helperExited struct{}

func (helperExited) Error() string { return "helper exited early" }

// watchdog interrupts the producer if the helper dies or if neither side
// makes progress for a long time: with no deadlines on either side, that is
// a lost wake-up.
func watchdog(w *Waiter, l stressLayout, p stressParams, stop, exited <-chan struct{}) {
	const stallLimit = 10 * time.Second
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	last, since := l.head.Load()+l.tail.Load(), time.Now()
	for {
		select {
		case <-stop:
			return
		case <-exited:
			if l.tail.Load() != p.items {
				w.Interrupt(helperExited{})
			}
			return
		case <-tick.C:
		}
		if cur := l.head.Load() + l.tail.Load(); cur != last {
			last, since = cur, time.Now()
			continue
		}
		if time.Since(since) < stallLimit {
			continue
		}
		w.Interrupt(fmt.Errorf("watchdog: no progress for %v, lost wake-up? "+
			"head=%d tail=%d window=%d items=%d producer sleep word=%d consumer sleep word=%d",
			stallLimit, l.head.Load(), l.tail.Load(), p.window, p.items, l.prodSleep.Load(), l.consSleep.Load()))
		return
	}
}

// TestHelperProcess is the consumer side of TestStressCrossProcess, run in a
// child process. It does nothing in a normal test run.
func TestHelperProcess(t *testing.T) {
	run := map[string]func() error{"1": consume, "flood": flood}[os.Getenv("GO_WANT_HELPER_PROCESS")]
	if run == nil {
		t.Skip("helper for TestStressCrossProcess and TestWaiterWakeFlood")
	}
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

func consume() error {
	p, err := parseStressParams(os.Getenv(helperEnv))
	if err != nil {
		return err
	}
	region, err := shm.Open(os.NewFile(3, "memfd"), stressSize)
	if err != nil {
		return err
	}
	defer region.Close()
	l := layoutOf(region.Bytes())

	w := NewWaiter(l.consSleep, Config{Policy: p.policy})
	// A backstop in case the parent dies without killing us.
	w.SetDeadline(time.Now().Add(10 * time.Minute))
	r := rand.New(rand.NewPCG(p.seed, 2))
	var next uint32
	hasItem := func() bool { return l.head.Load() >= next }
	var wakes uint32
	for next = 1; next <= p.items; next++ {
		if err := w.Wait(hasItem); err != nil {
			return fmt.Errorf("consuming item %d (head %d): %w", next, l.head.Load(), err)
		}
		if h := l.head.Load(); h < next || h > p.items || h-next >= p.window {
			return fmt.Errorf("item %d: head %d breaks the window %d", next, h, p.window)
		}
		pace(r)
		l.tail.Store(next)
		if Notify(l.prodSleep) {
			wakes++
		}
	}
	l.consWakes.Store(wakes)
	return nil
}
