package ring_test

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"testing"
	"time"
	"unsafe"

	"github.com/sypas/go/ring"
)

// A ring over a plain, 8-byte aligned []byte: both ends in one process.
func Example() {
	const capacity = 4096
	words := make([]uint64, ring.Size(capacity)/8) // []uint64 for alignment
	mem := unsafe.Slice((*byte)(unsafe.Pointer(&words[0])), ring.Size(capacity))
	if err := ring.Init(mem, capacity); err != nil {
		panic(err)
	}
	p, _ := ring.NewProducer(mem, ring.Config{})
	c, _ := ring.NewConsumer(mem, ring.Config{})

	// Copying write, and zero-copy: reserve, fill in place, commit, publish.
	p.Write([]byte("hello"))
	buf, _ := p.Reserve(5)
	copy(buf, "world")
	p.Commit(5)
	p.Flush() // one index store publishes every committed record
	p.Close()

	for {
		rec, err := c.Next() // a view into the ring, valid until Release
		if errors.Is(err, io.EOF) {
			break
		}
		fmt.Println(string(rec))
	}
	c.Release() // hand both records' space back at once
	// Output:
	// hello
	// world
}

// A hot producer loop: the inlined TryReserve first, Reserve (which pads,
// re-reads the consumer's index and waits) only when it returns nil, and one
// Flush per batch.
func ExampleProducer_TryReserve() {
	const capacity = 1024
	words := make([]uint64, ring.Size(capacity)/8)
	mem := unsafe.Slice((*byte)(unsafe.Pointer(&words[0])), ring.Size(capacity))
	if err := ring.Init(mem, capacity); err != nil {
		panic(err)
	}
	p, _ := ring.NewProducer(mem, ring.Config{})
	c, _ := ring.NewConsumer(mem, ring.Config{})

	send := func(seq int) error {
		buf := p.TryReserve(8)
		if buf == nil {
			var err error
			if buf, err = p.Reserve(8); err != nil {
				return err
			}
		}
		copy(buf, fmt.Sprintf("msg %4d", seq))
		if err := p.Commit(8); err != nil {
			return err
		}
		if seq%16 == 15 {
			return p.Flush()
		}
		return nil
	}
	for seq := 0; seq < 200; seq++ { // 200 records of 16 bytes: the ring wraps
		if err := send(seq); err != nil {
			panic(err)
		}
		if seq%16 == 15 { // the consumer keeps up, batch by batch
			for i := 0; i < 16; i++ {
				rec, _ := c.Next()
				if seq == 191 && i == 15 {
					fmt.Println(string(rec))
				}
			}
			c.Release()
		}
	}
	// Output: msg  191
}

// Two processes: the kernel creates a sealed memfd region and passes it to a
// daemon it starts (here this test binary, re-executed, runs daemonMain).
// In production the memfd travels over the control socket with SCM_RIGHTS.
func ExampleCreateRegion() {
	region, err := ring.CreateRegion(1 << 16)
	if err != nil {
		panic(err)
	}
	defer region.Close()
	c, _ := region.NewConsumer(ring.Config{})
	c.SetDeadline(time.Now().Add(10 * time.Second)) // a daemon that never starts must not hang us

	daemon := exec.Command(os.Args[0], "-test.run=^TestExampleDaemon$")
	daemon.Env = append(os.Environ(), "GO_WANT_HELPER_PROCESS=example-daemon")
	daemon.ExtraFiles = []*os.File{region.File()} // fd 3 in the daemon
	if err := daemon.Start(); err != nil {
		panic(err)
	}
	for {
		rec, err := c.Next()
		if err != nil { // io.EOF once the daemon closes its end
			break
		}
		fmt.Printf("daemon says: %s\n", rec)
		c.Release()
	}
	daemon.Wait()
	// Output:
	// daemon says: hello, kernel
	// daemon says: bye
}

// daemonMain is the daemon's side of ExampleCreateRegion.
func daemonMain() error {
	region, err := ring.OpenRegion(os.NewFile(3, "ring"), 1<<16) // checks seals and size
	if err != nil {
		return err
	}
	defer region.Close()
	p, err := region.NewProducer(ring.Config{})
	if err != nil {
		return err
	}
	for _, msg := range []string{"hello, kernel", "bye"} {
		if _, err := p.Write([]byte(msg)); err != nil {
			return err
		}
	}
	return p.Close()
}

// TestExampleDaemon runs daemonMain when ExampleCreateRegion starts this
// binary as its daemon; otherwise it does nothing.
func TestExampleDaemon(t *testing.T) {
	if os.Getenv("GO_WANT_HELPER_PROCESS") != "example-daemon" {
		t.Skip("the daemon of ExampleCreateRegion")
	}
	if err := daemonMain(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Exit(0)
}
