package ring

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/futex"
)

// newMem returns an 8-byte aligned, initialised region for a ring of capacity bytes.
func newMem(t testing.TB, capacity int) []byte {
	t.Helper()
	words := make([]uint64, (Size(capacity)+7)/8)
	mem := unsafeBytes(words)[:Size(capacity)]
	require.NoError(t, Init(mem, capacity))
	return mem
}

// pair attaches both ends to a fresh ring; parking at once avoids burning
// CPU in tests.
func pair(t testing.TB, capacity int) (*Producer, *Consumer, []byte) {
	return pairWith(t, capacity, Config{Idle: futex.Config{Policy: futex.PolicyPark}})
}

// pairWith is pair with the given Config for both ends.
func pairWith(t testing.TB, capacity int, cfg Config) (*Producer, *Consumer, []byte) {
	t.Helper()
	mem := newMem(t, capacity)
	p, err := NewProducer(mem, cfg)
	require.NoError(t, err)
	c, err := NewConsumer(mem, cfg)
	require.NoError(t, err)
	return p, c, mem
}

// expired sets a deadline in the past, so waiting calls fail at once.
func expired() time.Time { return time.Now().Add(-time.Second) }

func TestInitRejectsBadArguments(t *testing.T) {
	words := make([]uint64, 1024)
	mem := unsafeBytes(words)
	for _, c := range []int{0, 8, 63, 100, 3000, MaxCapacity * 2} {
		assert.ErrorIs(t, Init(mem, c), ErrInvalid, "capacity %d", c)
	}
	assert.ErrorIs(t, Init(mem[:Size(1024)-1], 1024), ErrInvalid, "short region")
	assert.ErrorIs(t, Init(mem[1:Size(512)+1], 512), ErrInvalid, "misaligned region")
	require.NoError(t, Init(mem, 4096))
	assert.Equal(t, "SYPASRNG", string(mem[:8]))
}

func TestWriteThenRead(t *testing.T) {
	p, c, _ := pair(t, 1024)
	for _, msg := range []string{"", "a", "hello, ring", string(bytes.Repeat([]byte{7}, 100))} {
		n, err := p.Write([]byte(msg))
		require.NoError(t, err)
		assert.Equal(t, len(msg), n)
	}
	for _, want := range []string{"", "a", "hello, ring"} {
		got, err := c.Next()
		require.NoError(t, err)
		assert.Equal(t, want, string(got))
	}
	buf := make([]byte, 99)
	_, err := c.ReadInto(buf)
	assert.ErrorIs(t, err, ErrShortBuffer)
	buf = make([]byte, 200)
	n, err := c.ReadInto(buf) // the record stayed in the ring
	require.NoError(t, err)
	assert.Equal(t, bytes.Repeat([]byte{7}, 100), buf[:n])

	c.SetDeadline(expired())
	_, err = c.Next()
	assert.ErrorIs(t, err, os.ErrDeadlineExceeded)
}

func TestRecordsAreAlignedAndTailIsPublishedOnce(t *testing.T) {
	p, c, mem := pair(t, 1024)
	tail := u64At(mem, ProducerSlotOffset)
	for i := 0; i < 3; i++ {
		b, err := p.Reserve(5)
		require.NoError(t, err)
		copy(b, "abcde")
		require.NoError(t, p.Commit(5))
	}
	assert.Zero(t, tail.Load(), "committed records are not visible before Flush")
	c.SetDeadline(expired())
	_, err := c.Next()
	assert.ErrorIs(t, err, os.ErrDeadlineExceeded)

	require.NoError(t, p.Flush())
	assert.Equal(t, uint64(3*16), tail.Load(), "one store publishes the batch; each record is 8+5 rounded up to 16")
	c.SetDeadline(time.Time{})
	for i := 0; i < 3; i++ {
		b, err := c.Next()
		require.NoError(t, err)
		assert.Equal(t, "abcde", string(b))
	}
	assert.Zero(t, u64At(mem, ConsumerSlotOffset).Load(), "nothing released before Release")
	c.Release()
	assert.Equal(t, uint64(48), u64At(mem, ConsumerSlotOffset).Load(), "one store releases the batch")
}

