package bench

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sypas/go/futex"
	"github.com/sypas/go/sypas"
)

// BenchmarkCallsInFlight: calls/s with 1, 8 and 64 goroutines of one daemon
// calling at once, 64-byte bodies echoed by another process, over the bridge
// (CallInto, an Inline handler, the default idle policy; "sypas-inline" with
// the frames inline on the control socket) and over one Unix
// socket with the same concurrency (sockClient). Nothing is pinned: the
// callers are goroutines the runtime places. Each reports calls/s and the
// p50/p99 of one call as its goroutine saw it. "unix-socket-unbatched" is
// the socket client with one write(2) per request (net/rpc's way), for
// comparison with the batching one, which is the baseline of the target.
// "go-chan" is no IPC at all: the callers hand each call to an echoing
// goroutine of their own process over a channel and wait for the reply on
// one of their own, the least a call costs once goroutines must hand it
// over and wait: the bound on calls/s of any Go client whose callers block.
func BenchmarkCallsInFlight(b *testing.B) {
	for _, n := range []int{1, 8, 64} {
		b.Run(fmt.Sprintf("sypas/%d", n), func(b *testing.B) { benchCallsInFlight(b, n, false) })
		b.Run(fmt.Sprintf("sypas-inline/%d", n), func(b *testing.B) { benchCallsInFlight(b, n, true) })
		b.Run(fmt.Sprintf("sypas-tls/%d", n), func(b *testing.B) { benchCallsInFlightNet(b, n, true) })
		b.Run(fmt.Sprintf("sypas-tcp/%d", n), func(b *testing.B) { benchCallsInFlightNet(b, n, false) })
		b.Run(fmt.Sprintf("unix-socket/%d", n), func(b *testing.B) { benchSocketInFlight(b, n, true) })
		b.Run(fmt.Sprintf("unix-socket-unbatched/%d", n), func(b *testing.B) { benchSocketInFlight(b, n, false) })
		b.Run(fmt.Sprintf("go-chan/%d", n), func(b *testing.B) { benchChanInFlight(b, n) })
	}
}

// benchChanInFlight: callers goroutines call an echoing goroutine of this
// process through channels (chanCall).
func benchChanInFlight(b *testing.B, callers int) {
	in := make(chan *chanCall, callers)
	defer close(in)
	go func() {
		for c := range in {
			c.reply = append(c.reply[:0], c.body...)
			c.done <- struct{}{}
		}
	}()
	runInFlight(b, callers, func(g int) func(seq uint64) error {
		c := &chanCall{body: make([]byte, msgSize), reply: make([]byte, 0, msgSize), done: make(chan struct{}, 1)}
		return func(seq uint64) error {
			binary.LittleEndian.PutUint64(c.body, seq)
			in <- c
			<-c.done
			if len(c.reply) != msgSize || binary.LittleEndian.Uint64(c.reply) != seq {
				return fmt.Errorf("call %d: a reply of %d bytes for another call", seq, len(c.reply))
			}
			return nil
		}
	})
}

// chanCall is one caller's call to the echoing goroutine.
type chanCall struct {
	body, reply []byte
	done        chan struct{}
}

// benchCallsInFlight: inline puts the frames on the control socket
// (shared memory off in the daemon), the fallback transport.
func benchCallsInFlight(b *testing.B, callers int, inline bool) {
	idle := futex.Config{}
	callsInFlight(b, dialKernelCfg(b, startKernel(b, idle, false), idle, inline), callers)
}

// callsInFlight runs runInFlight with CallInto of msgSize bytes on c.
func callsInFlight(b *testing.B, c *sypas.Client, callers int) {
	runInFlight(b, callers, func(int) func(seq uint64) error { return echoCall(c, "echo", msgSize) })
}

// runInFlight makes b.N calls from callers goroutines at once, each call
// made by call(g) of goroutine g with a sequence number unique in the run.
// It reports calls/s and the p50/p99 of one call.
func runInFlight(b *testing.B, callers int, call func(g int) func(seq uint64) error) {
	calls := make([]func(uint64) error, callers)
	for g := range calls {
		calls[g] = call(g)
		if err := calls[g](uint64(1 << 40)); err != nil { // warm up each caller
			b.Fatal(err)
		}
	}
	var next atomic.Int64
	lat := make([]int64, b.N) // by sequence number
	errs := make(chan error, callers)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for g := range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			for {
				seq := next.Add(1) - 1
				if seq >= int64(b.N) {
					return
				}
				t := time.Now()
				if err := calls[g](uint64(seq)); err != nil {
					errs <- err
					return
				}
				lat[seq] = int64(time.Since(t))
			}
		}()
	}
	b.ReportAllocs()
	b.ResetTimer()
	close(start)
	wg.Wait()
	b.StopTimer()
	close(errs)
	for err := range errs {
		b.Fatal(err)
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "calls/s")
	(&latencies{samples: lat}).report(b)
}

