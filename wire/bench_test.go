package wire

import (
	"fmt"
	"testing"

	"github.com/sypas/go/frame"
	"github.com/sypas/go/internal/benchcheck"
)

var benchSizes = []int{64, 1 << 10, 64<<10 - 64}

func sizeName(n int) string {
	switch {
	case n >= 63<<10:
		return "64KiB"
	case n >= 1<<10:
		return fmt.Sprintf("%dKiB", n>>10)
	}
	return fmt.Sprintf("%dB", n)
}

// BenchmarkRequestEncode encodes a whole REQUEST frame (header + payload)
// into a reused buffer, as a ring writer would.
func BenchmarkRequestEncode(b *testing.B) {
	for _, n := range benchSizes {
		b.Run(sizeName(n), func(b *testing.B) { benchRequestEncode(b, n) })
	}
}

func benchRequestEncode(b *testing.B, n int) {
	m := Request{Method: []byte("kv.get"), Body: make([]byte, n)}
	h := frame.Header{StreamID: 1, Correlation: 2, CapRef: 3}
	buf := make([]byte, 0, frame.HeaderSize+m.Len())
	b.SetBytes(int64(frame.HeaderSize + m.Len()))
	b.ReportAllocs()
	for b.Loop() {
		var err error
		if buf, err = AppendFrame(buf[:0], h, &m); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkRequestDecode decodes a whole REQUEST frame: header, then payload.
// Decoding aliases the method and body, so there are no bytes to count
// (no MB/s) and the cost does not depend on the size.
func BenchmarkRequestDecode(b *testing.B) {
	for _, n := range benchSizes {
		b.Run(sizeName(n), func(b *testing.B) { benchRequestDecode(b, n) })
	}
}

func benchRequestDecode(b *testing.B, n int) {
	m := Request{Method: []byte("kv.get"), Body: make([]byte, n)}
	buf, err := AppendFrame(nil, frame.Header{StreamID: 1, Correlation: 2, CapRef: 3}, &m)
	if err != nil {
		b.Fatal(err)
	}
	var f frame.Frame
	var got Request
	b.ReportAllocs()
	for b.Loop() {
		if _, err := f.Decode(buf, frame.Config{}); err != nil {
			b.Fatal(err)
		}
		if err := DecodeFrame(&f, &got); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkPayloads encodes and decodes the payload of every sample message.
func BenchmarkPayloads(b *testing.B) {
	for _, m := range samples() {
		p, _ := m.Append(nil)
		got := fresh(m)
		if r, ok := got.(*Regions); ok {
			r.Entries = make([]Region, 0, MaxRegions)
		}
		buf := make([]byte, 0, len(p))
		b.Run(m.Type().String()+"/encode", func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				buf, _ = m.Append(buf[:0])
			}
		})
		b.Run(m.Type().String()+"/decode", func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if err := got.Decode(p); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// Every benchmark's SetBytes is what it moves: BenchmarkRequestDecode/64KiB
// counted the body it only aliases.
func TestBenchmarksCountMovedBytes(t *testing.T) {
	n := benchSizes[len(benchSizes)-1]
	benchcheck.Plausible(t, map[string]func(*testing.B){
		"RequestEncode": func(b *testing.B) { benchRequestEncode(b, n) },
		"RequestDecode": func(b *testing.B) { benchRequestDecode(b, n) },
	})
}