func TestCommitShorterThanReserved(t *testing.T) {
	p, c, _ := pair(t, 256)
	b, err := p.Reserve(100)
	require.NoError(t, err)
	copy(b, "short")
	require.NoError(t, p.Commit(5))
	require.NoError(t, p.Flush())
	got, err := c.Next()
	require.NoError(t, err)
	assert.Equal(t, "short", string(got))

	assert.ErrorIs(t, p.Commit(1), ErrNoReservation)
	_, err = p.Reserve(8)
	require.NoError(t, err)
	_, err = p.Reserve(8)
	assert.ErrorIs(t, err, ErrInvalid, "second reservation before Commit")
	assert.ErrorIs(t, p.Commit(9), ErrInvalid, "commit more than reserved")
	require.NoError(t, p.Commit(8))
}

func TestWrapInsertsPaddingAndKeepsRecordsContiguous(t *testing.T) {
	p, c, mem := pair(t, 256)
	data := mem[DataOffset:]
	msg := bytes.Repeat([]byte{0xAB}, 100) // 112 bytes a record
	for lap := 0; lap < 5; lap++ {
		_, err := p.Write(msg)
		require.NoError(t, err)
		_, err = p.Write(msg)
		require.NoError(t, err)
		for i := 0; i < 2; i++ {
			got, err := c.Next()
			require.NoError(t, err)
			require.Equal(t, msg, got)
			c.Release()
		}
	}
	// 224 bytes used per lap leave 32 at the end: the third record pads them.
	hdr := binary.LittleEndian.Uint64(data[224:])
	assert.Equal(t, packRecordHeader(24, recordPadding), hdr, "padding record at the wrap")
}

func TestMaxRecordAndTooLarge(t *testing.T) {
	p, c, _ := pair(t, 512)
	assert.Equal(t, 504, p.MaxRecord())
	_, err := p.Reserve(505)
	assert.ErrorIs(t, err, ErrTooLarge)
	_, err = p.Reserve(-1)
	assert.ErrorIs(t, err, ErrInvalid)

	// Move off 0 so the biggest record has to pad and wait for the ring to empty.
	_, err = p.Write([]byte("x"))
	require.NoError(t, err)
	done := make(chan error, 1)
	big := bytes.Repeat([]byte{1}, 504)
	go func() { _, err := p.Write(big); done <- err }()
	got, err := c.Next()
	require.NoError(t, err)
	assert.Equal(t, "x", string(got))
	c.Release()
	got, err = c.Next()
	require.NoError(t, err)
	assert.Equal(t, big, got)
	require.NoError(t, <-done)
}

// fillNumbered fills a 128-byte ring with four 32-byte records numbered 0 to
// 3 in their first byte, and returns the message buffer.
func fillNumbered(t *testing.T, p *Producer) []byte {
	t.Helper()
	msg := make([]byte, 24)
	for i := 0; i < 4; i++ {
		msg[0] = byte(i)
		_, err := p.Write(msg)
		require.NoError(t, err)
	}
	return msg
}

func TestFullRingAppliesBackpressure(t *testing.T) {
	p, c, _ := pair(t, 128)
	msg := fillNumbered(t, p)
	p.SetDeadline(time.Now().Add(20 * time.Millisecond))
	_, err := p.Write(msg)
	assert.ErrorIs(t, err, os.ErrDeadlineExceeded, "a full ring waits, then fails at the deadline; nothing is dropped")

	p.SetDeadline(time.Time{})
	done := make(chan error, 1)
	go func() { msg[0] = 4; _, err := p.Write(msg); done <- err }()
	for i := 0; i < 5; i++ {
		got, err := c.Next()
		require.NoError(t, err)
		assert.Equal(t, byte(i), got[0], "records arrive in order")
		c.Release()
	}
	require.NoError(t, <-done)
}

func TestProducerCloseGivesEOFAfterDrain(t *testing.T) {
	p, c, _ := pair(t, 256)
	for _, s := range []string{"one", "two"} {
		_, err := p.Write([]byte(s))
		require.NoError(t, err)
	}
	require.NoError(t, p.Close())
	require.NoError(t, p.Close(), "idempotent")
	_, err := p.Write([]byte("three"))
	assert.ErrorIs(t, err, ErrClosed)
	for _, s := range []string{"one", "two"} {
		got, err := c.Next()
		require.NoError(t, err)
		assert.Equal(t, s, string(got))
	}
	_, err = c.Next()
	assert.ErrorIs(t, err, io.EOF)
}

