package ring_test

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/sypas/go/futex"
	"github.com/sypas/go/internal/closetest"
	"github.com/sypas/go/ring"
)

// peerPair returns two mappings of one new ring: the creator's and the
// peer's (OpenRegion on a duplicate of the memfd, as after SCM_RIGHTS).
func peerPair(t *testing.T, capacity int) (created, opened *ring.Region) {
	t.Helper()
	created, err := ring.CreateRegion(capacity)
	require.NoError(t, err)
	f, err := closetest.PeerFile(created.File())
	require.NoError(t, err)
	opened, err = ring.OpenRegion(f, capacity)
	require.NoError(t, err)
	return created, opened
}

// Closing a region, from any goroutine and at any time, never faults: the
// calls in flight on the ends attached through it (blocked or streaming,
// every ring call, every idle mode) return ErrClosed, and so does the next
// call. The creator's side and the opener's side close in turn; the peer
// side, mapped separately as in another process, sees the ends closed.
func TestRegionCloseNeverFaults(t *testing.T) {
	n := closetest.Trials(100)
	k := 0
	for _, policy := range closetest.Policies {
		cfg := ring.Config{Idle: futex.Config{Policy: policy}}
		for _, side := range []string{"creator", "opener"} {
			t.Run(fmt.Sprintf("%v/%s", policy, side), func(t *testing.T) {
				var ty closetest.Tally
				for i := range n {
					ty.Add(regionCloseTrial(t, cfg, side == "opener", k*n+i))
				}
				ty.Check(t)
			})
			k++
		}
	}
}

// regionCloseTrial runs closetest.Trial on the ends attached through one
// side's mappings of two rings (one each way), the other side playing
// closetest.Peer.
func regionCloseTrial(t *testing.T, cfg ring.Config, opener bool, i int) (int, []string) {
	t.Helper()
	out, farIn := peerPair(t, 64<<6) // near → far
	in, farOut := peerPair(t, 64<<6) // far → near
	if opener {
		out, farIn, in, farOut = farIn, out, farOut, in
	}
	p, err := out.NewProducer(cfg)
	require.NoError(t, err)
	c, err := in.NewConsumer(cfg)
	require.NoError(t, err)
	fc, err := farIn.NewConsumer(cfg)
	require.NoError(t, err)
	fp, err := farOut.NewProducer(cfg)
	require.NoError(t, err)
	faults, problems := closetest.TrialWithPeer(c, p, fc, fp, func() error { return errors.Join(out.Close(), in.Close()) }, i)
	require.NoError(t, errors.Join(farIn.Close(), farOut.Close()))
	return faults, problems
}

func TestRegionCloseRules(t *testing.T) {
	r, err := ring.CreateRegion(4096)
	require.NoError(t, err)
	p, err := r.NewProducer(ring.Config{})
	require.NoError(t, err)
	_, err = r.NewProducer(ring.Config{})
	assert.ErrorIs(t, err, ring.ErrInvalid, "a second producer")
	c, err := r.NewConsumer(ring.Config{})
	require.NoError(t, err)
	_, err = p.Write([]byte("kept"))
	require.NoError(t, err)
	view, err := c.Next()
	require.NoError(t, err)

	require.NoError(t, r.Close())
	assert.NoError(t, r.Close(), "idempotent")
	assert.Nil(t, r.Bytes(), "Bytes after Close")
	assert.NotNil(t, r.File(), "File stays set, closed")
	_, err = r.NewConsumer(ring.Config{})
	assert.ErrorIs(t, err, ring.ErrClosed, "attach after Close")
	_, err = p.Write([]byte("late"))
	assert.ErrorIs(t, err, ring.ErrClosed, "the ends were closed")
	_, err = c.Next()
	assert.ErrorIs(t, err, ring.ErrClosed)

	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true)) // a fault fails this test only
	assert.Equal(t, make([]byte, 4), view, "a view kept past Close reads private zero pages")
	runtime.KeepAlive(c)
}

