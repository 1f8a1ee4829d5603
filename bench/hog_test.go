package bench

import (
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/sypas/go/futex"
)

// BenchmarkRoundTripHog is BenchmarkRoundTrip on a busy machine: a third
// process keeps one thread busy for the whole run, and nothing is pinned, so
// the scheduler places the two peers and the hog as it likes. On a 2-CPU host
// this is the common case of a ring sharing the machine with other work.
//
// The hog is a separate process rather than a goroutine locked to a thread of
// the benchmarking process: a goroutine would hold one of this process's
// GOMAXPROCS Ps and be preempted by its runtime, so it would change how the
// benchmark itself is scheduled, not only how busy the machine is.
func BenchmarkRoundTripHog(b *testing.B) {
	auto, park, spin := futex.Config{}, futex.Config{Policy: futex.PolicyPark}, futex.Config{Policy: futex.PolicySpin}
	b.Run("ring-auto", func(b *testing.B) { startHog(b); benchRingRTT(b, auto, false, msgSize) })
	b.Run("ring-park", func(b *testing.B) { startHog(b); benchRingRTT(b, park, false, msgSize) })
	b.Run("ring-spin", func(b *testing.B) { startHog(b); benchRingRTT(b, spin, false, msgSize) })
	b.Run("raw-futex", func(b *testing.B) { startHog(b); benchFutexRTT(b) })
	b.Run("unix-socket", func(b *testing.B) { startHog(b); benchUnixRTT(b, msgSize) })
}

// BenchmarkCallHog is BenchmarkCall at 64 B under the same hog, unpinned: the
// bridge's default idle policy against park mode, on the rings and inline on
// the socket (whose reader polls under the same policy), with the ring's own
// round trip and the raw socket's in both modes beside them.
func BenchmarkCallHog(b *testing.B) {
	auto, park := futex.Config{}, futex.Config{Policy: futex.PolicyPark}
	b.Run("default", func(b *testing.B) { startHog(b); benchCall(b, auto, false, msgSize, callInto) })
	b.Run("park", func(b *testing.B) { startHog(b); benchCall(b, park, false, msgSize, callInto) })
	b.Run("inline-default", func(b *testing.B) { startHog(b); benchCall(b, auto, false, msgSize, callInline) })
	b.Run("inline-park", func(b *testing.B) { startHog(b); benchCall(b, park, false, msgSize, callInline) })
	b.Run("unix-socket", func(b *testing.B) { startHog(b); benchUnixRTT(b, msgSize) })
	b.Run("ring-default", func(b *testing.B) { startHog(b); benchRingRTT(b, auto, false, msgSize) })
	b.Run("ring-park", func(b *testing.B) { startHog(b); benchRingRTT(b, park, false, msgSize) })
}

// BenchmarkRoundTripHogs is BenchmarkRoundTripHog with three busy threads,
// one more than a 2-CPU host has CPUs: each ring process then shares its
// CPU with a thread that never hands it back, whatever the scheduler does.
func BenchmarkRoundTripHogs(b *testing.B) {
	b.Run("ring-auto", func(b *testing.B) { startHogs(b, 3); benchRingRTT(b, futex.Config{}, false, msgSize) })
	b.Run("ring-park", func(b *testing.B) {
		startHogs(b, 3)
		benchRingRTT(b, futex.Config{Policy: futex.PolicyPark}, false, msgSize)
	})
	b.Run("raw-futex", func(b *testing.B) { startHogs(b, 3); benchFutexRTT(b) })
}

func init() { peers["hog"] = hog }

// startHog starts the hog process and returns once it runs; it is killed when
// the benchmark ends.
func startHog(b *testing.B) { startHogs(b, 1) }

// startHogs starts n hog processes, as startHog does one.
func startHogs(b *testing.B, n int) {
	for range n {
		ackR, ackW := ackPipe(b)
		startPeer(b, "hog", false, []*os.File{ackW})
		ackW.Close()
		awaitAck(b, ackR)
	}
}

// hog keeps one thread busy until it is killed, or its parent is gone.
func hog() error {
	runtime.GOMAXPROCS(1)
	parent := os.Getppid()
	if err := writeFull(3, []byte{1}); err != nil {
		return err
	}
	for os.Getppid() == parent {
		for start := time.Now(); time.Since(start) < 10*time.Millisecond; {
		}
	}
	return nil
}