func TestProducerCloseWakesParkedConsumer(t *testing.T) {
	p, c, _ := pair(t, 256)
	done := make(chan error, 1)
	go func() { _, err := c.Next(); done <- err }()
	time.Sleep(10 * time.Millisecond)
	require.NoError(t, p.Close())
	assert.ErrorIs(t, <-done, io.EOF)
}

func TestConsumerCloseFailsWritesAndWakesProducer(t *testing.T) {
	p, c, _ := pair(t, 128)
	msg := make([]byte, 56)
	for i := 0; i < 2; i++ {
		_, err := p.Write(msg)
		require.NoError(t, err)
	}
	done := make(chan error, 1)
	go func() { _, err := p.Write(msg); done <- err }()
	time.Sleep(10 * time.Millisecond)
	require.NoError(t, c.Close())
	assert.ErrorIs(t, <-done, ErrPeerClosed)
	_, err := c.Next()
	assert.ErrorIs(t, err, ErrClosed)
}

func TestLocalCloseAndInterruptWakeBlockedCalls(t *testing.T) {
	p, c, _ := pair(t, 128)
	done := make(chan error, 1)
	go func() { _, err := c.Next(); done <- err }()
	time.Sleep(10 * time.Millisecond)
	require.NoError(t, c.Close())
	assert.ErrorIs(t, <-done, ErrClosed)

	p, _, _ = pair(t, 128) // a fresh ring: the closed consumer fails writes
	errPeerDied := errors.New("peer died")
	for i := 0; i < 4; i++ {
		_, err := p.Write(make([]byte, 24))
		require.NoError(t, err)
	}
	go func() { _, err := p.Write(make([]byte, 24)); done <- err }()
	time.Sleep(10 * time.Millisecond)
	p.Interrupt(errPeerDied)
	assert.ErrorIs(t, <-done, errPeerDied)
}

func TestDeadlineChangeWakesWaiter(t *testing.T) {
	_, c, _ := pair(t, 128)
	done := make(chan error, 1)
	go func() { _, err := c.Next(); done <- err }()
	time.Sleep(10 * time.Millisecond)
	c.SetDeadline(time.Now())
	select {
	case err := <-done:
		assert.ErrorIs(t, err, os.ErrDeadlineExceeded)
	case <-time.After(5 * time.Second):
		t.Fatal("a parked Next did not notice its new deadline")
	}
}

// TestRandomAgainstModel drives both ends from one goroutine with random
// sizes, batches and releases, checking every record against a FIFO of
// committed records: nothing lost, duplicated, reordered or corrupted.
func TestRandomAgainstModel(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, capacity := range []int{64, 256, 4096} {
		p, c, _ := pair(t, capacity)
		p.SetDeadline(expired())
		c.SetDeadline(expired())
		var committed [][]byte
		read := 0
		for step := 0; step < 20000; step++ {
			switch rng.IntN(5) {
			case 0, 1: // produce a record, sometimes the largest there is
				n := rng.IntN(min(40, p.MaxRecord()) + 1)
				if rng.IntN(8) == 0 {
					n = rng.IntN(p.MaxRecord() + 1)
				}
				b := p.TryReserve(n)
				if b == nil || rng.IntN(2) == 0 {
					tried := b == nil
					if b != nil && rng.IntN(2) == 0 {
						p.Abandon()
					} else if b != nil {
						require.NoError(t, p.Commit(0)) // keep the model: an empty record
						committed = append(committed, []byte{})
					}
					pos, head := p.pos, p.cachedHead
					var err error
					b, err = p.Reserve(n)
					if errors.Is(err, os.ErrDeadlineExceeded) {
						continue // full: nothing was reserved
					}
					require.NoError(t, err)
					if tried {
						// TryReserve declined: Reserve must have had more to
						// do than hand out room already known to be free.
						require.True(t, pos&p.mask == 0 || p.pos != pos || p.cachedHead != head,
							"TryReserve(%d) declined room known to be free: pos %d, head %d, limit %d", n, pos, head, p.limit)
					}
				}
				require.Len(t, b, n)
				for i := range b {
					b[i] = byte(rng.Uint32())
				}
				committed = append(committed, bytes.Clone(b))
				require.NoError(t, p.Commit(n))
			case 2:
				require.NoError(t, p.Flush())
			case 3: // consume
				got, err := c.Next()
				held := c.pos-c.released == c.capacity
				if errors.Is(err, ErrViewsHeld) {
					require.True(t, held, "ErrViewsHeld with free room")
					continue
				}
				if errors.Is(err, os.ErrDeadlineExceeded) {
					require.False(t, held, "waited with the whole ring held")
					continue
				}
				require.NoError(t, err)
				require.Equal(t, committed[read], got, "record %d", read)
				read++
			case 4:
				c.Release()
			}
		}
		require.NoError(t, p.Flush())
		for ; read < len(committed); read++ {
			got, err := c.Next()
			require.NoError(t, err)
			require.Equal(t, committed[read], got, "record %d", read)
		}
		c.Release()
		_, err := c.Next()
		assert.ErrorIs(t, err, os.ErrDeadlineExceeded, "nothing beyond what was committed")
	}
}

