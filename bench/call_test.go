package bench

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/sypas/go/control/token"
	"github.com/sypas/go/futex"
	"github.com/sypas/go/internal/affinity"
	"github.com/sypas/go/ring"
	"github.com/sypas/go/sypas"
)

// BenchmarkCall: a Call of the bridge, its body echoed by a kernel in another
// process, in each idle mode, at 64 B and 4 KiB, beside its baselines in the
// same run: the ring's own round trip of the same size in each mode, the raw
// cache-line and futex ping-pongs, and a Unix-socket request/response.
//
// The call variants use CallInto with a buffer of enough capacity (0 allocs
// in the caller) and an Inline handler, except "own" (Call, which allocates
// the reply the caller keeps) and "pool" (a handler on the session's worker
// pool: a goroutine hand-off in the kernel; not pinned). Each also reports
// kernel-allocs/op, the kernel process's heap allocations per call (its
// runtime's count before and after the timed loop, so its background work
// shows up at low b.N). SetBytes is the body both ways.
func BenchmarkCall(b *testing.B) {
	spin, park, auto := futex.Config{Policy: futex.PolicySpin}, futex.Config{Policy: futex.PolicyPark}, futex.Config{}
	for _, size := range []int{64, 4096} {
		sz := sizeName(size)
		for _, m := range []struct {
			name string
			idle futex.Config
		}{{"spin", spin}, {"park", park}, {"default", auto}} {
			pinned := shouldPin(m.idle.Policy != futex.PolicyPark)
			b.Run(m.name+"/"+sz, func(b *testing.B) { benchCall(b, m.idle, pinned, size, callInto) })
			b.Run("ring-"+m.name+"/"+sz, func(b *testing.B) { benchRingRTT(b, m.idle, pinned, size) })
		}
		b.Run("own/"+sz, func(b *testing.B) { benchCall(b, auto, shouldPin(true), size, callOwn) })
		// Unpinned: a kernel process pinned to one CPU would time-slice its
		// spinning reader with the worker it hands the call to.
		b.Run("pool/"+sz, func(b *testing.B) { benchCall(b, auto, false, size, callPool) })
		b.Run("unix-socket/"+sz, func(b *testing.B) { benchUnixRTT(b, size) })
	}
	b.Run("raw-cacheline", benchCacheLineRTT)
	b.Run("raw-futex", benchFutexRTT)
}

// How benchCall calls.
type callKind int

const (
	callInto   callKind = iota // CallInto, Inline handler
	callOwn                    // Call, Inline handler
	callPool                   // CallInto, a handler on the worker pool
	callInline                 // CallInto, Inline handler, frames inline on the socket
)

func init() { peers["sypas-kernel"] = sypasKernel }

// benchKeys signs the tokens of the benchmarks' kernels: the same fixed
// test key in both processes.
func benchKeys() *token.Keyring {
	k := token.NewKeyring()
	k.Add(1, bytes.Repeat([]byte{7}, 32))
	return k
}

// startKernel runs a sypas kernel in a helper process with idle policy
// idle, its whole process pinned to CPU 1 if pinned, and returns its socket
// path.
func startKernel(b *testing.B, idle futex.Config, pinned bool) string {
	path := filepath.Join(b.TempDir(), "k.sock")
	startPeer(b, "sypas-kernel", pinned, nil, "SYPAS_SOCK="+path, fmt.Sprintf("SYPAS_POLICY=%d", idle.Policy))
	return path
}

func dialKernel(b *testing.B, path string, idle futex.Config) *sypas.Client {
	return dialKernelCfg(b, path, idle, false)
}

// dialKernelCfg is dialKernel, with shared memory off (noShm): the frames
// then travel inline on the control socket.
func dialKernelCfg(b *testing.B, path string, idle futex.Config, noShm bool) *sypas.Client {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cfg := sypas.ClientConfig{}
	cfg.NoSharedMemory = noShm
	cfg.Ring = ring.Config{Idle: idle}
	cfg.Logger = slog.New(slog.DiscardHandler)
	c, err := sypas.Dial(ctx, path, cfg)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	return c
}

func benchCall(b *testing.B, idle futex.Config, pinned bool, size int, kind callKind) {
	path := startKernel(b, idle, pinned)
	c := dialKernelCfg(b, path, idle, kind == callInline)
	if info, err := c.Transport(); err != nil || (info.Name == sypas.TransportInline) != (kind == callInline) {
		b.Fatalf("transport %+v, %v", info, err)
	}
	op := "echo"
	if kind == callPool {
		op = "echo.pool"
	}
	call := echoCall(c, op, size)
	if kind == callOwn {
		ctx, msg := context.Background(), make([]byte, size)
		call = func(seq uint64) error {
			binary.LittleEndian.PutUint64(msg, seq)
			out, err := c.Call(ctx, op, msg)
			return checkEcho(seq, out, size, err)
		}
	}
	timeCalls(b, c, pinned, 2*size, call)
}

// echoCall is a call of op on c (CallInto, into a buffer of its own) with a
// size-byte body carrying seq, checked with checkEcho.
func echoCall(c *sypas.Client, op string, size int) func(seq uint64) error {
	ctx := context.Background()
	msg, buf := make([]byte, size), make([]byte, 0, size)
	return func(seq uint64) error {
		binary.LittleEndian.PutUint64(msg, seq)
		out, err := c.CallInto(ctx, op, msg, buf[:0])
		return checkEcho(seq, out, size, err)
	}
}

// checkEcho is err, or an error if out is not the size-byte echo of the
// body of call seq.
func checkEcho(seq uint64, out []byte, size int, err error) error {
	if err == nil && (len(out) != size || binary.LittleEndian.Uint64(out) != seq) {
		err = fmt.Errorf("call %d: a reply of %d bytes for another call", seq, len(out))
	}
	return err
}

