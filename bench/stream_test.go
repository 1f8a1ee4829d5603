package bench

import (
	"os"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sypas/sypas/ring"
)

// BenchmarkStream: one-way streaming to another process, timed until the
// peer acknowledges having read every message.
func BenchmarkStream(b *testing.B) {
	for _, size := range []struct {
		name string
		n    int
	}{{"64B", 64}, {"1KiB", 1024}} {
		b.Run("ring/"+size.name, func(b *testing.B) { benchRingStream(b, size.n, 1, true) })
		b.Run("ring-batch16/"+size.name, func(b *testing.B) { benchRingStream(b, size.n, 16, true) })
		b.Run("ring-batch64/"+size.name, func(b *testing.B) { benchRingStream(b, size.n, 64, true) })
		b.Run("ring-batch64-reserve/"+size.name, func(b *testing.B) { benchRingStream(b, size.n, 64, false) })
		b.Run("unix-socket/"+size.name, func(b *testing.B) { benchUnixStream(b, size.n) })
	}
}

const streamRingCapacity = 1 << 18

func init() {
	peers["ring-sink"] = ringSink
	peers["fd-sink"] = fdSink
}

// ackPipe returns the read end for us and the write end for the peer.
func ackPipe(b *testing.B) (*os.File, *os.File) {
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC); err != nil {
		b.Fatal(err)
	}
	r, w := os.NewFile(uintptr(fds[0]), "ack-r"), os.NewFile(uintptr(fds[1]), "ack-w")
	b.Cleanup(func() { r.Close() })
	return r, w
}

func awaitAck(b *testing.B, r *os.File) {
	var one [1]byte
	if err := readFull(int(r.Fd()), one[:]); err != nil {
		b.Fatalf("peer ack: %v", err)
	}
}

// startStream pins if pinned and starts the clock on b.N messages of size
// bytes; the function it returns stops it, once the peer has acknowledged the
// last message, and reports msgs/s and the pinning. The timed loop itself stays
// in the caller: a call per message would add stores of its own to it.
func startStream(b *testing.B, size int, pinned bool) (stop func()) {
	unpin := pinSelf(b, pinned)
	b.SetBytes(int64(size))
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	return func() {
		elapsed := time.Since(start)
		b.StopTimer()
		b.ReportMetric(float64(b.N)/elapsed.Seconds(), "msgs/s")
		unpin()
	}
}

// benchRingStream publishes with one index store every `batch` messages,
// reserving with the inlined TryReserve first when try is set (the idiom
// TryReserve documents) or with Reserve alone.
func benchRingStream(b *testing.B, size, batch int, try bool) {
	region, err := ring.CreateRegion(streamRingCapacity)
	if err != nil {
		b.Fatal(err)
	}
	defer region.Close()
	p, err := ring.NewProducer(region.Bytes(), ring.Config{})
	if err != nil {
		b.Fatal(err)
	}
	ackR, ackW := ackPipe(b)
	pinned := shouldPin(true)
	cmd := startPeer(b, "ring-sink", pinned, []*os.File{region.File(), ackW},
		"CAP="+strconv.Itoa(streamRingCapacity), "N="+strconv.Itoa(b.N))
	ackW.Close()
	awaitAck(b, ackR) // attached
	msg := make([]byte, size)
	stop := startStream(b, size, pinned)
	for i := 0; i < b.N; i++ {
		var m []byte
		if try {
			m = p.TryReserve(size)
		}
		if m == nil {
			if m, err = p.Reserve(size); err != nil {
				b.Fatal(err)
			}
		}
		copy(m, msg)
		p.Commit(size)
		if i%batch == batch-1 {
			if err := p.Flush(); err != nil {
				b.Fatal(err)
			}
		}
	}
	if err := p.Flush(); err != nil {
		b.Fatal(err)
	}
	awaitAck(b, ackR) // all read
	stop()
	p.Close()
	waitPeer(b, cmd)
}

func ringSink() error {
	capacity, n := envInt("CAP"), envInt("N")
	region, err := ring.OpenRegion(os.NewFile(3, "ring"), capacity)
	if err != nil {
		return err
	}
	defer region.Close()
	c, err := ring.NewConsumer(region.Bytes(), ring.Config{})
	if err != nil {
		return err
	}
	ack := []byte{1}
	if err := writeFull(4, ack); err != nil {
		return err
	}
	for i := 0; i < n; i++ {
		if _, err := c.Next(); err != nil {
			return err
		}
		if i%32 == 31 {
			c.Release()
		}
	}
	c.Release()
	return writeFull(4, ack)
}

// benchUnixStream writes each message with its own write(2), as an
// unbatched sender over a stream socket does.
func benchUnixStream(b *testing.B, size int) {
	mine, theirs := socketPair(b)
	pinned := shouldPin(false)
	cmd := startPeer(b, "fd-sink", pinned, []*os.File{theirs}, "N="+strconv.Itoa(b.N), "SIZE="+strconv.Itoa(size))
	theirs.Close()
	var one [1]byte
	if err := readFull(mine, one[:]); err != nil {
		b.Fatal(err)
	}
	msg := make([]byte, size)
	stop := startStream(b, size, pinned)
	for i := 0; i < b.N; i++ {
		if err := writeFull(mine, msg); err != nil {
			b.Fatal(err)
		}
	}
	if err := readFull(mine, one[:]); err != nil {
		b.Fatal(err)
	}
	stop()
	waitPeer(b, cmd)
}

func fdSink() error {
	total := envInt("N") * envInt("SIZE")
	ack := []byte{1}
	if err := writeFull(3, ack); err != nil {
		return err
	}
	buf := make([]byte, 1<<18)
	for total > 0 {
		n := min(len(buf), total)
		if err := readFull(3, buf[:n]); err != nil {
			return err
		}
		total -= n
	}
	return writeFull(3, ack)
}