// TestConcurrentStream checks order and content with both ends running at once.
func TestConcurrentStream(t *testing.T) {
	p, c, _ := pair(t, 1<<16) // room for the views held between releases, many times over
	const n = 20000
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		rng := rand.New(rand.NewPCG(3, 4))
		buf := make([]byte, 600)
		for i := 0; i < n; i++ {
			m := 8 + rng.IntN(len(buf)-8)
			binary.LittleEndian.PutUint64(buf, uint64(i))
			for j := 8; j < m; j++ {
				buf[j] = byte(i + j)
			}
			if _, err := p.Write(buf[:m]); err != nil {
				t.Error(err)
				return
			}
		}
		p.Close()
	}()
	for i := 0; ; i++ {
		got, err := c.Next()
		if errors.Is(err, io.EOF) {
			assert.Equal(t, n, i)
			break
		}
		require.NoError(t, err)
		require.Equal(t, uint64(i), binary.LittleEndian.Uint64(got))
		for j := 8; j < len(got); j++ {
			if got[j] != byte(i+j) {
				t.Fatalf("record %d byte %d corrupted", i, j)
			}
		}
		if i%7 == 0 {
			c.Release()
		}
	}
	wg.Wait()
}

func TestHotPathsDoNotAllocate(t *testing.T) {
	p, c, _ := pair(t, 4096)
	msg := make([]byte, 64)
	buf := make([]byte, 64)
	allocs := testing.AllocsPerRun(1000, func() {
		if _, err := p.Write(msg); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Next(); err != nil {
			t.Fatal(err)
		}
		c.Release()
		b, _ := p.Reserve(64)
		copy(b, msg)
		_ = p.Commit(64)
		_ = p.Flush()
		if _, err := c.ReadInto(buf); err != nil {
			t.Fatal(err)
		}
		if b = p.TryReserve(64); b == nil {
			b, _ = p.Reserve(64) // at the start of a lap
		}
		copy(b, msg)
		if err := p.Commit(64); err != nil {
			t.Fatal(err)
		}
		if err := p.Flush(); err != nil {
			t.Fatal(err)
		}
		if _, err := c.ReadInto(buf); err != nil {
			t.Fatal(err)
		}
	})
	assert.Zero(t, allocs)
}

