// Package bench holds the cross-process benchmarks of the data plane, side by
// side with the baselines they are judged against, in one `go test -bench` run:
//
//   - BenchmarkRoundTrip: a 64-byte request echoed by another process, over the
//     ring in spin, park and auto (default) mode, a raw cache-line ping-pong
//     (the hardware limit), a raw futex ping-pong, a Unix socket and a pipe.
//     Each reports p50 and p99 round-trip times in ns.
//   - BenchmarkRoundTripHog: the same for the ring's three modes, the raw futex
//     and the socket, unpinned, with a third process keeping one thread busy;
//     BenchmarkRoundTripHogs for the ring's auto and park modes and the raw
//     futex with three such processes, more busy threads than a 2-CPU host has
//     CPUs.
//   - BenchmarkStream: one-way streaming of 64-byte and 1 KiB messages to
//     another process, in msgs/s: over the ring with a Flush per message,
//     with TryReserve/Commit and a Flush every 16 or 64 messages, and with
//     Reserve/Commit and a Flush every 64; and over a Unix socket. The peer
//     checks each message's sequence number and sums every byte it receives,
//     reading the ring in place, or copying out with Next and copy, or with
//     ReadInto; the sum must match what was sent.
//
// The bridge (package sypas), each beside its baselines:
//
//   - BenchmarkCall: a Call's round trip through a kernel in another process,
//     in spin, park and default mode at 64 B and 4 KiB, beside the ring's own
//     round trip of the same size and mode, the raw ping-pongs and a Unix
//     socket; Call (the reply allocated) and a handler on the worker pool at
//     the default; allocations in the caller and in the kernel per call.
//   - BenchmarkCallsInFlight: calls/s with 1, 8 and 64 goroutines calling at
//     once, over the rings, inline on the control socket and on TCP with
//     TLS, against one Unix-socket connection carrying tagged requests with
//     the same concurrency, and against goroutines of one process calling
//     through channels (go-chan: no IPC, the floor of any client whose
//     callers block).
//   - BenchmarkCallInline: the Call round trip with the frames inline on the
//     control socket (shared memory off), beside a raw Unix socket, a Unix
//     socket through Go's poller and the Call on the rings.
//   - BenchmarkCallTCP: the Call round trip over TCP loopback with TLS 1.3
//     and client certificates (the kernel in another process, the TLS
//     material made for the run), beside the same Call on plain TCP, a
//     raw request/response through net.TCPConn (go-tcp), the Call inline
//     on the Unix socket and on the rings, at 64 B and 4 KiB; calls in
//     flight over TLS are BenchmarkCallsInFlight's sypas-tls.
//   - BenchmarkSend: one-way Sends, checked and summed by the kernel, beside
//     the ring stream with a Flush per message and a Unix-socket stream.
//   - BenchmarkPublish: events/s delivered to 1 and 8 subscribers, each
//     checking order and bodies.
//   - BenchmarkCallHog: the Call round trip under the hog, default vs park.
//   - BenchmarkGRPC and BenchmarkGRPCInFlight: the Call round trip at 64 B
//     and 4 KiB, and calls/s with 1 and 64 in flight, over gRPC with
//     mutual TLS on loopback (package sypasgrpc): our Client on the
//     Session stream, beside grpc-go's own unary call of a BytesValue echo
//     (the baseline), the service's unary Call as a stock client calls it,
//     and (round trip only) a plain grpc-go bidirectional stream's echo.
//   - BenchmarkBulk: a Call with a 1, 16 or 64 MiB body in a bulk span,
//     zero-copy (AllocSpan, CallSpan) and copying (the body copied into the
//     span), beside memcpy of the same size in one process and a Unix
//     socket moving the same bytes to another process.
//
// The other process is this test binary re-executed. Where the machine has two
// or more CPUs, variants that busy-poll (the ring in spin and auto mode, the
// raw cache-line ping-pong, the ring streams) pin the benchmarking thread and
// the peer to different CPUs, as busy-polling is deployed; variants that sleep
// (the ring in park mode, the raw futex, the socket and the pipe) do not,
// since on a VM every hand-off would then wake a halted vCPU. So each ratio
// the project targets compares like with like; every result line reports
// "pinned" 1 or 0, and SYPAS_BENCH_PIN=1 or 0 pins all variants or none. The
// first line of output names the machine. The results, the command and the
// machine are in docs/BENCHMARKS.md.
package bench
