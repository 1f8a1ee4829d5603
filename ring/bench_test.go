package ring

import (
	"errors"
	"fmt"
	"io"
	"testing"

	"github.com/sypas/go/internal/benchcheck"
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

// copyingConsumers read one record and copy its payload into buf: with
// ReadInto, or as a zero-copy consumer that copies, with Next, copy and a
// Release once 4 KiB are read (ReadInto's lag at most).
var copyingConsumers = []struct {
	name string
	read func(c *Consumer, buf []byte) func() error
}{
	{"readinto", func(c *Consumer, buf []byte) func() error {
		return func() error { _, err := c.ReadInto(buf); return err }
	}},
	{"next-copy", func(c *Consumer, buf []byte) func() error {
		unreleased := 0
		return func() error {
			v, err := c.Next()
			if err != nil {
				return err
			}
			copy(buf, v)
			if unreleased += len(v); unreleased >= maxReadIntoLag {
				c.Release()
				unreleased = 0
			}
			return nil
		}
	}},
}

// commitCopy commits a record holding msg, reserving with TryReserve first.
func commitCopy(b *testing.B, p *Producer, msg []byte) {
	m := p.TryReserve(len(msg))
	if m == nil {
		var err error
		if m, err = p.Reserve(len(msg)); err != nil {
			b.Fatal(err)
		}
	}
	copy(m, msg)
	p.Commit(len(msg))
}

// BenchmarkCopyBatch: one goroutine commits a batch of 64 records, flushes,
// then reads and copies out all 64: the consumer's own cost per record, with
// no cross-core traffic, for each copying consumer.
func BenchmarkCopyBatch(b *testing.B) {
	for _, cons := range copyingConsumers {
		for _, size := range benchSizes[:2] {
			b.Run(cons.name+"/"+sizeName(size), func(b *testing.B) {
				const batch = 64
				p, c, _ := pair(b, 1<<18)
				msg, buf := make([]byte, size), make([]byte, size)
				read := cons.read(c, buf)
				b.SetBytes(int64(size))
				b.ReportAllocs()
				for i := 0; b.Loop(); i++ {
					commitCopy(b, p, msg)
					if i%batch == batch-1 {
						p.Flush()
						for range batch {
							if err := read(); err != nil {
								b.Fatal(err)
							}
						}
					}
				}
				reportRate(b)
			})
		}
	}
}

// BenchmarkStreamGoroutines: producer and consumer goroutines in one
// process, with the default Config, the producer publishing a batch of 64
// records per Flush so that the consumer sets the pace, and the consumer
// copying each payload out (copyingConsumers). A producer waiting for room
// polls head, so a consumer that stores head for every record pays for that
// cache line moving back and forth.
func BenchmarkStreamGoroutines(b *testing.B) {
	for _, cons := range copyingConsumers {
		for _, size := range benchSizes {
			b.Run(cons.name+"/"+sizeName(size), func(b *testing.B) { benchStreamGoroutines(b, cons.read, size) })
		}
	}
}

func benchStreamGoroutines(b *testing.B, consumer func(c *Consumer, buf []byte) func() error, size int) {
	p, c, _ := pairWith(b, 1<<18, Config{})
	msg, buf := make([]byte, size), make([]byte, size)
	read := consumer(c, buf)
	b.SetBytes(int64(size))
	b.ReportAllocs()
	done := make(chan error, 1)
	go func() {
		for {
			if err := read(); err != nil {
				c.Close() // a blocked producer fails instead of hanging
				done <- err
				return
			}
		}
	}()
	for i := 0; b.Loop(); i++ {
		commitCopy(b, p, msg)
		if i%64 == 63 {
			p.Flush()
		}
	}
	p.Close()
	if err := <-done; !errors.Is(err, io.EOF) {
		b.Fatal(err)
	}
	reportRate(b)
}

// Every benchmark's SetBytes is what it moves: BenchmarkZeroCopyBatch/64KiB
// counted 64 KiB per record but wrote 1 byte of it, and reported 2.9 TB/s.
func TestBenchmarksCountMovedBytes(t *testing.T) {
	size := benchSizes[len(benchSizes)-1]
	benchcheck.Plausible(t, map[string]func(*testing.B){
		"WriteRead":        func(b *testing.B) { benchWriteRead(b, size) },
		"ZeroCopyBatch":    func(b *testing.B) { benchZeroCopyBatch(b, size) },
		"StreamGoroutines": func(b *testing.B) { benchStreamGoroutines(b, copyingConsumers[0].read, size) },
	})
}
