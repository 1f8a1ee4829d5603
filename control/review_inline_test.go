package control

import (
	"os"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/sypas/go/frame"
	"github.com/sypas/go/wire"
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

// A kernel may leave the socket unread for up to interval × misses: the
// daemon's write waits that long before the session ends (§6.7). With
// misses above 64, more than 64 HEARTBEATs arrive meanwhile, and the
// daemon, whose answers wait behind its blocked write, must not end the
// session for owing them (the kernel here admits their burst).
func TestInlineOwedAcksWithinLiveness(t *testing.T) {
	scfg := ServerConfig{SessionConfig: SessionConfig{
		Features: inlineFeatures, NoSharedMemory: true,
		HeartbeatInterval: time.Millisecond, HeartbeatMisses: 1000}}
	scfg.Limits.MaxControlFrames = 1 << 20
	ts := startServer(t, "", scfg)
	d := dialT(t, ts.path, DialConfig{SessionConfig: SessionConfig{Features: inlineFeatures}})
	k := ts.session(t)
	di, ki := d.Inline(), k.Inline()
	body := make([]byte, min(32<<10, di.MaxPayload()-64))
	req := wire.Request{Method: []byte("op"), Body: body}
	const frames = 128 // 4 MiB: far more than the socket holds
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // the daemon's sender: waits for the kernel to read
		defer wg.Done()
		for i := range frames {
			if err := di.Write(frame.Header{Type: frame.TypeRequest, Correlation: uint64(i + 1)}, nil, &req, true); err != nil {
				t.Errorf("write %d: %v", i, err)
				return
			}
		}
	}()
	// The kernel reads nothing for 300 ms (well within its 1 s),
	// heartbeating every millisecond.
	time.Sleep(300 * time.Millisecond)
	require.NoError(t, d.Err(), "the daemon ended a live session")
	for i := range frames {
		f, err := ki.Next(time.Now().Add(5 * time.Second))
		require.NoError(t, err, "frame %d", i)
		assert.Equal(t, frame.TypeRequest, f.Type)
		ki.Release()
	}
	wg.Wait()
	assert.NoError(t, d.Err())
	assert.NoError(t, k.Err())
}

// Next invalidates the frame the previous Next returned (valid "until
// Release and the next call"), so that hold ends with the call: a daemon
// that calls Next twice before Release must not leave the idle reader
// stopped for good, with nothing reading its socket between calls.
func TestInlineNextTwiceThenRelease(t *testing.T) {
	ts := startServer(t, "", ServerConfig{SessionConfig: SessionConfig{Features: inlineFeatures, NoSharedMemory: true}})
	d := dialT(t, ts.path, DialConfig{SessionConfig: SessionConfig{Features: inlineFeatures}})
	k := ts.session(t)
	di, ki := d.Inline(), k.Inline()
	resp := wire.Response{Body: []byte("x")}
	for corr := uint64(1); corr <= 2; corr++ {
		require.NoError(t, ki.Write(frame.Header{Type: frame.TypeResponse, Flags: frame.FlagEndStream, Correlation: corr}, nil, &resp, true))
		f, err := di.Next(time.Now().Add(5 * time.Second))
		require.NoError(t, err)
		require.Equal(t, corr, f.Correlation)
	}
	di.Release()
	assert.True(t, di.Drained())
	// No Next from here on: the idle reader reads what comes.
	require.NoError(t, ki.Write(frame.Header{Type: frame.TypeResponse, Flags: frame.FlagEndStream, Correlation: 3}, nil, &resp, true))
	assert.Eventually(t, di.Buffered, 5*time.Second, time.Millisecond, "the idle reader never read again")
}
