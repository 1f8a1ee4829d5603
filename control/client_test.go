package control

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A kernel that drops every session as soon as it is established used to
// be redialed in a tight loop (~208 handshakes/s): every established
// session reset the backoff. A session that dies within the backoff's Base
// now counts as a failure.
func TestClientBacksOffFromShortSessions(t *testing.T) {
	l, err := Listen(sockPath(t), Config{})
	require.NoError(t, err)
	defer l.Close()
	srv, err := NewServer(l, ServerConfig{Keys: testKeys(t)})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	var accepted atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			s, err := srv.Accept(ctx)
			if err != nil {
				continue
			}
			accepted.Add(1)
			s.Close()
		}
	}()
	// Without the fix: hundreds of dials in the window. With it, 50 ms,
	// 100 ms, then 200 ms apart: about 7.
	c := newClient(l.Path(), DialConfig{Backoff: Backoff{Base: 50 * time.Millisecond, Multiplier: 2, Jitter: -1, Max: 200 * time.Millisecond}},
		func() float64 { return 0.5 })
	time.Sleep(time.Second)
	require.NoError(t, c.Close())
	cancel()
	l.Close()
	<-done
	n := accepted.Load()
	t.Logf("%d sessions in 1 s", n)
	assert.GreaterOrEqual(t, n, int64(3), "the Client keeps trying")
	assert.LessOrEqual(t, n, int64(12))
}

// A session nobody has claimed answers the kernel's GOAWAY at once (the
// Client shuts it down) instead of sitting out the drain timeout, and is
// not handed out while draining; the Client then reconnects.
func TestClientAnswersGoAwayUnclaimed(t *testing.T) {
	ts := startServer(t, "", ServerConfig{})
	c := newClient(ts.path, DialConfig{Backoff: Backoff{Base: 10 * time.Millisecond}}, func() float64 { return 0.5 })
	defer c.Close()
	k := ts.session(t)
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	require.NoError(t, k.Shutdown(ctx))
	el := time.Since(start)
	t.Logf("kernel's Shutdown took %v", el)
	assert.Less(t, el, time.Second, "the daemon answered GOAWAY (drain timeout is %v)", DefaultDrainTimeout)
	k2 := ts.session(t)
	s, err := c.Session(ctx)
	require.NoError(t, err)
	assert.Equal(t, k2.Token().ID, s.Token().ID)
}
