package bench

import (
	"encoding/binary"
	"errors"
	"io"
	"os"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sypas/go/futex"
	"github.com/sypas/go/internal/ringpair"
	"github.com/sypas/go/internal/shm"
	"github.com/sypas/go/ring"
)

const msgSize = 64

// BenchmarkRoundTrip: a 64-byte message to another process and back.
func BenchmarkRoundTrip(b *testing.B) {
	b.Run("ring-spin", func(b *testing.B) { benchRingRTT(b, futex.Config{Policy: futex.PolicySpin}, shouldPin(true), msgSize) })
	b.Run("ring-park", func(b *testing.B) { benchRingRTT(b, futex.Config{Policy: futex.PolicyPark}, shouldPin(false), msgSize) })
	b.Run("ring-auto", func(b *testing.B) { benchRingRTT(b, futex.Config{}, shouldPin(true), msgSize) })
	b.Run("raw-cacheline", benchCacheLineRTT)
	b.Run("raw-futex", benchFutexRTT)
	b.Run("unix-socket", func(b *testing.B) { benchUnixRTT(b, msgSize) })
	b.Run("pipe", benchPipeRTT)
}

const rttRingCapacity = 1 << 16

func init() {
	peers["ring-echo"] = ringEcho
	peers["cacheline-echo"] = cacheLineEcho
	peers["futex-echo"] = futexEcho
	peers["fd-echo"] = fdEcho
}

// benchRingRTT times size-byte messages echoed over a pair of rings.
func benchRingRTT(b *testing.B, idle futex.Config, pinned bool, size int) {
	req, err := ring.CreateRegion(rttRingCapacity)
	if err != nil {
		b.Fatal(err)
	}
	defer req.Close()
	resp, err := ring.CreateRegion(rttRingCapacity)
	if err != nil {
		b.Fatal(err)
	}
	defer resp.Close()
	cfg := ring.Config{Idle: idle}
	p, err := ring.NewProducer(req.Bytes(), cfg)
	if err != nil {
		b.Fatal(err)
	}
	c, err := ring.NewConsumer(resp.Bytes(), cfg)
	if err != nil {
		b.Fatal(err)
	}
	cmd := startPeer(b, "ring-echo", pinned, []*os.File{req.File(), resp.File()},
		"CAP="+strconv.Itoa(rttRingCapacity), "POLICY="+strconv.Itoa(int(idle.Policy)),
		"SPIN="+strconv.Itoa(int(idle.Spin)), "YIELD="+strconv.Itoa(int(idle.Yield)))

	msg := make([]byte, size)
	roundTrip := func(seq uint64) {
		m, err := p.Reserve(size)
		if err != nil {
			b.Fatal(err)
		}
		copy(m, msg)
		binary.LittleEndian.PutUint64(m, seq)
		p.Commit(size)
		if err := p.Flush(); err != nil {
			b.Fatal(err)
		}
		got, err := c.Next()
		if err != nil || len(got) != size || binary.LittleEndian.Uint64(got) != seq {
			b.Fatalf("round trip %d: %d bytes, %v", seq, len(got), err)
		}
		c.Release()
	}
	b.SetBytes(int64(2 * size))
	timeRoundTrips(b, pinned, roundTrip)
	p.Close()
	waitPeer(b, cmd)
	c.Close()
}

func ringEcho() error {
	idle := futex.Config{
		Policy: futex.Policy(envInt("POLICY")),
		Spin:   time.Duration(envInt("SPIN")),
		Yield:  time.Duration(envInt("YIELD")),
	}
	c, p, closeRings, err := ringpair.Inherited(envInt("CAP"), ring.Config{Idle: idle})
	if err != nil {
		return err
	}
	defer closeRings()
	for {
		m, err := c.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		r, err := p.Reserve(len(m))
		if err != nil {
			return err
		}
		copy(r, m)
		p.Commit(len(m))
		if err := p.Flush(); err != nil {
			return err
		}
		c.Release()
	}
}

// The raw baselines share one page: the request word at offset 0 and the
// response word at offset 128, on separate cache lines.
const stopWord = ^uint32(0)

func rawPage(b *testing.B) *shm.Region {
	r, err := shm.Create("bench-raw", 4096)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { r.Close() })
	return r
}

// benchCacheLineRTT is the hardware limit: both sides busy-poll a cache line.
func benchCacheLineRTT(b *testing.B) {
	page := rawPage(b)
	req, resp := word(page.Bytes(), 0), word(page.Bytes(), 128)
	pinned := shouldPin(true)
	cmd := startPeer(b, "cacheline-echo", pinned, []*os.File{page.File()})
	roundTrip := func(seq uint64) {
		v := uint32(seq%1_000_000_000) + 1 // never 0 (the initial value) nor stopWord
		req.Store(v)
		for resp.Load() != v {
		}
	}
	timeRoundTrips(b, pinned, roundTrip)
	req.Store(stopWord)
	waitPeer(b, cmd)
}

