package ring

import (
	"encoding/binary"
	"os"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

func TestAttachRejectsBadHeader(t *testing.T) {
	cases := map[string]func(mem []byte){
		"magic":           func(m []byte) { m[0] ^= 1 },
		"version":         func(m []byte) { binary.LittleEndian.PutUint32(m[hdrVersion:], 2) },
		"data offset":     func(m []byte) { binary.LittleEndian.PutUint32(m[hdrDataOffset:], 512) },
		"capacity zero":   func(m []byte) { binary.LittleEndian.PutUint64(m[hdrCapacity:], 0) },
		"capacity !pow2":  func(m []byte) { binary.LittleEndian.PutUint64(m[hdrCapacity:], 1000) },
		"capacity > mem":  func(m []byte) { binary.LittleEndian.PutUint64(m[hdrCapacity:], 2048) },
		"capacity huge":   func(m []byte) { binary.LittleEndian.PutUint64(m[hdrCapacity:], 1<<62) },
		"tail misaligned": func(m []byte) { binary.LittleEndian.PutUint64(m[ProducerSlotOffset:], 3) },
		"head > tail":     func(m []byte) { binary.LittleEndian.PutUint64(m[ConsumerSlotOffset:], 8) },
		"head misaligned": func(m []byte) {
			binary.LittleEndian.PutUint64(m[ProducerSlotOffset:], 16)
			binary.LittleEndian.PutUint64(m[ConsumerSlotOffset:], 4)
		},
		"indices past 2^63": func(m []byte) {
			binary.LittleEndian.PutUint64(m[ProducerSlotOffset:], 1<<63)
			binary.LittleEndian.PutUint64(m[ConsumerSlotOffset:], 1<<63)
		},
		"tail - head > capacity": func(m []byte) {
			binary.LittleEndian.PutUint64(m[ProducerSlotOffset:], 2048)
		},
	}
	for name, scribble := range cases {
		t.Run(name, func(t *testing.T) {
			mem := newMem(t, 1024)
			scribble(mem)
			_, errP := NewProducer(mem, Config{})
			_, errC := NewConsumer(mem, Config{})
			assert.ErrorIs(t, errP, ErrCorrupt)
			assert.ErrorIs(t, errC, ErrCorrupt)
		})
	}
	_, err := NewConsumer(make([]byte, 100), Config{})
	assert.ErrorIs(t, err, ErrInvalid, "region shorter than the header")
}

// corruptConsumer writes two records, lets scribble change the shared state
// the producer owns, and checks the consumer reports ErrCorrupt, stickily,
// without panicking or reading outside the ring.
func TestConsumerRejectsHostileProducer(t *testing.T) {
	const capacity = 256
	tailAt := func(m []byte, v uint64) { binary.LittleEndian.PutUint64(m[ProducerSlotOffset:], v) }
	recAt := func(m []byte, off int, length, typ uint32) {
		binary.LittleEndian.PutUint64(m[DataOffset+off:], packRecordHeader(length, typ))
	}
	cases := map[string]func(m []byte){
		"tail backwards":           func(m []byte) { tailAt(m, 8) },
		"tail beyond a capacity":   func(m []byte) { tailAt(m, capacity+8) },
		"tail misaligned":          func(m []byte) { tailAt(m, 33) },
		"tail near 2^64":           func(m []byte) { tailAt(m, ^uint64(0)-7) },
		"unknown record type":      func(m []byte) { recAt(m, 0, 8, 7) },
		"zero record type":         func(m []byte) { recAt(m, 0, 8, 0) },
		"length past published":    func(m []byte) { recAt(m, 0, 100, recordData) },
		"length past data area":    func(m []byte) { tailAt(m, capacity); recAt(m, 0, capacity, recordData) },
		"length 2^32-1":            func(m []byte) { recAt(m, 0, ^uint32(0), recordData) },
		"padding not to the end":   func(m []byte) { recAt(m, 0, 8, recordPadding) },
		"padding past published":   func(m []byte) { recAt(m, 0, capacity-8, recordPadding) },
		"padding length overflows": func(m []byte) { recAt(m, 0, ^uint32(0)-6, recordPadding) },
		"padding at offset 0":      func(m []byte) { tailAt(m, capacity); recAt(m, 0, capacity-8, recordPadding) },
	}
	for name, scribble := range cases {
		t.Run(name, func(t *testing.T) {
			p, c, mem := pair(t, capacity)
			for i := 0; i < 2; i++ {
				_, err := p.Write([]byte("12345678"))
				require.NoError(t, err)
			}
			scribble(mem)
			c.SetDeadline(expired())
			var err error
			for i := 0; i < 4 && err == nil; i++ {
				_, err = c.Next()
			}
			require.ErrorIs(t, err, ErrCorrupt)
			_, err = c.Next()
			assert.ErrorIs(t, err, ErrCorrupt, "corruption is sticky")
			_, err = c.ReadInto(make([]byte, 64))
			assert.ErrorIs(t, err, ErrCorrupt)
		})
	}
}

// TestCorruptionSticksWhenThePeerUndoesIt: a record header that was bad once
// keeps the consumer broken even if the peer restores it.
func TestCorruptionSticksWhenThePeerUndoesIt(t *testing.T) {
	p, c, mem := pair(t, 256)
	for _, s := range []string{"12345678", "abcdefgh"} {
		_, err := p.Write([]byte(s))
		require.NoError(t, err)
	}
	hdr := binary.LittleEndian.Uint64(mem[DataOffset:])
	binary.LittleEndian.PutUint64(mem[DataOffset:], packRecordHeader(8, 7))
	_, err := c.Next()
	require.ErrorIs(t, err, ErrCorrupt)
	binary.LittleEndian.PutUint64(mem[DataOffset:], hdr)
	for i := 0; i < 2; i++ {
		_, err = c.Next()
		assert.ErrorIs(t, err, ErrCorrupt)
	}
}

func TestProducerRejectsHostileConsumer(t *testing.T) {
	const capacity = 128
	headAt := func(m []byte, v uint64) { binary.LittleEndian.PutUint64(m[ConsumerSlotOffset:], v) }
	cases := map[string]func(m []byte){
		"head beyond tail": func(m []byte) { headAt(m, 168) },
		"head misaligned":  func(m []byte) { headAt(m, 12) },
		"head backwards":   func(m []byte) { headAt(m, 0) },
		"head near 2^64":   func(m []byte) { headAt(m, ^uint64(0)-7) },
	}
	for name, scribble := range cases {
		t.Run(name, func(t *testing.T) {
			p, c, mem := pair(t, capacity)
			msg := make([]byte, 24)
			for i := 0; i < 4; i++ { // fill the ring
				_, err := p.Write(msg)
				require.NoError(t, err)
			}
			_, err := c.Next()
			require.NoError(t, err)
			c.Release() // head = 32; the producer has seen 0 so far
			_, err = p.Write(msg)
			require.NoError(t, err) // the producer now caches head = 32
			p.SetDeadline(expired())
			_, err = p.Write(msg) // full again
			require.ErrorIs(t, err, os.ErrDeadlineExceeded)
			scribble(mem)
			_, err = p.Write(msg)
			require.ErrorIs(t, err, ErrCorrupt)
			_, err = p.Write(msg)
			assert.ErrorIs(t, err, ErrCorrupt, "corruption is sticky")
		})
	}
}

// A memfd a peer passed that is unsealed, of the wrong size or not a memfd
// at all is bad memory from the peer: OpenRegion reports ErrCorrupt with
// the detail in the message. Bad arguments give ErrInvalid.
func TestOpenRegionErrors(t *testing.T) {
	const capacity = 4096
	memfd := func(sealed bool, size int) *os.File {
		fd, err := unix.MemfdCreate("test", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
		require.NoError(t, err)
		f := os.NewFile(uintptr(fd), "memfd")
		require.NoError(t, f.Truncate(int64(size)))
		if sealed {
			_, err = unix.FcntlInt(f.Fd(), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW)
			require.NoError(t, err)
		}
		return f
	}
	regular := func() *os.File {
		f, err := os.CreateTemp(t.TempDir(), "region")
		require.NoError(t, err)
		require.NoError(t, f.Truncate(int64(RegionSize(capacity))))
		return f
	}
	for _, tc := range []struct {
		name     string
		f        func() *os.File
		capacity int
		want     error
		detail   string
	}{
		{"unsealed", func() *os.File { return memfd(false, RegionSize(capacity)) }, capacity, ErrCorrupt, "lack F_SEAL_SHRINK|F_SEAL_GROW"},
		{"wrong size", func() *os.File { return memfd(true, RegionSize(2*capacity)) }, capacity, ErrCorrupt, "want 8192"},
		{"not a memfd", regular, capacity, ErrCorrupt, "F_GET_SEALS"},
		{"bad capacity", func() *os.File { return memfd(true, RegionSize(capacity)) }, 1000, ErrInvalid, "capacity 1000"},
		{"nil file", func() *os.File { return nil }, capacity, ErrInvalid, "nil file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := OpenRegion(tc.f(), tc.capacity)
			require.Nil(t, r)
			assert.ErrorIs(t, err, tc.want)
			for _, other := range []error{ErrCorrupt, ErrInvalid} {
				if other != tc.want {
					assert.NotErrorIs(t, err, other)
				}
			}
			assert.ErrorContains(t, err, tc.detail)
		})
	}
}
