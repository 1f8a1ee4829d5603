package bench

import (
	"encoding/binary"
	"fmt"
	"os"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sypas/go/ring"
)

// BenchmarkStream: one-way streaming to another process, timed until the
// peer acknowledges having read every message. Each message carries its
// sequence number in its first 8 bytes; the peer checks it and sums every
// 8-byte word of every payload, and the sum it returns must match what was
// sent, so what is counted was delivered and read, not only written. The
// ring's peer reads the payloads in place (view), copies them out first with
// Next and copy (copy), or copies them with ReadInto (readinto).
func BenchmarkStream(b *testing.B) {
	for _, size := range []struct {
		name string
		n    int
	}{{"64B", 64}, {"1KiB", 1024}} {
		b.Run("ring/"+size.name, func(b *testing.B) { benchRingStream(b, size.n, 1, true, "view") })
		b.Run("ring-batch16/"+size.name, func(b *testing.B) { benchRingStream(b, size.n, 16, true, "view") })
		b.Run("ring-batch64/"+size.name, func(b *testing.B) { benchRingStream(b, size.n, 64, true, "view") })
		b.Run("ring-batch64-reserve/"+size.name, func(b *testing.B) { benchRingStream(b, size.n, 64, false, "view") })
		b.Run("ring-batch64-copy/"+size.name, func(b *testing.B) { benchRingStream(b, size.n, 64, true, "copy") })
		b.Run("ring-batch64-readinto/"+size.name, func(b *testing.B) { benchRingStream(b, size.n, 64, true, "readinto") })
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

// streamMessage is the message the stream benchmarks send, but for its
// sequence number: bytes that sum to something other than 0.
func streamMessage(size int) []byte {
	msg := make([]byte, size)
	for i := range msg {
		msg[i] = byte(i*7 + 1)
	}
	return msg
}

// streamSum is what the peer's sum must be once it has read n messages of
// msg numbered 0 to n-1: the sum of every 8-byte word, wrapping.
func streamSum(msg []byte, n int) uint64 {
	var rest uint64
	for i := 8; i+8 <= len(msg); i += 8 {
		rest += binary.LittleEndian.Uint64(msg[i:])
	}
	return uint64(n)*rest + uint64(n)*uint64(n-1)/2
}

// sumChecked checks that payload m is message seq of the stream and returns
// the sum of its 8-byte words, which reads every byte of it.
func sumChecked(m []byte, seq uint64) (uint64, error) {
	if len(m) < 8 || binary.LittleEndian.Uint64(m) != seq {
		return 0, fmt.Errorf("message %d: %d bytes, out of sequence", seq, len(m))
	}
	var sum uint64
	for i := 0; i+8 <= len(m); i += 8 {
		sum += binary.LittleEndian.Uint64(m[i:])
	}
	return sum, nil
}

// awaitSum reads the peer's final acknowledgement, the sum of what it read,
// and checks it.
func awaitSum(b *testing.B, fd int, want uint64) {
	var got [8]byte
	if err := readFull(fd, got[:]); err != nil {
		b.Fatalf("peer's sum: %v", err)
	}
	if sum := binary.LittleEndian.Uint64(got[:]); sum != want {
		b.Fatalf("the peer read data summing to %#x, %#x was sent", sum, want)
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
// TryReserve documents) or with Reserve alone; the peer reads as read says
// (ringSink).
func benchRingStream(b *testing.B, size, batch int, try bool, read string) {
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
		"CAP="+strconv.Itoa(streamRingCapacity), "N="+strconv.Itoa(b.N), "READ="+read)
	ackW.Close()
	awaitAck(b, ackR) // attached
	msg := streamMessage(size)
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
		binary.LittleEndian.PutUint64(m, uint64(i))
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
	awaitSum(b, int(ackR.Fd()), streamSum(msg, b.N)) // all read
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
	if err := writeFull(4, []byte{1}); err != nil {
		return err
	}
	var sum uint64
	buf := make([]byte, ring.MaxRecord(capacity))
	read := os.Getenv("READ")
	for i := 0; i < n; i++ {
		var m []byte
		if read == "readinto" {
			k, err := c.ReadInto(buf)
			if err != nil {
				return err
			}
			m = buf[:k]
		} else if m, err = c.Next(); err != nil {
			return err
		} else if read == "copy" {
			m = buf[:copy(buf, m)]
		}
		s, err := sumChecked(m, uint64(i))
		if err != nil {
			return err
		}
		sum += s
		if read != "readinto" && i%32 == 31 {
			c.Release() // views are read: hand them back in batches
		}
	}
	c.Release()
	return writeFull(4, binary.LittleEndian.AppendUint64(nil, sum))
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
	msg := streamMessage(size)
	stop := startStream(b, size, pinned)
	for i := 0; i < b.N; i++ {
		binary.LittleEndian.PutUint64(msg, uint64(i))
		if err := writeFull(mine, msg); err != nil {
			b.Fatal(err)
		}
	}
	binary.LittleEndian.PutUint64(msg, 0)
	awaitSum(b, mine, streamSum(msg, b.N))
	stop()
	waitPeer(b, cmd)
}

// fdSink reads up to 256 KiB of whole messages per read(2), the fastest a
// receiver goes, and checks and sums each message as ringSink does.
func fdSink() error {
	n, size := envInt("N"), envInt("SIZE")
	if err := writeFull(3, []byte{1}); err != nil {
		return err
	}
	var sum uint64
	buf := make([]byte, (1<<18)/size*size)
	for i := 0; i < n; {
		chunk := buf[:min(len(buf), (n-i)*size)]
		if err := readFull(3, chunk); err != nil {
			return err
		}
		for ; len(chunk) > 0; i++ {
			s, err := sumChecked(chunk[:size], uint64(i))
			if err != nil {
				return err
			}
			sum += s
			chunk = chunk[size:]
		}
	}
	return writeFull(3, binary.LittleEndian.AppendUint64(nil, sum))
}