func cacheLineEcho() error {
	return withRawPage(func(req, resp *atomic.Uint32) error {
		var last uint32
		for {
			v := req.Load()
			for v == last {
				v = req.Load()
			}
			if v == stopWord {
				return nil
			}
			resp.Store(v)
			last = v
		}
	})
}

// withRawPage maps the raw baselines' page (fd 3) for a peer and runs echo on
// its request and response words.
func withRawPage(echo func(req, resp *atomic.Uint32) error) error {
	page, err := shm.Open(os.NewFile(3, "page"), 4096)
	if err != nil {
		return err
	}
	defer page.Close()
	return echo(word(page.Bytes(), 0), word(page.Bytes(), 128))
}

// benchFutexRTT: each side sleeps in FUTEX_WAIT and is woken by FUTEX_WAKE.
func benchFutexRTT(b *testing.B) {
	page := rawPage(b)
	req, resp := word(page.Bytes(), 0), word(page.Bytes(), 128)
	pinned := shouldPin(false)
	cmd := startPeer(b, "futex-echo", pinned, []*os.File{page.File()})
	roundTrip := func(seq uint64) {
		v := uint32(seq%1_000_000_000) + 1 // never 0 (the initial value) nor stopWord
		req.Store(v)
		futex.Wake(req, 1)
		for {
			got := resp.Load()
			if got == v {
				return
			}
			futex.Wait(resp, got, -1)
		}
	}
	timeRoundTrips(b, pinned, roundTrip)
	req.Store(stopWord)
	futex.Wake(req, 1)
	waitPeer(b, cmd)
}

func futexEcho() error {
	return withRawPage(func(req, resp *atomic.Uint32) error {
		var last uint32
		for {
			v := req.Load()
			if v == last {
				futex.Wait(req, last, -1)
				continue
			}
			if v == stopWord {
				return nil
			}
			resp.Store(v)
			futex.Wake(resp, 1)
			last = v
		}
	})
}

// The socket and pipe baselines use blocking read(2)/write(2) directly: the
// fastest those transports go, with no runtime poller in the way.
func benchUnixRTT(b *testing.B, size int) {
	mine, theirs := socketPair(b)
	pinned := shouldPin(false)
	cmd := startPeer(b, "fd-echo", pinned, []*os.File{theirs, theirs}, "SIZE="+strconv.Itoa(size))
	theirs.Close()
	benchFdRTT(b, pinned, size, mine, mine, func() { unix.Shutdown(mine, unix.SHUT_WR) })
	waitPeer(b, cmd)
}

func benchPipeRTT(b *testing.B) {
	var there, back [2]int
	if err := unix.Pipe2(there[:], unix.O_CLOEXEC); err != nil {
		b.Fatal(err)
	}
	if err := unix.Pipe2(back[:], unix.O_CLOEXEC); err != nil {
		b.Fatal(err)
	}
	files := []*os.File{os.NewFile(uintptr(there[0]), "req-r"), os.NewFile(uintptr(back[1]), "resp-w")}
	mine := []*os.File{os.NewFile(uintptr(there[1]), "req-w"), os.NewFile(uintptr(back[0]), "resp-r")}
	defer mine[1].Close()
	pinned := shouldPin(false)
	cmd := startPeer(b, "fd-echo", pinned, files, "SIZE="+strconv.Itoa(msgSize))
	files[0].Close()
	files[1].Close()
	benchFdRTT(b, pinned, msgSize, there[1], back[0], func() { mine[0].Close() })
	waitPeer(b, cmd)
}

// benchFdRTT times round trips of size-byte messages over wfd/rfd, then calls
// eof so the peer stops.
func benchFdRTT(b *testing.B, pinned bool, size, wfd, rfd int, eof func()) {
	buf := make([]byte, size)
	roundTrip := func(seq uint64) {
		binary.LittleEndian.PutUint64(buf, seq)
		if err := writeFull(wfd, buf); err != nil {
			b.Fatal(err)
		}
		if err := readFull(rfd, buf); err != nil || binary.LittleEndian.Uint64(buf) != seq {
			b.Fatalf("round trip %d: %v", seq, err)
		}
	}
	b.SetBytes(int64(2 * size))
	timeRoundTrips(b, pinned, roundTrip)
	eof()
}

func fdEcho() error {
	buf := make([]byte, envInt("SIZE"))
	for {
		if err := readFull(3, buf); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		if err := writeFull(4, buf); err != nil {
			return err
		}
	}
}

func readFull(fd int, b []byte) error {
	for len(b) > 0 {
		n, err := readSome(fd, b)
		if err != nil {
			return err
		}
		b = b[n:]
	}
	return nil
}

// readSome is one read(2) into b, retried on EINTR; io.EOF at the end.
func readSome(fd int, b []byte) (int, error) {
	for {
		n, err := unix.Read(fd, b)
		switch {
		case err == unix.EINTR:
			continue
		case err != nil:
			return 0, err
		case n == 0 && len(b) > 0:
			return 0, io.EOF
		}
		return n, nil
	}
}

func writeFull(fd int, b []byte) error {
	for len(b) > 0 {
		n, err := unix.Write(fd, b)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		b = b[n:]
	}
	return nil
}
