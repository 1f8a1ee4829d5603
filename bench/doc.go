// Package bench holds the cross-process benchmarks of the data plane, side by
// side with the baselines they are judged against, in one `go test -bench` run:
//
//   - BenchmarkRoundTrip: a 64-byte request echoed by another process, over the
//     ring in spin mode and in park mode, a raw cache-line ping-pong (the
//     hardware limit), a raw futex ping-pong, a Unix socket and a pipe. Each
//     reports p50 and p99 round-trip times in ns.
//   - BenchmarkStream: one-way streaming of 64-byte and 1 KiB messages to
//     another process, over the ring and over a Unix socket, in msgs/s.
//
// The other process is this test binary re-executed. Where the machine has two
// or more CPUs, the benchmarking thread and the peer are pinned to different
// CPUs, the same way for every variant, so the numbers compare like with like.
// The results, the command and the machine are in docs/BENCHMARKS.md.
package bench