// TestTryReserve checks that TryReserve hands out only room already known to
// be free and leaves everything else (padding, waiting, errors) to Reserve.
func TestTryReserve(t *testing.T) {
	p, c, _ := pair(t, 256)
	p.SetDeadline(expired())
	b := p.TryReserve(0)
	require.NotNil(t, b, "an empty record")
	assert.Empty(t, b)
	assert.Nil(t, p.TryReserve(1), "a reservation is pending")
	_, err := p.Reserve(1)
	assert.ErrorIs(t, err, ErrInvalid, "Reserve says why")
	require.NoError(t, p.Commit(0))
	assert.Nil(t, p.TryReserve(-1))
	assert.Nil(t, p.TryReserve(p.MaxRecord()+1))

	// Fill the ring: 3 records of 72 bytes after the 8-byte empty one.
	for i := 0; i < 3; i++ {
		b := p.TryReserve(64)
		require.NotNil(t, b, "record %d", i)
		b[0] = byte(i)
		require.NoError(t, p.Commit(64))
	}
	assert.Nil(t, p.TryReserve(64), "only 32 bytes left before the end")
	require.NoError(t, p.Flush())
	for i := 0; i < 4; i++ {
		_, err := c.Next()
		require.NoError(t, err)
	}
	c.Release()
	assert.Nil(t, p.TryReserve(64), "the wrap needs padding, which is Reserve's job")
	b, err = p.Reserve(64)
	require.NoError(t, err, "Reserve pads and re-reads the head")
	b[0] = 9
	require.NoError(t, p.Commit(64))
	require.NotNil(t, p.TryReserve(64), "room after the wrap is known to be free")
	require.NoError(t, p.Commit(64))
	require.NoError(t, p.Flush())
	got, err := c.Next()
	require.NoError(t, err)
	assert.Equal(t, byte(9), got[0])

	require.NoError(t, c.Close())
	assert.ErrorIs(t, p.Flush(), ErrPeerClosed)
	assert.Nil(t, p.TryReserve(8), "after an error")
	p2, _, _ := pair(t, 256)
	require.NoError(t, p2.Close())
	assert.Nil(t, p2.TryReserve(8), "after Close")
}

// TestTryReserveAfterExactFit: a lap filled exactly needs no padding, and the
// room the producer already knows of in the new lap still goes to TryReserve.
func TestTryReserveAfterExactFit(t *testing.T) {
	p, c, _ := pair(t, 256) // 8 records of 32 bytes a lap
	p.SetDeadline(expired())
	write := func() (fast bool) {
		if fast = p.TryReserve(24) != nil; !fast {
			_, err := p.Reserve(24)
			require.NoError(t, err)
		}
		require.NoError(t, p.Commit(24))
		require.NoError(t, p.Flush())
		return fast
	}
	read := func(n int) {
		for range n {
			_, err := c.Next()
			require.NoError(t, err)
		}
		c.Release()
	}
	for i := range 8 {
		require.True(t, write(), "lap 1, record %d", i)
	}
	read(5)
	require.False(t, write(), "lap 2 starts in Reserve, which reads head 160")
	for range 4 {
		write()
	}
	read(8) // head 416
	for range 3 {
		write() // Reserve reads head 416 at once: lap 2 ends with 160 bytes known free
	}
	require.False(t, write(), "lap 3 starts in Reserve")
	for i := range 4 {
		assert.True(t, write(), "lap 3, record %d: room known to be free", i+1)
	}
}

// TestCloseDeliversCommittedRecords: Close publishes records committed but not
// flushed, before its closed flag, so the consumer reads them and then io.EOF;
// a reservation still pending is dropped, and nothing is published after.
func TestCloseDeliversCommittedRecords(t *testing.T) {
	p, c, _ := pair(t, 256)
	_, err := p.Write([]byte("flushed"))
	require.NoError(t, err)
	b, err := p.Reserve(9)
	require.NoError(t, err)
	copy(b, "committed")
	require.NoError(t, p.Commit(9))
	b, err = p.Reserve(7)
	require.NoError(t, err)
	copy(b, "pending")
	require.NoError(t, p.Close())
	assert.ErrorIs(t, p.Commit(7), ErrClosed, "the pending reservation is dropped")
	assert.ErrorIs(t, p.Flush(), ErrClosed, "Flush after Close")
	_, err = p.Reserve(1)
	assert.ErrorIs(t, err, ErrClosed)
	for _, want := range []string{"flushed", "committed"} {
		got, err := c.Next()
		require.NoError(t, err)
		assert.Equal(t, want, string(got))
	}
	for i := 0; i < 2; i++ {
		_, err = c.Next()
		assert.ErrorIs(t, err, io.EOF, "then the end of the stream, which sticks")
	}
}

// TestCloseWakesConsumerWithCommittedRecords: a consumer parked on an empty
// ring, woken by Close, gets the records Close published before io.EOF.
func TestCloseWakesConsumerWithCommittedRecords(t *testing.T) {
	p, c, _ := pair(t, 256)
	got := make(chan string, 4)
	go func() {
		for {
			b, err := c.Next()
			if err != nil {
				got <- err.Error()
				return
			}
			got <- string(b)
		}
	}()
	time.Sleep(10 * time.Millisecond)
	b, err := p.Reserve(4)
	require.NoError(t, err)
	copy(b, "last")
	require.NoError(t, p.Commit(4))
	require.NoError(t, p.Close())
	for _, want := range []string{"last", io.EOF.Error()} {
		select {
		case s := <-got:
			require.Equal(t, want, s)
		case <-time.After(10 * time.Second):
			t.Fatalf("no %q from Next", want)
		}
	}
}