// Close wakes ends parked in the kernel, and their calls return ErrClosed.
func TestRegionCloseWakesParked(t *testing.T) {
	cfg := ring.Config{Idle: futex.Config{Policy: futex.PolicyPark}}
	empty, err := ring.CreateRegion(4096)
	require.NoError(t, err)
	c, err := empty.NewConsumer(cfg)
	require.NoError(t, err)
	full, err := ring.CreateRegion(4096)
	require.NoError(t, err)
	p, err := full.NewProducer(cfg)
	require.NoError(t, err)
	_, err = full.NewConsumer(cfg) // attached, never reading
	require.NoError(t, err)
	for {
		b := p.TryReserve(1000)
		if b == nil {
			break
		}
		require.NoError(t, p.Commit(len(b)))
	}
	require.NoError(t, p.Flush())

	next, reserve := make(chan error, 1), make(chan error, 1)
	go func() { _, err := c.Next(); next <- err }()
	go func() { _, err := p.Reserve(1000); reserve <- err }()
	time.Sleep(20 * time.Millisecond) // let both park
	require.NoError(t, empty.Close())
	require.NoError(t, full.Close())
	for _, ch := range []chan error{next, reserve} {
		select {
		case err := <-ch:
			assert.ErrorIs(t, err, ring.ErrClosed)
		case <-time.After(10 * time.Second):
			t.Fatal("a call is still parked 10 s after Close")
		}
	}
}

// An end attached through a region keeps the region's addresses mapped for
// as long as the end is reachable, even once the region is closed and
// dropped; then they are unmapped.
func TestRegionEndsKeepMappingReachable(t *testing.T) {
	r, err := ring.CreateRegion(4096)
	require.NoError(t, err)
	c, err := r.NewConsumer(ring.Config{})
	require.NoError(t, err)
	mem := r.Bytes()
	require.NoError(t, r.Close())
	r = nil
	for range 3 {
		runtime.GC()
		time.Sleep(time.Millisecond)
	}
	assert.True(t, closetest.IsMapped(mem), "mapped while its consumer is reachable")
	_, err = c.Next()
	assert.ErrorIs(t, err, ring.ErrClosed)
	runtime.KeepAlive(c)

	c = nil
	closetest.WaitUnmapped(t, mem)
}

// A Flush or Release in another goroutine can clear the peer's sleep word
// (Notify's swap) just before Close, and make its FUTEX_WAKE only after Close
// replaced the mapping, where the address is a private futex that wakes
// nobody. Close must still wake the peer parked on the shared word, or its
// blocked call never learns that this side closed. The test plays that
// Notify in two steps around Close.
func TestRegionCloseWakesPeerAfterStragglerNotify(t *testing.T) {
	cfg := ring.Config{Idle: futex.Config{Policy: futex.PolicyPark}}
	for _, end := range []string{"producer", "consumer"} {
		t.Run(end, func(t *testing.T) {
			near, far := peerPair(t, 4096)
			defer far.Close()
			done := make(chan error, 1)
			slot := ring.ConsumerSlotOffset // the far end's: the one near's Notify clears
			if end == "producer" {
				_, err := near.NewProducer(cfg)
				require.NoError(t, err)
				fc, err := far.NewConsumer(cfg)
				require.NoError(t, err)
				go func() { _, err := fc.Next(); done <- err }() // an empty ring
			} else {
				slot = ring.ProducerSlotOffset
				_, err := near.NewConsumer(cfg)
				require.NoError(t, err)
				fp, err := far.NewProducer(cfg)
				require.NoError(t, err)
				for b := fp.TryReserve(1000); b != nil; b = fp.TryReserve(1000) {
					require.NoError(t, fp.Commit(len(b)))
				}
				require.NoError(t, fp.Flush())
				go func() { _, err := fp.Reserve(1000); done <- err }() // a full ring
			}
			waitInFutexWait(t, ring.SleepWord(far.Bytes(), slot))

			word := ring.SleepWord(near.Bytes(), slot)
			require.NotZero(t, word.Swap(0), "the straggler's Notify finds the peer parked")
			require.NoError(t, near.Close())
			_, _ = futex.Wake(word, 1) // the straggler's wake-up, on private memory now
			runtime.KeepAlive(near)

			select {
			case err := <-done:
				assert.Error(t, err, "the peer sees this side closed")
			case <-time.After(10 * time.Second):
				t.Fatal("the peer is still parked 10 s after Close")
			}
		})
	}
}

// waitInFutexWait waits until a thread of this process sleeps in FUTEX_WAIT
// on word (/proc/self/task/*/syscall shows the system call and its address).
func waitInFutexWait(t *testing.T, word *atomic.Uint32) {
	t.Helper()
	want := fmt.Sprintf("%d %p ", unix.SYS_FUTEX, word)
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		tasks, _ := filepath.Glob("/proc/self/task/*/syscall")
		for _, f := range tasks {
			if b, err := os.ReadFile(f); err == nil && strings.HasPrefix(string(b), want) {
				return
			}
		}
	}
	t.Fatalf("no thread parked on %p after 10 s", word)
}

