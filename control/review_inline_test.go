package control

import (
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// voluntarySwitches counts the times this process's threads went to sleep.
func voluntarySwitches(t *testing.T) int64 {
	var ru unix.Rusage
	require.NoError(t, unix.Getrusage(unix.RUSAGE_SELF, &ru))
	return ru.Nvcsw
}

// A daemon's Next that waits long (a subscriber between events, a caller
// for a slow reply) leaves the process asleep: the idle reader, which has
// nothing to do while a Next reads, must not look every idleRead (1 ms)
// meanwhile, which cost a thousand wake-ups a second.
func TestInlineIdleReaderSleepsWhileNextWaits(t *testing.T) {
	ts := startServer(t, "", ServerConfig{SessionConfig: SessionConfig{Features: inlineFeatures, NoSharedMemory: true}})
	d := dialT(t, ts.path, DialConfig{SessionConfig: SessionConfig{Features: inlineFeatures}})
	ts.session(t)
	const wait = 500 * time.Millisecond
	before := voluntarySwitches(t)
	_, err := d.Inline().Next(time.Now().Add(wait))
	require.ErrorIs(t, err, os.ErrDeadlineExceeded)
	n := voluntarySwitches(t) - before
	t.Logf("%d voluntary context switches while Next waited %v", n, wait)
	assert.Less(t, n, int64(wait/time.Millisecond)/2, "the process woke about every idleRead")
	require.NoError(t, d.Err())

}