// TestCloseEndsBlockedWrite: Close from another goroutine ends a Write that
// waits for room (without a data race on what the producer committed), and the
// consumer still gets every record written before it.
func TestCloseEndsBlockedWrite(t *testing.T) {
	p, c, _ := pair(t, 128)
	fillNumbered(t, p)
	done := make(chan error, 1)
	go func() { _, err := p.Write(make([]byte, 24)); done <- err }()
	time.Sleep(10 * time.Millisecond)
	require.NoError(t, p.Close())
	assert.ErrorIs(t, <-done, ErrClosed)
	for i := 0; i < 4; i++ {
		got, err := c.Next()
		require.NoError(t, err)
		assert.Equal(t, byte(i), got[0])
	}
	_, err := c.Next()
	assert.ErrorIs(t, err, io.EOF)
}

// TestCloseRacesBlockingWrite closes a producer from another goroutine at
// random moments while its writer is on its way into a wait for room: it pads
// the end of the lap (writing the padding and publishing it) and then waits.
// Close must not read what Reserve's slow path writes, so the race detector
// must see no race; and the Write ends with ErrClosed. Many trials, with
// delays of 0 to a few microseconds.
func TestCloseRacesBlockingWrite(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	for i := 0; i < 1000; i++ {
		p, _, _ := pair(t, 128)
		started := make(chan struct{})
		done := make(chan error, 1)
		go func() {
			_, err := p.Write(make([]byte, 56)) // [0, 64)
			if err == nil {
				_, err = p.Write(make([]byte, 24)) // [64, 96)
			}
			if err != nil {
				done <- err
				return
			}
			close(started)
			_, err = p.Write(make([]byte, 40)) // pads [96, 128), then waits for 48 bytes
			done <- err
		}()
		<-started
		for range r.IntN(4000) {
			spinSink++
		}
		require.NoError(t, p.Close())
		require.ErrorIs(t, <-done, ErrClosed, "trial %d", i)
	}
}

var spinSink int

// TestInterruptThenCloseWhileStreaming: the control plane ends a session by
// interrupting the producer, then closing it, from its own goroutine, while
// the application may still be streaming through TryReserve, Commit and
// Flush. After Interrupt, Close must not read what the streaming goroutine
// writes (the race detector checks), and the stream ends with an error.
func TestInterruptThenCloseWhileStreaming(t *testing.T) {
	errEnded := errors.New("session ended")
	r := rand.New(rand.NewPCG(9, 10))
	for i := 0; i < 200; i++ {
		p, c, _ := pair(t, 4096)
		go func() { // a consumer that keeps up, until the producer closes
			for {
				if _, err := c.Next(); err != nil {
					return
				}
				c.Release()
			}
		}()
		done := make(chan error, 1)
		go func() {
			for {
				if _, err := p.Write(make([]byte, 24)); err != nil {
					done <- err
					return
				}
			}
		}()
		for range r.IntN(20000) {
			spinSink++
		}
		p.Interrupt(errEnded)
		require.NoError(t, p.Close())
		err := <-done
		require.True(t, errors.Is(err, ErrClosed) || errors.Is(err, errEnded), "trial %d: %v", i, err)
		c.Close()
	}
}

