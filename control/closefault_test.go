package control

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/futex"
	"github.com/sypas/go/internal/closetest"
	"github.com/sypas/go/internal/shm"
	"github.com/sypas/go/ring"
	"github.com/sypas/go/wire"
)

// closeConfig has the smallest rings, so that an idle peer leaves the near
// producer blocked on a full ring within a few dozen records.
func closeConfig(policy futex.Policy) SessionConfig {
	return SessionConfig{
		TxRingSize: wire.MinRingSize, RxRingSize: wire.MinRingSize,
		Ring: ring.Config{Idle: futex.Config{Policy: policy}},
	}
}

// Closing a session, from any goroutine and at any time, never faults: the
// calls in flight on its rings (blocked or streaming, every ring call, every
// idle mode) return ring.ErrClosed, and so does the next call. Each side
// closes in turn, and a Client closes the daemon session it handed out.
func TestCloseNeverFaults(t *testing.T) {
	n := closetest.Trials(48)
	k := 0
	for _, policy := range closetest.Policies {
		cfg := closeConfig(policy)
		ts := startServer(t, "", ServerConfig{SessionConfig: cfg})
		for _, side := range []string{"kernel", "daemon", "client"} {
			t.Run(fmt.Sprintf("%v/%s", policy, side), func(t *testing.T) {
				var ty closetest.Tally
				for i := range n {
					ty.Add(inProcessCloseTrial(t, ts, cfg, side, k*n+i))
				}
				ty.Check(t)
			})
			k++
		}
		ts.Close()
	}
}

// inProcessCloseTrial opens a session pair through ts and runs trial i on
// the side named, the other side playing closetest.Peer.
func inProcessCloseTrial(t *testing.T, ts *testServer, cfg SessionConfig, side string, i int) (int, []string) {
	t.Helper()
	var d *Session
	closeFn := func() error { return d.Close() }
	if side == "client" {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		c := NewClient(ts.path, DialConfig{SessionConfig: cfg})
		defer c.Close()
		s, err := c.Session(ctx)
		require.NoError(t, err)
		d, closeFn = s, c.Close
	} else {
		d = dialT(t, ts.path, DialConfig{SessionConfig: cfg})
	}
	k := ts.session(t)
	near, far := d, k
	if side == "kernel" {
		near, far, closeFn = k, d, k.Close
	}
	faults, problems := closetest.TrialWithPeer(near.Consumer(), near.Producer(), far.Consumer(), far.Producer(), closeFn, i)
	far.Close()
	return faults, problems
}

// Closed sessions leave nothing behind once unreachable: descriptors and
// memfd mappings are released at Close; the private pages that replace the
// rings' shared memory at Close are unmapped once nothing reaches them
// (shm.Mapped counts both; internal/shm's tests check against the kernel
// that a region it no longer counts is unmapped). The number of lines in
// /proc/self/maps is no measure: the runtime maps memory of its own as the
// test runs.
func TestClosedSessionsReleaseEverything(t *testing.T) {
	ts := startServer(t, "", ServerConfig{SessionConfig: closeConfig(futex.PolicyAuto)})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	open := func() (d, k *Session) {
		d, err := Dial(ctx, ts.path, DialConfig{SessionConfig: closeConfig(futex.PolicyAuto)})
		require.NoError(t, err)
		select {
		case k = <-ts.sess:
		case err := <-ts.errs:
			require.NoError(t, err)
		}
		return d, k
	}
	fds, memfds, mapped := countFDs(t), countMemfdMaps(t), shm.Mapped()
	for i := range closetest.Trials(100) {
		d, k := open()
		_, err := d.Producer().Write([]byte("x"))
		require.NoError(t, err)
		if i%2 == 0 {
			require.NoError(t, d.Close())
			require.NoError(t, k.Close())
		} else {
			require.NoError(t, k.Close())
			require.NoError(t, d.Close())
		}
	}
	assert.Equal(t, fds, countFDs(t), "descriptors once closed")
	assert.Equal(t, memfds, countMemfdMaps(t), "memfd mappings once closed")
	closetest.Collect(t, mapped)
}

// countMemfdMaps is the number of memfd mappings of this process.
func countMemfdMaps(t *testing.T) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/maps")
	require.NoError(t, err)
	return bytes.Count(b, []byte("/memfd:"))
}
