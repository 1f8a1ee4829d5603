package bench

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/klauspost/cpuid/v2"
	"golang.org/x/sys/unix"
)

const helperEnv = "GO_WANT_HELPER_PROCESS"

// peers maps a helper name to the code the child process runs.
var peers = map[string]func() error{}

func TestMain(m *testing.M) {
	if name := os.Getenv(helperEnv); name != "" {
		run, ok := peers[name]
		if !ok {
			fmt.Fprintln(os.Stderr, "unknown helper", name)
			os.Exit(2)
		}
		pin(1)
		if err := run(); err != nil {
			fmt.Fprintf(os.Stderr, "helper %s: %v\n", name, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	flag.Parse()
	if f := flag.Lookup("test.bench"); f != nil && f.Value.String() != "" {
		fmt.Printf("machine: %s, %d CPUs, GOMAXPROCS %d, hypervisor %v; peer pinned to its own CPU: %v\n",
			cpuid.CPU.BrandName, runtime.NumCPU(), runtime.GOMAXPROCS(0), cpuid.CPU.VM(), pinning)
	}
	os.Exit(m.Run())
}

// startPeer re-executes the test binary as the named helper with files as fd
// 3, 4, … and env as extra variables; the child is killed at cleanup.
func startPeer(b *testing.B, name string, files []*os.File, env ...string) *exec.Cmd {
	b.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), append([]string{helperEnv + "=" + name}, env...)...)
	cmd.ExtraFiles = files
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	return cmd
}

func waitPeer(b *testing.B, cmd *exec.Cmd) {
	b.Helper()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			b.Fatalf("peer: %v", err)
		}
	case <-time.After(time.Minute):
		b.Fatal("peer did not finish")
	}
}

func envInt(name string) int {
	v, _ := strconv.Atoi(os.Getenv(name))
	return v
}

// pinning is on where each process can have a CPU of its own, unless
// SYPAS_BENCH_PIN=0.
var pinning = runtime.NumCPU() >= 2 && os.Getenv("SYPAS_BENCH_PIN") != "0"

// pin locks the calling goroutine to its thread and that thread to cpu.
func pin(cpu int) {
	if !pinning {
		return
	}
	runtime.LockOSThread()
	var set unix.CPUSet
	set.Set(cpu)
	_ = unix.SchedSetaffinity(0, &set)
}

func unpin() {
	if !pinning {
		return
	}
	var set unix.CPUSet
	for i := 0; i < runtime.NumCPU(); i++ {
		set.Set(i)
	}
	_ = unix.SchedSetaffinity(0, &set)
	runtime.UnlockOSThread()
}

// latencies records one sample per round trip with a single clock read each,
// so every variant pays the same ~25 ns of timing overhead.
type latencies struct {
	samples []int64
	last    time.Time
}

func newLatencies(n int) *latencies {
	return &latencies{samples: make([]int64, 0, min(n, 1<<22))}
}

func (l *latencies) start() { l.last = time.Now() }

func (l *latencies) mark() {
	now := time.Now()
	if len(l.samples) < cap(l.samples) {
		l.samples = append(l.samples, int64(now.Sub(l.last)))
	}
	l.last = now
}

func (l *latencies) report(b *testing.B) {
	if len(l.samples) == 0 {
		return
	}
	slices.Sort(l.samples)
	q := func(p float64) float64 { return float64(l.samples[int(p*float64(len(l.samples)-1))]) }
	b.ReportMetric(q(0.50), "p50-ns")
	b.ReportMetric(q(0.99), "p99-ns")
}
