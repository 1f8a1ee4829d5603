package bench

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"strconv"
	"testing"

	"github.com/sypas/go/futex"
)

// BenchmarkCallInline: a Call whose frames travel inline on the control
// socket (shared memory turned off in the daemon's config, the fallback of
// docs/PROTOCOL.md §8.6), its body echoed by a kernel in another process by
// an Inline handler, beside, in the same run and at the same size: a raw
// Unix-socket request/response (blocking read/write on both sides, no
// runtime poller: the floor of any socket transport), the same
// request/response through Go's net.UnixConn on both sides (the floor of a
// transport built on the Go runtime's poller), and the same Call on the
// rings. Unpinned, as a socket's reader sleeps in the kernel between frames.
//
// The target of issue 11: inline p50 within 1.5× unix-socket's.
func BenchmarkCallInline(b *testing.B) {
	for _, size := range []int{64, 4096} {
		sz := sizeName(size)
		b.Run("inline/"+sz, func(b *testing.B) { benchCall(b, futex.Config{}, false, size, callInline) })
		b.Run("unix-socket/"+sz, func(b *testing.B) { benchUnixRTT(b, size) })
		b.Run("go-unix-socket/"+sz, func(b *testing.B) { benchGoUnixRTT(b, size) })
		b.Run("ring/"+sz, func(b *testing.B) { benchCall(b, futex.Config{}, shouldPin(true), size, callInto) })
	}
}

func init() { peers["go-echo"] = goEcho }

// benchGoUnixRTT is benchUnixRTT with both ends read and written through
// net.UnixConn, so through the runtime's poller as every Go socket is.
func benchGoUnixRTT(b *testing.B, size int) {
	mine, theirs := socketPair(b)
	cmd := startPeer(b, "go-echo", false, []*os.File{theirs}, "SIZE="+strconv.Itoa(size))
	theirs.Close()
	f := os.NewFile(uintptr(mine), "mine")
	c, err := net.FileConn(f) // a dup: f's fd is closed by socketPair's cleanup
	if err != nil {
		b.Fatal(err)
	}
	goRTT(b, c, size)
	c.(*net.UnixConn).CloseWrite()
	waitPeer(b, cmd)
	c.Close()
}

// goRTT times round trips of size-byte messages on c, through the
// runtime's poller, to a peer echoing them.
func goRTT(b *testing.B, c net.Conn, size int) {
	buf := make([]byte, size)
	b.SetBytes(int64(2 * size))
	timeRoundTrips(b, false, func(seq uint64) {
		binary.LittleEndian.PutUint64(buf, seq)
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil || binary.LittleEndian.Uint64(buf) != seq {
			b.Fatalf("round trip %d: %v", seq, err)
		}
	})
}

// goEcho echoes SIZE-byte messages on fd 3 through net.UnixConn until the
// socket ends.
func goEcho() error {
	c, err := net.FileConn(os.NewFile(3, "sock"))
	if err != nil {
		return err
	}
	buf := make([]byte, envInt("SIZE"))
	for {
		if _, err := io.ReadFull(c, buf); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		if _, err := c.Write(buf); err != nil {
			return err
		}
	}
}
