package bench

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/sypas/go/futex"
	"github.com/sypas/go/ring"
	"github.com/sypas/go/sypas"
)

// BenchmarkBulk: a Call whose body is 1, 16 or 64 MiB, to a kernel in
// another process whose Inline handler gets the body as a view of the
// daemon's bulk span, reads its first and last words and answers 8
// bytes; beside, in the same run, the limits and the baseline:
//
//   - zero-copy: Client.AllocSpan, the sequence number written into the
//     span in place, Client.CallSpan. Nothing is copied: the body's bytes
//     are where the producer put them (filling them is the producer's
//     work, not the transfer's, and is not timed). The time is from the
//     allocation until the reply is back, which is after the handler had
//     the view; SetBytes is the body, the bytes the receiver got.
//   - copy: Client.CallFunc with a body in private memory: the transport
//     copies it into a span (one memcpy of the body), then as zero-copy.
//   - memcpy: copy of the same size within this process, the limit of any
//     path that copies once.
//   - unix-socket: the body written to a Unix stream socket and read whole
//     by the other process, which answers 8 bytes: the same bytes moved
//     the way a socket moves them.
//
// Each reports allocs/op in the caller (the zero-copy path allocates
// nothing), kernel-allocs/op, and p50/p99 per transfer.
func BenchmarkBulk(b *testing.B) {
	for _, size := range []int{1 << 20, 16 << 20, 64 << 20} {
		sz := fmt.Sprintf("%dMiB", size>>20)
		b.Run("zero-copy/"+sz, func(b *testing.B) { benchBulk(b, size, true) })
		b.Run("copy/"+sz, func(b *testing.B) { benchBulk(b, size, false) })
		b.Run("memcpy/"+sz, func(b *testing.B) { benchMemcpy(b, size) })
		b.Run("unix-socket/"+sz, func(b *testing.B) { benchUnixBulk(b, size) })
	}
}

// bulkRegion is the daemon's bulk region in BenchmarkBulk: room for the
// largest body and its header.
const bulkRegion = 128 << 20

func benchBulk(b *testing.B, size int, zeroCopy bool) {
	pinned := shouldPin(true)
	path := startKernel(b, futex.Config{}, pinned)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	cfg := sypas.ClientConfig{}
	cfg.BulkSize = bulkRegion
	cfg.Ring = ring.Config{}
	cfg.Logger = slog.New(slog.DiscardHandler)
	c, err := sypas.Dial(ctx, path, cfg)
	cancel()
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })

	bg := context.Background()
	body := make([]byte, size)
	for i := range body {
		body[i] = byte(i)
	}
	var want uint64
	check := func(r []byte) error {
		if len(r) != 8 || binary.LittleEndian.Uint64(r) != want {
			return errors.New("the reply is not the body's sequence number")
		}
		return nil
	}
	before := kernelMallocs(b, c)
	b.SetBytes(int64(size))
	timeRoundTrips(b, pinned, func(seq uint64) {
		want = seq
		var err error
		if zeroCopy {
			var sp sypas.Span
			if sp, err = c.AllocSpan(bg, "bulk.take", size); err == nil {
				binary.LittleEndian.PutUint64(sp.Bytes(), seq)
				err = c.CallSpan(bg, sp, check)
			}
		} else {
			binary.LittleEndian.PutUint64(body, seq)
			err = c.CallFunc(bg, "bulk.take", body, check)
		}
		if err != nil {
			b.Fatalf("transfer %d: %v", seq, err)
		}
	})
	b.ReportMetric(float64(kernelMallocs(b, c)-before)/float64(b.N), "kernel-allocs/op")
	if st, ok := c.BulkStats(); !ok || st.Refused != 0 {
		b.Fatalf("bulk stats %+v", st)
	}
}

// bulkTake is the kernel's "bulk.take": it reads the body's first word and
// its last byte in place and answers the first word. Inline: one at a
// time, so one reply buffer does.
func bulkTake() func(context.Context, *sypas.Request) ([]byte, error) {
	var out [8]byte
	return func(_ context.Context, r *sypas.Request) ([]byte, error) {
		if len(r.Body) < 8 {
			return nil, &sypas.Error{Code: sypas.CodeProto, Message: "short body"}
		}
		copy(out[:], r.Body[:8])
		_ = r.Body[len(r.Body)-1]
		return out[:], nil
	}
}

func benchMemcpy(b *testing.B, size int) {
	src, dst := make([]byte, size), make([]byte, size)
	for i := range src {
		src[i] = byte(i)
	}
	copy(dst, src)
	b.SetBytes(int64(size))
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		copy(dst, src)
	}
}

func init() { peers["sock-take"] = sockTake }

func benchUnixBulk(b *testing.B, size int) {
	mine, theirs := socketPair(b)
	pinned := shouldPin(false)
	cmd := startPeer(b, "sock-take", pinned, []*os.File{theirs}, "SIZE="+strconv.Itoa(size))
	theirs.Close()
	body := make([]byte, size)
	var ack [8]byte
	b.SetBytes(int64(size))
	timeRoundTrips(b, pinned, func(seq uint64) {
		binary.LittleEndian.PutUint64(body, seq)
		if err := writeFull(mine, body); err != nil {
			b.Fatal(err)
		}
		if err := readFull(mine, ack[:]); err != nil || binary.LittleEndian.Uint64(ack[:]) != seq {
			b.Fatalf("transfer %d: %v", seq, err)
		}
	})
	cmd.Process.Kill() // it reads until killed
}

// sockTake reads SIZE-byte bodies from fd 3, 256 KiB per read(2) at most,
// and answers each with its first 8 bytes.
func sockTake() error {
	size := envInt("SIZE")
	buf := make([]byte, size)
	for {
		for got := 0; got < size; {
			n, err := readSome(3, buf[got:min(size, got+1<<18)])
			if err != nil {
				return err
			}
			got += n
		}
		if err := writeFull(3, buf[:8]); err != nil {
			return err
		}
	}
}
