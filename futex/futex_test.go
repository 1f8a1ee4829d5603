package futex

import (
	"errors"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

func TestWaitReturnsOnWake(t *testing.T) {
	var word atomic.Uint32
	done := make(chan error, 1)
	go func() { done <- Wait(&word, 0, -1) }()

	// Wake until the waiter was actually asleep in the kernel and got woken.
	woken := 0
	for start := time.Now(); woken == 0 && time.Since(start) < 5*time.Second; {
		n, err := Wake(&word, 1)
		require.NoError(t, err)
		woken += n
		if n == 0 {
			time.Sleep(time.Millisecond)
		}
	}
	assert.Equal(t, 1, woken)
	select {
	case err := <-done:
		assert.NoError(t, err)
	case <-time.After(5 * time.Second):
		t.Fatal("Wait did not return after a successful Wake")
	}
}

func TestWaitValueDiffers(t *testing.T) {
	var word atomic.Uint32
	word.Store(5)
	start := time.Now()
	assert.NoError(t, Wait(&word, 4, time.Minute), "EAGAIN must read as a spurious wake-up")
	assert.Less(t, time.Since(start), time.Second)
}

func TestWaitTimeout(t *testing.T) {
	var word atomic.Uint32
	start := time.Now()
	err := Wait(&word, 0, 20*time.Millisecond)
	assert.ErrorIs(t, err, os.ErrDeadlineExceeded)
	assert.True(t, os.IsTimeout(err))
	assert.GreaterOrEqual(t, time.Since(start), 20*time.Millisecond)

	assert.ErrorIs(t, Wait(&word, 0, 0), os.ErrDeadlineExceeded, "zero timeout polls")
}

func TestWaitBadAddress(t *testing.T) {
	buf := make([]byte, 16)
	err := Wait(misalignedWord(buf), 0, time.Second)
	require.Error(t, err)
	assert.ErrorIs(t, err, unix.EINVAL)
	assert.Contains(t, err.Error(), "futex: wait:")
}

func TestWakeNoWaiter(t *testing.T) {
	var word atomic.Uint32
	n, err := Wake(&word, 1)
	assert.NoError(t, err)
	assert.Equal(t, 0, n)
}

func TestNotify(t *testing.T) {
	var word atomic.Uint32
	assert.False(t, Notify(&word), "no syscall when the peer is not parked")
	assert.EqualValues(t, 0, word.Load())

	word.Store(parked)
	assert.True(t, Notify(&word))
	assert.EqualValues(t, awake, word.Load(), "Notify clears the flag")
	assert.False(t, Notify(&word), "a second Notify has nothing to do")

	word.Store(0xdead) // a misbehaving peer: costs a wake-up, nothing more
	assert.True(t, Notify(&word))
	assert.EqualValues(t, awake, word.Load())
}

func TestAllocs(t *testing.T) {
	var word atomic.Uint32
	var data atomic.Bool
	data.Store(true)
	ready := data.Load

	assert.Zero(t, testing.AllocsPerRun(100, func() { Notify(&word) }), "Notify, peer awake")
	assert.Zero(t, testing.AllocsPerRun(100, func() {
		word.Store(parked)
		Notify(&word)
	}), "Notify, peer parked")
	word.Store(1)
	assert.Zero(t, testing.AllocsPerRun(100, func() { _ = Wait(&word, 2, time.Second) }), "Wait with a timeout")

	w := NewWaiter(&word, Config{Policy: PolicyAuto, Spin: time.Second})
	assert.Zero(t, testing.AllocsPerRun(100, func() { _ = w.Wait(ready) }), "Waiter.Wait, ready at once")

	var polls atomic.Int32
	readyLater := func() bool { return polls.Add(1)%200 == 0 } // true within the spin phase
	assert.Zero(t, testing.AllocsPerRun(100, func() { _ = w.Wait(readyLater) }), "Waiter.Wait, ready while spinning")

	w.SetDeadline(time.Now().Add(-time.Second))
	never := func() bool { return false }
	assert.Zero(t, testing.AllocsPerRun(100, func() {
		err := w.Wait(never)
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			panic(err)
		}
	}), "Waiter.Wait, deadline passed")
	require.NoError(t, w.Close())
	assert.Zero(t, testing.AllocsPerRun(100, func() { _ = w.Wait(never) }), "Waiter.Wait, closed")
}