// The Unix-socket baseline for concurrent callers is the usual shape of a
// request/response client on one connection (net/rpc's, say): requests
// tagged with the caller's id, written by the callers themselves under a
// mutex, and one reader goroutine matching each response to its caller and
// waking it. It gets the bridge's own batching: a caller that sees others
// waiting for the mutex leaves its write to the last of them, so callers
// arriving together share one write(2), as they share one ring index store.
// The server (sockEcho) reads what has arrived, up to 256 KiB, and echoes
// every whole request in it with one write(2). The client's socket is a
// net.Conn, on the runtime's poller: with goroutines waiting on it, that
// measured faster here than blocking read(2) and write(2) (458 K against
// 237 K calls/s with 64 in flight; 26 K against 18 K with one), which hold
// a thread and its P in the kernel until sysmon takes the P back. With one
// caller, the single-goroutine round trip of BenchmarkCall/unix-socket is the
// faster shape.
//
// A message is the caller's id (4 bytes), the body's length (4 bytes) and
// the body.
const sockHeader = 8

type sockClient struct {
	conn    net.Conn
	batch   bool // leave the write to a caller waiting for the mutex
	mu      sync.Mutex
	waiting atomic.Int32
	out     []byte        // under mu: requests not yet written
	wake    []chan []byte // caller g's reply, from the reader
	replies [][]byte      // the reader's: caller g's reply, valid until g's next call
}

func benchSocketInFlight(b *testing.B, callers int, batch bool) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		b.Fatal(err)
	}
	mine, theirs := os.NewFile(uintptr(fds[0]), "mine"), os.NewFile(uintptr(fds[1]), "theirs")
	cmd := startPeer(b, "sock-echo", false, []*os.File{theirs})
	theirs.Close()
	conn, err := net.FileConn(mine) // a dup, non-blocking, on the runtime's poller
	mine.Close()
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	c := &sockClient{conn: conn, batch: batch, wake: make([]chan []byte, callers), replies: make([][]byte, callers)}
	for g := range c.wake {
		c.wake[g] = make(chan []byte, 1)
	}
	readErr := make(chan error, 1)
	go func() { readErr <- c.read() }()
	runInFlight(b, callers, func(g int) func(seq uint64) error {
		msg := make([]byte, msgSize)
		return func(seq uint64) error {
			binary.LittleEndian.PutUint64(msg, seq)
			out, err := c.call(g, msg)
			return checkEcho(seq, out, msgSize, err)
		}
	})
	conn.(*net.UnixConn).CloseWrite()
	waitPeer(b, cmd)
	if err := <-readErr; !errors.Is(err, io.EOF) {
		b.Fatalf("reader: %v", err)
	}
}

// call sends body as caller g's request and returns the reply, valid until
// g's next call.
func (c *sockClient) call(g int, body []byte) ([]byte, error) {
	c.waiting.Add(1)
	c.mu.Lock()
	c.waiting.Add(-1)
	c.out = binary.LittleEndian.AppendUint32(c.out, uint32(g))
	c.out = binary.LittleEndian.AppendUint32(c.out, uint32(len(body)))
	c.out = append(c.out, body...)
	var err error
	if !c.batch || c.waiting.Load() == 0 { // else the last waiter writes for us all
		_, err = c.conn.Write(c.out)
		c.out = c.out[:0]
	}
	c.mu.Unlock()
	if err != nil {
		return nil, err
	}
	r, ok := <-c.wake[g]
	if !ok {
		return nil, io.ErrUnexpectedEOF
	}
	return r, nil
}

// read delivers responses to their callers until the socket ends.
func (c *sockClient) read() error {
	defer func() {
		for _, w := range c.wake {
			close(w)
		}
	}()
	buf := make([]byte, 1<<18)
	have := 0
	for {
		n, err := c.conn.Read(buf[have:])
		if err != nil {
			return err
		}
		have += n
		p := buf[:have]
		for len(p) >= sockHeader {
			g, n := binary.LittleEndian.Uint32(p), int(binary.LittleEndian.Uint32(p[4:]))
			if len(p) < sockHeader+n {
				break
			}
			if int(g) >= len(c.wake) {
				return fmt.Errorf("a response for caller %d", g)
			}
			c.replies[g] = append(c.replies[g][:0], p[sockHeader:sockHeader+n]...)
			c.wake[g] <- c.replies[g]
			p = p[sockHeader+n:]
		}
		have = copy(buf, p)
	}
}

func init() { peers["sock-echo"] = sockEcho }

// sockEcho answers every whole request it has read with one write(2), until
// the socket (fd 3) ends.
func sockEcho() error {
	buf := make([]byte, 1<<18)
	have := 0
	for {
		n, err := readSome(3, buf[have:])
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		have += n
		whole := 0
		for p := buf[:have]; len(p) >= sockHeader; {
			m := sockHeader + int(binary.LittleEndian.Uint32(p[4:]))
			if m > len(buf) {
				return errors.New("sock-echo: a request of " + strconv.Itoa(m) + " bytes")
			}
			if len(p) < m {
				break
			}
			whole += m
			p = p[m:]
		}
		if err := writeFull(3, buf[:whole]); err != nil {
			return err
		}
		have = copy(buf, buf[whole:have])
	}
}
