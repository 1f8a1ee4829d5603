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
// and the other way, a reply of that size to an 8-byte request, whose
// handler ("bulk.give") writes the sequence number into the reply and
// returns it; the daemon's CallFunc callback checks its first word and
// reads its last byte in place:
//
//   - reply-zero-copy: the reply is a span Request.AllocReply reserved in
//     the kernel's region, sent by descriptor as it lies.
//   - reply-copy: the reply is the handler's private buffer, copied by the
//     transport into a span (one memcpy), then as reply-zero-copy.
//
// Each reports allocs/op in the caller (the zero-copy path allocates
// nothing), kernel-allocs/op, and p50/p99 per transfer.
func BenchmarkBulk(b *testing.B) {
	for _, size := range []int{1 << 20, 16 << 20, 64 << 20} {
		sz := fmt.Sprintf("%dMiB", size>>20)
		b.Run("zero-copy/"+sz, func(b *testing.B) { benchBulk(b, size, true) })
		b.Run("copy/"+sz, func(b *testing.B) { benchBulk(b, size, false) })
		b.Run("reply-zero-copy/"+sz, func(b *testing.B) { benchBulkReply(b, size, true) })
		b.Run("reply-copy/"+sz, func(b *testing.B) { benchBulkReply(b, size, false) })
		b.Run("memcpy/"+sz, func(b *testing.B) { benchMemcpy(b, size) })
		b.Run("unix-socket/"+sz, func(b *testing.B) { benchUnixBulk(b, size) })
	}
}

// bulkRegion is the daemon's bulk region in BenchmarkBulk: room for the
// largest body and its header.
const bulkRegion = 128 << 20

// dialBulk starts a kernel in another process and dials it with bulk
// regions of bulkRegion bytes.
func dialBulk(b *testing.B, pinned bool) *sypas.Client {
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
	return c
}

func benchBulk(b *testing.B, size int, zeroCopy bool) {
	pinned := shouldPin(true)
	c := dialBulk(b, pinned)

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
	timeCalls(b, c, pinned, size, func(seq uint64) (err error) {
		want = seq
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
		return err
	})
	if st, ok := c.BulkStats(); !ok || st.Refused != 0 {
		b.Fatalf("bulk stats %+v", st)
	}
}

func benchBulkReply(b *testing.B, size int, zeroCopy bool) {
	pinned := shouldPin(true)
	c := dialBulk(b, pinned)
	op := "bulk.give.copy"
	if zeroCopy {
		op = "bulk.give"
	}
	bg := context.Background()
	var req [16]byte
	binary.LittleEndian.PutUint64(req[8:], uint64(size))
	var want uint64
	check := func(r []byte) error {
		if len(r) != size || binary.LittleEndian.Uint64(r) != want || r[len(r)-1] != byte(want) {
			return errors.New("the reply is not the request's sequence number")
		}
		return nil
	}
	timeCalls(b, c, pinned, size, func(seq uint64) error {
		want = seq
		binary.LittleEndian.PutUint64(req[:], seq)
		return c.CallFunc(bg, op, req[:], check)
	})
}

// bulkGive is the kernel's "bulk.give" (zeroCopy) or "bulk.give.copy": the
// request is a sequence number and a size; the reply, of that size, starts
// with the sequence number and ends with its low byte, written into a span
// AllocReply reserved, or into a private buffer the transport copies.
// Inline: one at a time, so one buffer does.
func bulkGive(zeroCopy bool) func(context.Context, *sypas.Request) ([]byte, error) {
	var buf []byte
	return func(ctx context.Context, r *sypas.Request) ([]byte, error) {
		if len(r.Body) != 16 {
			return nil, &sypas.Error{Code: sypas.CodeProto, Message: "want a sequence number and a size"}
		}
		seq, size := binary.LittleEndian.Uint64(r.Body), binary.LittleEndian.Uint64(r.Body[8:])
		if size < 8 || size > bulkRegion {
			return nil, &sypas.Error{Code: sypas.CodeTooLarge, Message: "size"}
		}
		var out []byte
		if zeroCopy {
			var err error
			if out, err = r.AllocReply(ctx, int(size)); err != nil {
				return nil, err
			}
		} else {
			if uint64(cap(buf)) < size {
				buf = make([]byte, size)
				for i := range buf { // real pages, not the zero page
					buf[i] = byte(i)
				}
			}
			out = buf[:size]
		}
		binary.LittleEndian.PutUint64(out, seq)
		out[len(out)-1] = byte(seq)
		return out, nil
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
