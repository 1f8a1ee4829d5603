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

	"github.com/sypas/go/internal/affinity"
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
		if os.Getenv("SYPAS_PEER_PIN") == "1" {
			affinity.Pin(1)
		}
		if err := run(); err != nil {
			fmt.Fprintf(os.Stderr, "helper %s: %v\n", name, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	flag.Parse()
	if f := flag.Lookup("test.bench"); f != nil && f.Value.String() != "" {
		mode := pinMode
		if mode == "" {
			mode = "auto (busy-polling variants only)"
		}
		fmt.Printf("machine: %s, %d CPUs, GOMAXPROCS %d, hypervisor %v; pinning to separate CPUs: %s\n",
			cpuid.CPU.BrandName, runtime.NumCPU(), runtime.GOMAXPROCS(0), cpuid.CPU.VM(), mode)
	}
	os.Exit(m.Run())
}

// startPeer re-executes the test binary as the named helper with files as fd
// 3, 4, … and env as extra variables, pinned to CPU 1 if pinned; the child is
// killed at cleanup.
func startPeer(b *testing.B, name string, pinned bool, files []*os.File, env ...string) *exec.Cmd {
	b.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	peerPin := "SYPAS_PEER_PIN=0"
	if pinned {
		peerPin = "SYPAS_PEER_PIN=1"
	}
	cmd.Env = append(os.Environ(), append([]string{helperEnv + "=" + name, peerPin}, env...)...)
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

// pinMode decides which variants pin the benchmarking thread and the peer's
// to separate CPUs: by default ("auto") those that busy-poll, which is how
// busy-polling is deployed, and not those that sleep, which on a VM would pay
// for waking a halted vCPU on every hand-off. SYPAS_BENCH_PIN=1 pins every
// variant, 0 none. Pinning needs two CPUs.
var pinMode = os.Getenv("SYPAS_BENCH_PIN")

func shouldPin(busyPolls bool) bool {
	if runtime.NumCPU() < 2 {
		return false
	}
	switch pinMode {
	case "0":
		return false
	case "1":
		return true
	}
	return busyPolls
}

// socketPair returns our end of a connected Unix stream socket pair, closed
// when the benchmark ends, and the peer's end, for startPeer.
func socketPair(b *testing.B) (mine int, theirs *os.File) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { unix.Close(fds[0]) })
	return fds[0], os.NewFile(uintptr(fds[1]), "theirs")
}

// pinSelf pins the benchmarking goroutine if pinned and returns the function
// that undoes it and records the choice next to the results (after the timed
// loop: ResetTimer clears metrics reported before it).
func pinSelf(b *testing.B, pinned bool) func() {
	unpin := func() {}
	if pinned {
		unpin = affinity.Pin(0)
	}
	return func() {
		unpin()
		b.ReportMetric(map[bool]float64{false: 0, true: 1}[pinned], "pinned")
	}
}

// timeRoundTrips runs roundTrip once to know the peer is up, then b.N times
// under the timer, one latency sample each, and reports p50 and p99.
func timeRoundTrips(b *testing.B, pinned bool, roundTrip func(seq uint64)) {
	defer pinSelf(b, pinned)()
	roundTrip(0)
	lat := newLatencies(b.N)
	b.ReportAllocs()
	b.ResetTimer()
	lat.start()
	for i := 0; i < b.N; i++ {
		roundTrip(uint64(i + 1))
		lat.mark()
	}
	b.StopTimer()
	lat.report(b)
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
