package frame

import (
	"bytes"
	"fmt"
	"io"
	"testing"

	"github.com/sypas/go/internal/benchcheck"
)

var benchSizes = []int{64, 1 << 10, 64 << 10}

func sizeName(n int) string {
	if n >= 1<<10 {
		return fmt.Sprintf("%dKiB", n>>10)
	}
	return fmt.Sprintf("%dB", n)
}

func benchFrame(n int, flags Flags) Frame {
	return Frame{
		Header:  Header{Type: TypeRequest, Flags: flags, StreamID: 1, Correlation: 2, CapRef: 3},
		Payload: make([]byte, n),
	}
}

func BenchmarkEncode(b *testing.B) {
	for _, crc := range []Flags{0, FlagChecksum} {
		for _, n := range benchSizes {
			b.Run(fmt.Sprintf("%s/crc=%v", sizeName(n), crc != 0), func(b *testing.B) { benchEncode(b, n, crc) })
		}
	}
}

func benchEncode(b *testing.B, n int, crc Flags) {
	f := benchFrame(n, crc)
	slot := make([]byte, f.Len())
	b.SetBytes(int64(f.Len()))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := f.EncodeTo(slot); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkAppend(b *testing.B) {
	f := benchFrame(1<<10, 0)
	buf := make([]byte, 0, f.Len())
	b.SetBytes(int64(f.Len()))
	b.ReportAllocs()
	for b.Loop() {
		buf, _ = f.Append(buf[:0])
	}
}

// BenchmarkDecode: with crc=true the whole frame is hashed, and counted in
// MB/s; without, Decode reads the header and aliases the payload, so there
// are no bytes to count and the cost does not depend on the size.
func BenchmarkDecode(b *testing.B) {
	for _, crc := range []Flags{0, FlagChecksum} {
		for _, n := range benchSizes {
			b.Run(fmt.Sprintf("%s/crc=%v", sizeName(n), crc != 0), func(b *testing.B) { benchDecode(b, n, crc) })
		}
	}
}

func benchDecode(b *testing.B, n int, crc Flags) {
	f := benchFrame(n, crc)
	buf, _ := f.Append(nil)
	var got Frame
	if crc != 0 {
		b.SetBytes(int64(len(buf)))
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := got.Decode(buf, Config{}); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkDecodeHeader(b *testing.B) {
	f := benchFrame(64, FlagChecksum)
	buf, _ := f.Append(nil)
	var h Header
	b.ReportAllocs()
	for b.Loop() {
		if err := h.Decode(buf, Config{}); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkReader reads 1 KiB frames from an in-memory stream.
func BenchmarkReader(b *testing.B) {
	f := benchFrame(1<<10, 0)
	one, _ := f.Append(nil)
	stream := bytes.Repeat(one, 1024)
	br := bytes.NewReader(stream)
	r := NewReader(br, Config{})
	b.SetBytes(int64(len(one)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := r.ReadFrame(); err == io.EOF {
			br.Reset(stream)
			r = NewReader(br, Config{})
		} else if err != nil {
			b.Fatal(err)
		}
	}
}

// Every benchmark's SetBytes is what it moves: BenchmarkDecode/64KiB/crc=false
// counted the 64 KiB payload it only aliases.
func TestBenchmarksCountMovedBytes(t *testing.T) {
	n := benchSizes[len(benchSizes)-1]
	benchcheck.Plausible(t, map[string]func(*testing.B){
		"Encode":          func(b *testing.B) { benchEncode(b, n, 0) },
		"Encode/crc=true": func(b *testing.B) { benchEncode(b, n, FlagChecksum) },
		"Decode":          func(b *testing.B) { benchDecode(b, n, 0) },
		"Decode/crc=true": func(b *testing.B) { benchDecode(b, n, FlagChecksum) },
		"Append":          BenchmarkAppend,
		"Reader":          BenchmarkReader,
	})
}
