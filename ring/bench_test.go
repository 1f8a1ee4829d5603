package ring

import (
	"fmt"
	"testing"

	"github.com/sypas/sypas/internal/benchcheck"
)

var benchSizes = []int{64, 1024, 64 << 10}

// reportRate adds messages per second next to ns/op and MB/s.
func reportRate(b *testing.B) {
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
}

func sizeName(n int) string {
	if n >= 1024 {
		return fmt.Sprintf("%dKiB", n>>10)
	}
	return fmt.Sprintf("%dB", n)
}

// BenchmarkWriteRead: one goroutine writes a record and reads it back, the
// per-message CPU cost of the ring without any cross-core traffic.
func BenchmarkWriteRead(b *testing.B) {
	for _, size := range benchSizes {
		b.Run(sizeName(size), func(b *testing.B) { benchWriteRead(b, size) })
	}
}

func benchWriteRead(b *testing.B, size int) {
	p, c, _ := pair(b, 1<<18)
	msg := make([]byte, size)
	b.SetBytes(int64(size))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := p.Write(msg); err != nil {
			b.Fatal(err)
		}
		if _, err := c.Next(); err != nil {
			b.Fatal(err)
		}
		c.Release()
	}
	reportRate(b)
}

// BenchmarkZeroCopyBatch: Reserve a batch of records (16, or fewer when
// larger ones would not fit half the ring), build each in place (all size
// bytes written, which is what SetBytes counts) and Commit it, publish them
// with one Flush, then Next each and Release once.
func BenchmarkZeroCopyBatch(b *testing.B) {
	for _, size := range benchSizes {
		b.Run(sizeName(size), func(b *testing.B) { benchZeroCopyBatch(b, size) })
	}
}

func benchZeroCopyBatch(b *testing.B, size int) {
	const capacity = 1 << 18
	batch := max(1, min(16, capacity/2/(size+RecordHeaderSize)))
	p, c, _ := pair(b, capacity)
	msg := make([]byte, size)
	b.SetBytes(int64(size))
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		m, err := p.Reserve(size)
		if err != nil {
			b.Fatal(err)
		}
		copy(m, msg)
		m[0] = byte(i)
		p.Commit(size)
		if i%batch == batch-1 {
			p.Flush()
			for j := 0; j < batch; j++ {
				if _, err := c.Next(); err != nil {
					b.Fatal(err)
				}
			}
			c.Release()
		}
	}
	reportRate(b)
}

// BenchmarkStreamGoroutines: producer and consumer goroutines in one
// process, the consumer copying each record out with ReadInto.
func BenchmarkStreamGoroutines(b *testing.B) {
	for _, size := range benchSizes {
		b.Run(sizeName(size), func(b *testing.B) { benchStreamGoroutines(b, size) })
	}
}

func benchStreamGoroutines(b *testing.B, size int) {
	p, c, _ := pair(b, 1<<18)
	msg := make([]byte, size)
	buf := make([]byte, size)
	b.SetBytes(int64(size))
	b.ReportAllocs()
	done := make(chan error, 1)
	go func() {
		for {
			if _, err := c.ReadInto(buf); err != nil {
				done <- err
				return
			}
		}
	}()
	for b.Loop() {
		if _, err := p.Write(msg); err != nil {
			b.Fatal(err)
		}
	}
	p.Close()
	<-done
	reportRate(b)
}

// Every benchmark's SetBytes is what it moves: BenchmarkZeroCopyBatch/64KiB
// counted 64 KiB per record but wrote 1 byte of it, and reported 2.9 TB/s.
func TestBenchmarksCountMovedBytes(t *testing.T) {
	size := benchSizes[len(benchSizes)-1]
	benchcheck.Plausible(t, map[string]func(*testing.B){
		"WriteRead":        func(b *testing.B) { benchWriteRead(b, size) },
		"ZeroCopyBatch":    func(b *testing.B) { benchZeroCopyBatch(b, size) },
		"StreamGoroutines": func(b *testing.B) { benchStreamGoroutines(b, size) },
	})
}
