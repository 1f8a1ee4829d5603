// Package benchcheck lets a test check what a benchmark reports: a
// benchmark's SetBytes must be the bytes each operation really moves, or its
// MB/s is fiction (a zero-copy decode that aliases a 64 KiB payload is not a
// 10 TB/s copy).
package benchcheck

import (
	"flag"
	"strconv"
	"testing"
)

// MaxBytesPerSecond is more than one core moves through memory (a few tens
// of GB/s to DRAM, a few hundred to L1) by a wide margin: a benchmark
// claiming more counts bytes it did not move.
const MaxBytesPerSecond = 1e12

// Iterations is how many times Plausible runs each benchmark: enough to
// time it, little enough for an ordinary test run.
const Iterations = 1000

// Plausible runs each benchmark Iterations times and fails t if one reports
// more than MaxBytesPerSecond. A loaded machine only lowers the rate, so the
// check cannot fail spuriously. Each benchmark must be a single one, not a
// parent of b.Run sub-benchmarks (testing.Benchmark sums those).
func Plausible(t *testing.T, benches map[string]func(*testing.B)) {
	t.Helper()
	bt := flag.Lookup("test.benchtime")
	old := bt.Value.String()
	if err := bt.Value.Set(strconv.Itoa(Iterations) + "x"); err != nil {
		t.Fatal(err)
	}
	defer bt.Value.Set(old)
	for name, bench := range benches {
		r := testing.Benchmark(bench)
		if r.N == 0 {
			t.Errorf("%s did not run", name)
			continue
		}
		rate := float64(r.Bytes) * float64(r.N) / r.T.Seconds()
		t.Logf("%s: %d B/op, %.3g B/s", name, r.Bytes, rate)
		if rate > MaxBytesPerSecond {
			t.Errorf("%s reports %.3g B/s (SetBytes %d, %d ns/op): more than any core moves; it counts bytes it does not move",
				name, rate, r.Bytes, r.NsPerOp())
		}
	}
}