// TestAbandon: an abandoned reservation publishes nothing, not even an empty
// record, and its room is handed out again.
func TestAbandon(t *testing.T) {
	p, c, mem := pair(t, 256)
	p.Abandon() // nothing reserved: nothing happens
	b, err := p.Reserve(10)
	require.NoError(t, err)
	copy(b, "abandoned!")
	p.Abandon()
	assert.ErrorIs(t, p.Commit(0), ErrNoReservation, "the reservation is gone")
	require.NoError(t, p.Flush())
	assert.Zero(t, u64At(mem, ProducerSlotOffset).Load(), "nothing published")

	b = p.TryReserve(4)
	require.NotNil(t, b, "the room is free again, for the fast path too")
	copy(b, "kept")
	require.NoError(t, p.Commit(4))
	require.NoError(t, p.Flush())
	got, err := c.Next()
	require.NoError(t, err)
	require.Equal(t, "kept", string(got), "the first record is the kept one, not an empty one")
	c.Release()

	// A reservation that started a new lap leaves its padding, which the
	// consumer skips: 16 + 192 bytes used, 48 left before the end.
	_, err = p.Write(make([]byte, 184))
	require.NoError(t, err)
	_, err = c.Next()
	require.NoError(t, err)
	c.Release()
	_, err = p.Reserve(60) // 72 bytes do not fit in 48: pads, starts at 0
	require.NoError(t, err)
	p.Abandon()
	_, err = p.Write([]byte("after"))
	require.NoError(t, err)
	got, err = c.Next()
	require.NoError(t, err)
	assert.Equal(t, "after", string(got))
}

// TestNextReportsViewsHoldingTheRing: a consumer whose unreleased views cover
// the whole ring gets ErrViewsHeld instead of waiting forever, from Next and
// from ReadInto; one that leaves the producer any room waits as usual.
func TestNextReportsViewsHoldingTheRing(t *testing.T) {
	p, c, _ := pair(t, 128)
	// A deadline, so that before the fix the test fails instead of hanging.
	c.SetDeadline(time.Now().Add(time.Minute))
	for i := 0; i < 2; i++ {
		_, err := p.Write(make([]byte, 56)) // two 64-byte records fill the ring
		require.NoError(t, err)
	}
	for i := 0; i < 2; i++ {
		_, err := c.Next()
		require.NoError(t, err)
	}
	_, err := c.Next()
	assert.ErrorIs(t, err, ErrViewsHeld)
	_, err = c.ReadInto(make([]byte, 64))
	assert.ErrorIs(t, err, ErrViewsHeld)
	c.Release()
	_, err = p.Write([]byte("room again"))
	require.NoError(t, err)
	got, err := c.Next()
	require.NoError(t, err)
	assert.Equal(t, "room again", string(got), "not sticky: Release, and reading goes on")

	// 16 bytes held, 112 free: the producer might still write something.
	c.SetDeadline(time.Now().Add(20 * time.Millisecond))
	_, err = c.Next()
	assert.ErrorIs(t, err, os.ErrDeadlineExceeded, "a ring with any room left waits")
	c.Release()
}

// TestViewsAndPaddingHoldingTheRing: the same deadlock with padding in it: a
// producer that pads to start a new lap publishes the padding and waits for
// room; the consumer, holding views of the rest of the ring, skips the padding
// and must not wait for the producer.
func TestViewsAndPaddingHoldingTheRing(t *testing.T) {
	p, c, _ := pair(t, 128)
	// A deadline, so that before the fix the test fails instead of hanging.
	c.SetDeadline(time.Now().Add(time.Minute))
	_, err := p.Write(make([]byte, 56)) // [0, 64)
	require.NoError(t, err)
	_, err = p.Write(make([]byte, 24)) // [64, 96)
	require.NoError(t, err)
	for i := 0; i < 2; i++ {
		_, err := c.Next()
		require.NoError(t, err)
	}
	done := make(chan error, 1)
	go func() { _, err := p.Write(make([]byte, 40)); done <- err }() // pads [96, 128), waits
	_, err = c.Next()
	assert.ErrorIs(t, err, ErrViewsHeld)
	c.Release()
	require.NoError(t, <-done)
	got, err := c.Next()
	require.NoError(t, err)
	assert.Len(t, got, 40)
}

func TestCommitAfterCloseFails(t *testing.T) {
	p, _, _ := pair(t, 256)
	_, err := p.Reserve(3)
	require.NoError(t, err)
	require.NoError(t, p.Close())
	assert.ErrorIs(t, p.Commit(3), ErrClosed)
}

func TestCleanEOFSurvivesInterrupt(t *testing.T) {
	p, c, _ := pair(t, 256)
	_, err := p.Write([]byte("last"))
	require.NoError(t, err)
	require.NoError(t, p.Close())
	c.Interrupt(errors.New("peer process exited"))
	got, err := c.Next()
	require.NoError(t, err)
	assert.Equal(t, "last", string(got))
	_, err = c.Next()
	assert.ErrorIs(t, err, io.EOF, "a producer that closed cleanly ends with io.EOF, not the interrupt")
}

