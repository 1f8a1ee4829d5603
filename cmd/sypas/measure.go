package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/klauspost/cpuid/v2"
	"golang.org/x/sys/unix"

	"github.com/sypas/go/sypas"
)

// msgSize is the request and reply size the demo measures.
const msgSize = 64

// figures are what the demo measures of one way to make a call.
type figures struct {
	P50, P99 time.Duration // round trip, one call in flight
	Rate1    float64       // calls/s, one in flight
	RateN    float64       // calls/s, with N in flight
	N        int
}

// caller makes one call carrying seq and checks its reply; each goroutine
// gets its own.
type caller func(seq uint64) error

// measure times calls for d one at a time, one latency sample each, then
// for d from n goroutines at once. newCaller is called once per goroutine;
// its cleanup runs when the goroutine is done.
func measure(d time.Duration, n int, newCaller func() (caller, func(), error)) (figures, error) {
	f := figures{N: n}
	call, done, err := newCaller()
	if err != nil {
		return f, err
	}
	defer done()
	// Warm up: the peer's threads awake, the code paged in.
	for i := range 1000 {
		if err := call(uint64(i)); err != nil {
			return f, err
		}
	}
	samples := make([]time.Duration, 0, 1<<16)
	start := time.Now()
	last := start
	for seq := uint64(1); last.Sub(start) < d; seq++ {
		if err := call(seq); err != nil {
			return f, err
		}
		now := time.Now()
		samples = append(samples, now.Sub(last))
		last = now
	}
	f.Rate1 = float64(len(samples)) / last.Sub(start).Seconds()
	slices.Sort(samples)
	f.P50, f.P99 = samples[len(samples)/2], samples[len(samples)*99/100]

	var stop atomic.Bool
	var total atomic.Uint64
	var wg sync.WaitGroup
	errs := make([]error, n)
	start = time.Now()
	for g := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			call, done, err := newCaller()
			if err != nil {
				errs[g] = err
				return
			}
			defer done()
			var k uint64
			for ; !stop.Load(); k++ {
				if err := call(uint64(g)<<40 | k); err != nil {
					errs[g] = err
					break
				}
			}
			total.Add(k)
		}()
	}
	time.Sleep(d)
	stop.Store(true)
	wg.Wait()
	f.RateN = float64(total.Load()) / time.Since(start).Seconds()
	return f, errors.Join(errs...)
}

// sypasCaller calls the example kernel's echo (an Inline handler) with a
// 64-byte body and checks the reply, allocating nothing per call.
func sypasCaller(c *sypas.Client) func() (caller, func(), error) {
	return func() (caller, func(), error) {
		msg, buf := make([]byte, msgSize), make([]byte, 0, msgSize)
		ctx := context.Background()
		return func(seq uint64) error {
			binary.LittleEndian.PutUint64(msg, seq)
			out, err := c.CallInto(ctx, "echo", msg, buf[:0])
			if err == nil && !bytes.Equal(out, msg) {
				err = fmt.Errorf("echo of call %#x came back as %x", seq, out)
			}
			return err
		}, func() {}, nil
	}
}

// The Unix-socket baseline: 64-byte request/response over a stream
// socket, one connection per goroutine, in blocking mode as in bench/
// (the fastest the socket goes, with no runtime poller in the way: an
// os.File on a blocking descriptor reads and writes with plain read(2) and
// write(2)).

// socketCaller dials the echo at path once per goroutine.
func socketCaller(path string) func() (caller, func(), error) {
	return func() (caller, func(), error) {
		fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return nil, nil, err
		}
		if err := unix.Connect(fd, &unix.SockaddrUnix{Name: path}); err != nil {
			unix.Close(fd)
			return nil, nil, fmt.Errorf("connect %s: %w", path, err)
		}
		f := os.NewFile(uintptr(fd), path)
		msg, buf := make([]byte, msgSize), make([]byte, msgSize)
		return func(seq uint64) error {
			binary.LittleEndian.PutUint64(msg, seq)
			if _, err := f.Write(msg); err != nil {
				return err
			}
			if _, err := io.ReadFull(f, buf); err != nil {
				return err
			}
			if !bytes.Equal(buf, msg) {
				return fmt.Errorf("echo of %#x came back as %x", seq, buf)
			}
			return nil
		}, func() { f.Close() }, nil
	}
}

// echoListener serves the baseline: every connection echoes 64-byte
// messages until the peer closes it.
type echoListener struct {
	fd   int
	once sync.Once
}

func listenEcho(path string) (*echoListener, error) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("bind %s: %w", path, err)
	}
	if err := unix.Listen(fd, unix.SOMAXCONN); err != nil {
		unix.Close(fd)
		return nil, err
	}
	l := &echoListener{fd: fd}
	go l.accept()
	return l, nil
}

func (l *echoListener) accept() {
	for {
		c, _, err := unix.Accept4(l.fd, unix.SOCK_CLOEXEC)
		if err == unix.EINTR || err == unix.ECONNABORTED {
			continue
		}
		if err != nil {
			return // Close
		}
		go func() {
			f := os.NewFile(uintptr(c), "unix-echo")
			defer f.Close()
			buf := make([]byte, msgSize)
			for {
				if _, err := io.ReadFull(f, buf); err != nil {
					return
				}
				if _, err := f.Write(buf); err != nil {
					return
				}
			}
		}()
	}
}

// Close stops accepting (shutdown wakes a blocked accept; close alone
// does not).
func (l *echoListener) Close() error {
	l.once.Do(func() {
		unix.Shutdown(l.fd, unix.SHUT_RDWR)
		unix.Close(l.fd)
	})
	return nil
}

// machine describes where the figures were measured, as bench/ does.
func machine() string {
	return fmt.Sprintf("%s, %d CPUs, GOMAXPROCS %d, hypervisor %v, %s",
		cpuid.CPU.BrandName, runtime.NumCPU(), runtime.GOMAXPROCS(0), cpuid.CPU.VM(), runtime.Version())
}
