package ring

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

func cpuTime(t *testing.T) time.Duration {
	var ru unix.Rusage
	require.NoError(t, unix.Getrusage(unix.RUSAGE_SELF, &ru))
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// TestIdleConsumerParks: with the default idle strategy, a consumer waiting
// on an empty ring spends its spin and yield budgets, then sleeps in the
// kernel: its sleep word says parked and the process uses next to no CPU.
func TestIdleConsumerParks(t *testing.T) {
	mem := newMem(t, 4096)
	p, err := NewProducer(mem, Config{})
	require.NoError(t, err)
	c, err := NewConsumer(mem, Config{})
	require.NoError(t, err)
	got := make(chan string, 1)
	go func() {
		b, err := c.Next()
		if err != nil {
			got <- err.Error()
			return
		}
		got <- string(b)
	}()
	sleep := u32At(mem, ConsumerSlotOffset+slotSleep)
	require.Eventually(t, func() bool { return sleep.Load() == 1 }, 5*time.Second, time.Millisecond,
		"the consumer parks once its busy budgets are spent")

	before := cpuTime(t)
	time.Sleep(300 * time.Millisecond)
	used := cpuTime(t) - before
	assert.Less(t, used, 60*time.Millisecond, "an idle ring costs ~0 CPU (used %v in 300ms)", used)

	_, err = p.Write([]byte("wake up"))
	require.NoError(t, err)
	assert.Equal(t, "wake up", <-got)
	assert.Zero(t, sleep.Load(), "the producer cleared the sleep word when it woke the consumer")
}