// timeCalls times call on c with timeRoundTrips, moving bytes bytes each,
// and reports the kernel's allocations per call. The first call of
// kernelMallocs and the one in timeRoundTrips' warm-up are counted too:
// one each, spread over b.N.
func timeCalls(b *testing.B, c *sypas.Client, pinned bool, bytes int, call func(seq uint64) error) {
	before := kernelMallocs(b, c)
	b.SetBytes(int64(bytes))
	timeRoundTrips(b, pinned, func(seq uint64) {
		if err := call(seq); err != nil {
			b.Fatalf("call %d: %v", seq, err)
		}
	})
	b.ReportMetric(float64(kernelMallocs(b, c)-before)/float64(b.N), "kernel-allocs/op")
}

// kernelMallocs asks the kernel for its process's count of heap
// allocations so far.
func kernelMallocs(b *testing.B, c *sypas.Client) uint64 {
	var buf [8]byte
	out, err := c.CallInto(context.Background(), "bench.mallocs", nil, buf[:0])
	if err != nil || len(out) != 8 {
		b.Fatalf("bench.mallocs: %d bytes, %v", len(out), err)
	}
	return binary.LittleEndian.Uint64(out)
}

// sypasKernel serves on SYPAS_SOCK until killed: "echo" (Inline),
// "echo.pool" (on the worker pool), "sink" and "sink.result" (Send's
// receiver), "bulk.take", "bulk.give" and "bulk.give.copy" (BenchmarkBulk's
// receiver and senders), "bench.mallocs".
func sypasKernel() error {
	// Resolved before GOMAXPROCS changes: one P turns the default spin
	// phase off (futex.Config.Resolved: a peer in this process could not
	// run), but the peer is another process on another CPU, so the
	// kernel's reader waits as the ring benchmarks' peers do.
	idle := futex.Config{Policy: futex.Policy(envInt("SYPAS_POLICY"))}.Resolved()
	if os.Getenv("SYPAS_PEER_PIN") == "1" {
		// The work runs on the session's goroutines: pin every thread, and
		// run one P, as a kernel started pinned (taskset) would: two Ps on
		// one CPU time-slice a spinning reader with whatever else runs.
		if err := affinity.PinProcess(1); err != nil {
			return err
		}
		runtime.GOMAXPROCS(1)
	}
	cfg := sypas.ServerConfig{}
	cfg.Keys = benchKeys()
	cfg.Logger = slog.New(slog.DiscardHandler)
	cfg.Ring = ring.Config{Idle: idle}
	srv, err := sypas.NewServer(cfg)
	if err != nil {
		return err
	}
	echo := func(_ context.Context, r *sypas.Request) ([]byte, error) { return r.Body, nil }
	srv.Handle("echo", sypas.RightRequest, echo, sypas.Inline)
	srv.Handle("echo.pool", sypas.RightRequest, echo)
	srv.Handle("bulk.take", sypas.RightRequest, bulkTake(), sypas.Inline)
	srv.Handle("bulk.give", sypas.RightRequest, bulkGive(true), sypas.Inline)
	srv.Handle("bulk.give.copy", sypas.RightRequest, bulkGive(false), sypas.Inline)
	var mallocs [8]byte
	srv.Handle("bench.mallocs", 0, func(context.Context, *sypas.Request) ([]byte, error) {
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return binary.LittleEndian.AppendUint64(mallocs[:0], ms.Mallocs), nil
	}, sypas.Inline)
	var s sink
	srv.Handle("sink", sypas.RightRequest, s.take, sypas.Inline)
	srv.Handle("sink.result", sypas.RightRequest, s.result, sypas.Inline)
	l, err := listenKernel(os.Getenv("SYPAS_SOCK"))
	if err != nil {
		return err
	}
	return srv.Serve(l)
}

// sink receives a stream of one-way Sends, checking each message's sequence
// number and summing its words as ringSink does. Both of its handlers are
// Inline, so they run one at a time on the sending session's reader, in the
// order the frames were sent: its fields need no lock while one daemon
// sends, and "sink.result" sees every Send made before it.
type sink struct {
	n, sum uint64
	err    error
	out    [16]byte
}

func (s *sink) take(_ context.Context, r *sypas.Request) ([]byte, error) {
	if s.err != nil {
		return nil, nil
	}
	sum, err := sumChecked(r.Body, s.n)
	s.n++
	s.sum += sum
	s.err = err
	return nil, nil
}

// result answers the number of messages taken and their sum, or the first
// error.
func (s *sink) result(context.Context, *sypas.Request) ([]byte, error) {
	if s.err != nil {
		return nil, &sypas.Error{Code: sypas.CodeInternal, Message: s.err.Error()}
	}
	binary.LittleEndian.PutUint64(s.out[:], s.n)
	binary.LittleEndian.PutUint64(s.out[8:], s.sum)
	return s.out[:], nil
}

// sinkResult asks the kernel's sink what it took.
func sinkResult(c *sypas.Client) (n, sum uint64, err error) {
	var buf [16]byte
	out, err := c.CallInto(context.Background(), "sink.result", nil, buf[:0])
	if err != nil {
		return 0, 0, err
	}
	if len(out) != 16 {
		return 0, 0, errors.New("sink.result: short reply")
	}
	return binary.LittleEndian.Uint64(out), binary.LittleEndian.Uint64(out[8:]), nil
}

func sizeName(n int) string {
	if n >= 1024 {
		return fmt.Sprintf("%dKiB", n/1024)
	}
	return fmt.Sprintf("%dB", n)
}
