package bulk_test

import (
	"context"
	"encoding/binary"
	"fmt"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/bulk"
	"github.com/sypas/go/frame"
	"github.com/sypas/go/wire"
)

// The hot paths allocate nothing: Alloc and Free, Alloc, Send and Ack, and
// View, while the region has room.
func TestHotPathsAllocateNothing(t *testing.T) {
	r, p := newPair(t, bulk.Config{Size: 1 << 20, BlockSize: 4096})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, size := range []int{1, 4096, 100 << 10, 1 << 20} {
		allocs := testing.AllocsPerRun(100, func() {
			s, err := r.Alloc(ctx, size)
			if err != nil {
				panic(err)
			}
			if err := r.Free(s); err != nil {
				panic(err)
			}
		})
		assert.Zero(t, allocs, "Alloc+Free of %d bytes", size)

		var d wire.Bulk
		allocs = testing.AllocsPerRun(100, func() {
			s, err := r.Alloc(ctx, size)
			if err != nil {
				panic(err)
			}
			if d, err = r.Send(s, frame.TypeRequest, 0); err != nil {
				panic(err)
			}
			if _, err := p.View(&d); err != nil {
				panic(err)
			}
			if err := r.Ack(&d); err != nil {
				panic(err)
			}
		})
		assert.Zero(t, allocs, "Alloc+Send+View+Ack of %d bytes", size)
	}
	assert.Equal(t, int64(0), r.Stats().Spans)
}

// Many goroutines allocate, fill, send, view and acknowledge spans of mixed
// sizes at once, in a region too small for all of them, so that they split,
// merge and wait. Each fills its span with its own pattern and checks it
// through the peer's view before acknowledging: two spans that overlapped
// would spoil each other's pattern.
func TestConcurrentSenders(t *testing.T) {
	r, p := newPair(t, bulk.Config{Size: 1 << 20, BlockSize: 4096})
	workers, rounds := 8, 2000
	if testing.Short() {
		rounds = 200
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- func() error {
				x := uint64(w + 1)
				for i := range rounds {
					x = x*6364136223846793005 + 1442695040888963407
					size := 8 + int(x>>40)%(200<<10)
					s, err := r.Alloc(ctx, size)
					if err != nil {
						return err
					}
					b := s.Bytes()
					tag := uint64(w)<<32 | uint64(i)
					for off := 0; off+8 <= len(b); off += 4096 {
						binary.LittleEndian.PutUint64(b[off:], tag)
					}
					d, err := r.Send(s, frame.TypeRequest, 0)
					if err != nil {
						return err
					}
					runtime.Gosched()
					v, err := p.View(&d)
					if err != nil {
						return err
					}
					for off := 0; off+8 <= len(v); off += 4096 {
						if got := binary.LittleEndian.Uint64(v[off:]); got != tag {
							return fmt.Errorf("worker %d round %d: offset %d of span %d+%d holds %#x: spans overlap",
								w, i, off, d.Offset, d.Length, got)
						}
					}
					if i%7 == 0 {
						err = r.Unsend(s) // as if the frame had not left
					} else {
						err = r.Ack(&d)
					}
					if err != nil {
						return err
					}
				}
				return nil
			}()
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	st := r.Stats()
	assert.Equal(t, int64(0), st.Spans, "no leak")
	assert.Equal(t, int64(1<<20), st.FreeBytes)
	assert.Zero(t, st.Refused)
	t.Logf("%+v", st)
	require.NoError(t, r.Free(mustAlloc(t, r, 1<<20)), "the whole region merges back")
}

func BenchmarkAllocFree(b *testing.B) {
	for _, size := range []int{64 << 10, 1 << 20} {
		b.Run(fmt.Sprintf("%dKiB", size>>10), func(b *testing.B) {
			r, _ := newPair(b, bulk.Config{})
			ctx := context.Background()
			b.ReportAllocs()
			for b.Loop() {
				allocFree(b, r, ctx, size)
			}
		})
	}
	// Many senders at once (4 per core, as a Client's callers), lock-free,
	// and the same behind one global mutex: what the free lists save.
	for _, locked := range []bool{false, true} {
		name := "parallel-64KiB"
		if locked {
			name += "-mutex"
		}
		b.Run(name, func(b *testing.B) {
			r, _ := newPair(b, bulk.Config{})
			ctx := context.Background()
			var mu sync.Mutex
			b.ReportAllocs()
			b.SetParallelism(4)
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if locked {
						mu.Lock()
					}
					allocFree(b, r, ctx, 64<<10)
					if locked {
						mu.Unlock()
					}
				}
			})
		})
	}
}

func allocFree(b *testing.B, r *bulk.Region, ctx context.Context, size int) {
	s, err := r.Alloc(ctx, size)
	if err != nil {
		b.Fatal(err)
	}
	if err := r.Free(s); err != nil {
		b.Fatal(err)
	}
}

// Alloc, Send and Ack: a span's round trip through the allocator, from
// every goroutine at once (GOMAXPROCS of them, RunParallel) or from one.
func BenchmarkAllocSendAck(b *testing.B) {
	for _, par := range []bool{false, true} {
		name := "1"
		if par {
			name = "parallel"
		}
		b.Run(name, func(b *testing.B) {
			r, _ := newPair(b, bulk.Config{})
			ctx := context.Background()
			one := func() {
				s, err := r.Alloc(ctx, 100<<10)
				if err != nil {
					b.Fatal(err)
				}
				d, err := r.Send(s, frame.TypeRequest, 0)
				if err != nil {
					b.Fatal(err)
				}
				if err := r.Ack(&d); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportAllocs()
			if !par {
				for b.Loop() {
					one()
				}
				return
			}
			b.SetParallelism(4) // more senders than the machine's cores, as a Client's callers are
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					one()
				}
			})
		})
	}
}

func BenchmarkView(b *testing.B) {
	r, p := newPair(b, bulk.Config{})
	d, err := r.Send(mustAlloc(b, r, 1<<20), frame.TypeRequest, 0)
	require.NoError(b, err)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := p.View(&d); err != nil {
			b.Fatal(err)
		}
	}
}

// The allocator's slow path at its worst: every block free but none merged,
// and one Alloc of the whole region, which merges them all.
func BenchmarkMergeWholeRegion(b *testing.B) {
	for _, c := range []struct {
		name        string
		size, block int
	}{{"64MiB-64KiB", bulk.DefaultSize, bulk.DefaultBlockSize}, {"1GiB-4KiB", bulk.MaxSize, bulk.MinBlockSize}} {
		b.Run(c.name, func(b *testing.B) {
			r, _ := newPair(b, bulk.Config{Size: c.size, BlockSize: c.block})
			spans := make([]bulk.Span, c.size/c.block)
			b.ReportAllocs()
			for b.Loop() {
				b.StopTimer()
				for i := range spans {
					spans[i] = mustAlloc(b, r, 1)
				}
				for _, s := range spans {
					if err := r.Free(s); err != nil {
						b.Fatal(err)
					}
				}
				b.StartTimer()
				allocFree(b, r, context.Background(), c.size)
			}
		})
	}
}