// An end's own Close racing with its region's Close (a writer's deferred
// Producer.Close while another goroutine closes the region or the session)
// must not let the region replace the mapping before that end's Close has
// woken its own parked call and the peer: a wake-up made after the swap
// reaches a private futex, and the parked call, here or in the peer, never
// returns.
func TestRegionCloseRacingEndClose(t *testing.T) {
	cfg := ring.Config{Idle: futex.Config{Policy: futex.PolicyPark}}
	fill := func(p *ring.Producer) {
		for b := p.TryReserve(1000); b != nil; b = p.TryReserve(1000) {
			require.NoError(t, p.Commit(len(b)))
		}
		require.NoError(t, p.Flush())
	}
	for i := range closetest.Trials(200) {
		// near producer parked on a full ring; far producer parked on a full
		// ring that the near consumer never reads.
		near, far := peerPair(t, 4096)
		nearIn, farOut := peerPair(t, 4096)
		p, err := near.NewProducer(cfg)
		require.NoError(t, err)
		_, err = far.NewConsumer(cfg) // never reads
		require.NoError(t, err)
		c, err := nearIn.NewConsumer(cfg)
		require.NoError(t, err)
		fp, err := farOut.NewProducer(cfg)
		require.NoError(t, err)
		fill(p)
		fill(fp)
		own, peer := make(chan error, 1), make(chan error, 1)
		go func() { _, err := p.Reserve(1000); own <- err }()
		go func() { _, err := fp.Reserve(1000); peer <- err }()
		waitInFutexWait(t, ring.SleepWord(near.Bytes(), ring.ProducerSlotOffset))
		waitInFutexWait(t, ring.SleepWord(farOut.Bytes(), ring.ProducerSlotOffset))

		start := make(chan struct{})
		var closers sync.WaitGroup
		for _, closeFn := range []func() error{p.Close, c.Close, near.Close, nearIn.Close} {
			closers.Go(func() { <-start; assert.NoError(t, closeFn()) })
		}
		close(start)
		closers.Wait()
		for what, ch := range map[string]chan error{"this side's Reserve": own, "the peer's Reserve": peer} {
			select {
			case err := <-ch:
				assert.Error(t, err, what)
			case <-time.After(10 * time.Second):
				t.Fatalf("trial %d: %s is still parked 10 s after Close", i, what)
			}
		}
		require.NoError(t, errors.Join(far.Close(), farOut.Close()))
	}
}

// The sleep words are shared, so a hostile peer can queue threads of its own
// in FUTEX_WAIT on ours, ahead of our parked call. Close must still wake
// that call before it replaces the mapping: a wake-up for one thread would
// reach the peer's, and ours would sleep for good on the shared word.
func TestRegionCloseWakesPastPeerSleepers(t *testing.T) {
	cfg := ring.Config{Idle: futex.Config{Policy: futex.PolicyPark}}
	near, far := peerPair(t, 4096)
	defer far.Close()
	p, err := near.NewProducer(cfg)
	require.NoError(t, err)
	_, err = far.NewConsumer(cfg) // never reads
	require.NoError(t, err)
	for b := p.TryReserve(1000); b != nil; b = p.TryReserve(1000) {
		require.NoError(t, p.Commit(len(b)))
	}
	require.NoError(t, p.Flush())

	theirs := ring.SleepWord(far.Bytes(), ring.ProducerSlotOffset) // our sleep word, in the peer's mapping
	defer futex.Wake(theirs, 1<<30)
	theirs.Store(1)
	go func() {
		runtime.LockOSThread()
		_ = futex.Wait(theirs, 1, -1) // the peer's thread, first in the queue
	}()
	waitInFutexWait(t, theirs)
	reserve := make(chan error, 1)
	go func() { _, err := p.Reserve(1000); reserve <- err }()
	waitInFutexWait(t, ring.SleepWord(near.Bytes(), ring.ProducerSlotOffset))

	require.NoError(t, near.Close())
	select {
	case err := <-reserve:
		assert.ErrorIs(t, err, ring.ErrClosed)
	case <-time.After(10 * time.Second):
		t.Fatal("Reserve is still parked 10 s after Close")
	}
}