func TestConsumerUnusableAfterClose(t *testing.T) {
	p, c, mem := pair(t, 256)
	for _, s := range []string{"one", "two"} {
		_, err := p.Write([]byte(s))
		require.NoError(t, err)
	}
	_, err := c.Next()
	require.NoError(t, err)
	require.NoError(t, c.Close())
	_, err = c.Next()
	assert.ErrorIs(t, err, ErrClosed, "even with a published record cached")
	_, err = c.ReadInto(make([]byte, 8))
	assert.ErrorIs(t, err, ErrClosed)
	c.Release()
	assert.Zero(t, u64At(mem, ConsumerSlotOffset).Load(), "Release after Close writes nothing")
}

// TestSmallReleasesAreProgress: a producer waiting for room for a large
// record while the consumer releases one small record at a time is woken by
// every release. Each is progress, so none is slept off: the guard against a
// peer that only wakes us must not slow this case down.
func TestSmallReleasesAreProgress(t *testing.T) {
	p, c, mem := pair(t, 4096) // parks at once
	for i := 0; i < 64; i++ {
		_, err := p.Write(make([]byte, 56)) // 64 records of 64 bytes fill the ring
		require.NoError(t, err)
	}
	done := make(chan error, 1)
	go func() { _, err := p.Write(make([]byte, 4000)); done <- err }() // needs 63 of them back
	sleep := u32At(mem, ProducerSlotOffset+slotSleep)
	for i := 0; i < 63; i++ {
		require.Eventually(t, func() bool { return sleep.Load() == 1 }, time.Minute, 10*time.Microsecond,
			"the producer parks before release %d", i)
		_, err := c.Next()
		require.NoError(t, err)
		c.Release()
	}
	require.NoError(t, <-done)
	assert.Zero(t, p.waiter.Throttled(), "every release moved head: no wake-up was for nothing")
}

// TestReadIntoReleasesInBatches: ReadInto hands room back once an eighth of
// the ring (512 bytes here) is read, not per record, and before it waits.
func TestReadIntoReleasesInBatches(t *testing.T) {
	p, c, mem := pair(t, 4096)
	head := u64At(mem, ConsumerSlotOffset+slotIndex)
	buf := make([]byte, 24)
	for i := 0; i < 20; i++ {
		_, err := p.Write(make([]byte, 24)) // 32-byte records
		require.NoError(t, err)
	}
	for i := 1; i <= 20; i++ {
		_, err := c.ReadInto(buf)
		require.NoError(t, err)
		if i < 16 {
			require.Zero(t, head.Load(), "record %d: no index store yet", i)
		}
	}
	assert.EqualValues(t, 512, head.Load(), "one store for the first 512 bytes")
	c.SetDeadline(expired())
	_, err := c.ReadInto(buf)
	assert.ErrorIs(t, err, os.ErrDeadlineExceeded)
	assert.EqualValues(t, 640, head.Load(), "the rest goes back before waiting")
}

// TestReadIntoLagNeverBlocksProducer: a producer waiting for the whole ring
// (its largest record) gets it from a consumer that copies with ReadInto and
// then waits: the lag ReadInto keeps is released before it waits.
func TestReadIntoLagNeverBlocksProducer(t *testing.T) {
	p, c, _ := pair(t, 4096)
	for i := 0; i < 100; i++ {
		_, err := p.Write(make([]byte, 24)) // 3200 bytes
		require.NoError(t, err)
	}
	big := bytes.Repeat([]byte{7}, p.MaxRecord()) // pads to the end, then needs all 4096
	done := make(chan error, 1)
	go func() { _, err := p.Write(big); done <- err }()
	buf := make([]byte, p.MaxRecord())
	c.SetDeadline(time.Now().Add(time.Minute))
	for i := 0; i < 100; i++ {
		n, err := c.ReadInto(buf)
		require.NoError(t, err)
		require.Equal(t, 24, n)
	}
	n, err := c.ReadInto(buf)
	require.NoError(t, err, "the consumer got the big record, so the producer got its room")
	assert.Equal(t, big, buf[:n])
	require.NoError(t, <-done)
}
