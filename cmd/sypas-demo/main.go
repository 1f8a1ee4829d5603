// Command sypas-demo runs a kernel process and a daemon process that talk over
// two shared-memory rings, one per direction, and prints what it measured:
// round-trip percentiles in spin and park mode and one-way throughput.
//
// The kernel creates the sealed memfd regions and starts the daemon (this same
// binary, re-executed) with the memfds as inherited descriptors; the daemon
// maps them, checking seals and size first, and echoes every request.
package main

import (
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"time"

	"github.com/sypas/go/futex"
	"github.com/sypas/go/internal/affinity"
	"github.com/sypas/go/internal/ringpair"
	"github.com/sypas/go/ring"
)

const capacity = 1 << 18

func main() {
	role := flag.String("role", "kernel", "kernel (starts daemons) or daemon (internal)")
	policy := flag.Int("policy", 0, "daemon idle policy (internal)")
	cpu := flag.Int("cpu", -1, "CPU to pin the daemon's serving thread to (internal)")
	rounds := flag.Int("rounds", 200_000, "round trips per mode")
	stream := flag.Int("stream", 5_000_000, "messages in the one-way stream")
	flag.Parse()
	var err error
	if *role == "daemon" {
		if *cpu >= 0 {
			affinity.Pin(*cpu)
		}
		err = daemon(futex.Policy(*policy))
	} else {
		err = kernel(*rounds, *stream)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "sypas-demo (%s): %v\n", *role, err)
		os.Exit(1)
	}
}

// Message kinds, in the first byte of each record.
const (
	kindEcho   = 'E' // echo this record back
	kindStream = 'S' // count it, no reply
	kindCount  = 'C' // reply with how many stream records arrived
)

func kernel(rounds, stream int) error {
	fmt.Printf("kernel pid %d, %s/%s, %d CPUs, %s\n", os.Getpid(), runtime.GOOS, runtime.GOARCH, runtime.NumCPU(), runtime.Version())
	for _, mode := range []struct {
		name   string
		policy futex.Policy
	}{{"spin", futex.PolicySpin}, {"park", futex.PolicyPark}} {
		err := withDaemon(mode.policy, func(p *ring.Producer, c *ring.Consumer) error {
			return roundTrips(p, c, mode.name, rounds)
		})
		if err != nil {
			return err
		}
	}
	return withDaemon(futex.PolicyAuto, func(p *ring.Producer, c *ring.Consumer) error {
		return streamTo(p, c, stream)
	})
}

// withDaemon creates a ring each way in sealed memfds, starts a daemon (this
// binary, re-executed) that inherits them as fds 3 and 4, runs phase on the
// kernel's ends, then closes them so the daemon exits.
func withDaemon(policy futex.Policy, phase func(*ring.Producer, *ring.Consumer) error) error {
	toDaemon, err := ring.CreateRegion(capacity)
	if err != nil {
		return err
	}
	defer toDaemon.Close()
	toKernel, err := ring.CreateRegion(capacity)
	if err != nil {
		return err
	}
	defer toKernel.Close()
	cfg := ring.Config{Idle: futex.Config{Policy: policy}}
	p, err := toDaemon.NewProducer(cfg)
	if err != nil {
		return err
	}
	c, err := toKernel.NewConsumer(cfg)
	if err != nil {
		return err
	}
	defer c.Close()

	self, err := os.Executable()
	if err != nil {
		return err
	}
	// Busy-polling only pays with a CPU for each side: in spin mode, pin the
	// kernel's thread and the daemon's to different CPUs. The kernel pins
	// itself only after starting the daemon, which would otherwise inherit
	// its CPU mask for all its threads.
	spinPinned := policy == futex.PolicySpin && runtime.NumCPU() >= 2
	daemonCPU := -1
	if spinPinned {
		daemonCPU = 1
	}
	cmd := exec.Command(self, "-role=daemon", fmt.Sprintf("-policy=%d", policy), fmt.Sprintf("-cpu=%d", daemonCPU))
	cmd.ExtraFiles = []*os.File{toDaemon.File(), toKernel.File()}
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Start(); err != nil {
		return err
	}
	if spinPinned {
		defer affinity.Pin(0)()
	}
	if err := phase(p, c); err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		return err
	}
	p.Close() // the daemon reads io.EOF and exits
	return cmd.Wait()
}

func roundTrips(p *ring.Producer, c *ring.Consumer, name string, n int) error {
	msg := make([]byte, 64)
	msg[0] = kindEcho
	samples := make([]time.Duration, 0, n)
	for i := 0; i < n; i++ {
		binary.LittleEndian.PutUint64(msg[8:], uint64(i))
		start := time.Now()
		if _, err := p.Write(msg); err != nil {
			return err
		}
		reply, err := c.Next()
		if err != nil {
			return err
		}
		if binary.LittleEndian.Uint64(reply[8:]) != uint64(i) {
			return fmt.Errorf("echo %d came back as %d", i, binary.LittleEndian.Uint64(reply[8:]))
		}
		c.Release()
		samples = append(samples, time.Since(start))
	}
	slices.Sort(samples)
	fmt.Printf("%s mode, 64 B round trip: p50 %v, p99 %v (%d round trips with another process)\n",
		name, samples[n/2], samples[n*99/100], n)
	return nil
}

func streamTo(p *ring.Producer, c *ring.Consumer, n int) error {
	msg := make([]byte, 64)
	msg[0] = kindStream
	start := time.Now()
	for i := 0; i < n; i++ {
		m := p.TryReserve(len(msg)) // inlined; nil when Reserve has work to do
		if m == nil {
			var err error
			if m, err = p.Reserve(len(msg)); err != nil {
				return err
			}
		}
		copy(m, msg)
		if err := p.Commit(len(msg)); err != nil {
			return err
		}
		if i%64 == 63 {
			if err := p.Flush(); err != nil {
				return err
			}
		}
	}
	msg[0] = kindCount
	if _, err := p.Write(msg); err != nil {
		return err
	}
	reply, err := c.Next()
	if err != nil {
		return err
	}
	elapsed := time.Since(start)
	got := binary.LittleEndian.Uint64(reply[8:])
	c.Release()
	if got != uint64(n) {
		return fmt.Errorf("daemon counted %d stream messages, sent %d", got, n)
	}
	fmt.Printf("one-way stream, 64 B: %d messages in %v = %.1f M msgs/s (%.0f MB/s), none lost\n",
		n, elapsed.Round(time.Millisecond), float64(n)/elapsed.Seconds()/1e6, float64(n*64)/elapsed.Seconds()/1e6)
	return nil
}

// daemon maps the rings it inherited (fd 3: requests, fd 4: replies) and
// serves until the kernel closes its producer.
func daemon(policy futex.Policy) error {
	c, p, closeRings, err := ringpair.Inherited(capacity, ring.Config{Idle: futex.Config{Policy: policy}})
	if err != nil {
		return err
	}
	defer closeRings()
	var streamed uint64
	for {
		m, err := c.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		switch m[0] {
		case kindEcho:
			_, err = p.Write(m)
		case kindStream:
			streamed++
		case kindCount:
			reply := make([]byte, 16)
			binary.LittleEndian.PutUint64(reply[8:], streamed)
			_, err = p.Write(reply)
		}
		if err != nil {
			return err
		}
		if streamed%32 == 0 || m[0] != kindStream {
			c.Release()
		}
	}
}
