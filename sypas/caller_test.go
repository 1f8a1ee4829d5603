package sypas

import (
	"context"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/control"
	"github.com/sypas/go/control/token"
	"github.com/sypas/go/wire"
)

// callerServer is a Server (not serving any listener) with echo, an
// admin-only op and a gate, and an audit log.
func callerServer(t *testing.T, cfg ServerConfig) (*Server, *auditLog, *gate) {
	t.Helper()
	a, log := newAuditLog()
	if cfg.Keys == nil {
		cfg.Keys = testKeys(t)
	}
	cfg.Logger = log
	srv, err := NewServer(cfg)
	require.NoError(t, err)
	g := newGate()
	srv.Handle("echo", RightRequest, echo)
	srv.Handle("admin", RightAdmin, echo)
	srv.Handle("gate", RightRequest, g.handle)
	t.Cleanup(func() { srv.Close() }) // ends a gate's calls too
	return srv, a, g
}

var certPeer = control.PeerIdentity{UID: control.NoUID, GID: control.NoUID, ExeSHA256: [32]byte{1, 2, 3}}

func TestCallerCallsThroughTheEnforcer(t *testing.T) {
	srv, a, _ := callerServer(t, ServerConfig{ServerConfig: control.ServerConfig{SessionConfig: control.SessionConfig{MaxInFlight: 2}}})
	c, err := srv.NewCaller(certPeer)
	require.NoError(t, err)
	ctx := context.Background()

	got, err := c.Call(ctx, "echo", []byte("hi"))
	require.NoError(t, err)
	assert.Equal(t, "hi", string(got))

	_, err = c.Call(ctx, "nope", nil)
	assert.ErrorIs(t, err, ErrNotFound)
	a.expect(t, refused(control.EventProtocol, CodeNotFound, 2))
	_, err = c.Call(ctx, "admin", nil)
	assert.ErrorIs(t, err, ErrPermission)
	a.expect(t, refused(control.EventPermission, CodePermission, 3))
	_, err = c.Call(ctx, "echo", make([]byte, 64<<10+1))
	assert.ErrorIs(t, err, ErrTooLarge)
	assert.Equal(t, uint64(3), srv.Stats().Denied)
	assert.Equal(t, uint64(1), srv.Stats().OK)
}

func TestCallerInFlightBounded(t *testing.T) {
	srv, a, g := callerServer(t, ServerConfig{ServerConfig: control.ServerConfig{SessionConfig: control.SessionConfig{MaxInFlight: 2}}})
	c, err := srv.NewCaller(certPeer)
	require.NoError(t, err)
	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() {
			_, err := c.Call(context.Background(), "gate", nil)
			assert.NoError(t, err)
		})
	}
	g.waitInside(t, 2)
	assert.Equal(t, int64(2), srv.Stats().InFlight)
	_, err = c.Call(context.Background(), "gate", nil)
	assert.ErrorIs(t, err, ErrResource)
	a.expect(t, refused(control.EventLimit, CodeResource, 0))
	close(g.release)
	wg.Wait()
	assert.Equal(t, int64(0), srv.Stats().InFlight)
}

// TestCallerRevokedToken: a revoked token refuses the request (E_AUTH,
// audited); the next one is served with a fresh token, as a reconnecting
// daemon would be.
func TestCallerRevokedToken(t *testing.T) {
	rev := token.NewRevocations()
	srv, a, _ := callerServer(t, ServerConfig{ServerConfig: control.ServerConfig{Revoked: rev}})
	c, err := srv.NewCaller(certPeer)
	require.NoError(t, err)
	first := c.capab.Load()
	rev.Revoke(first.ID, first.MintedExpiry)
	_, err = c.Call(context.Background(), "echo", nil)
	assert.ErrorIs(t, err, ErrAuth)
	a.expect(t, refused(control.EventAuth, CodeAuth, 1))
	_, err = c.Call(context.Background(), "echo", nil)
	require.NoError(t, err)
	assert.NotEqual(t, first.ID, c.capab.Load().ID)
}

func TestCallerExpiredTokenIsRenewed(t *testing.T) {
	now := time.Now()
	var mu sync.Mutex
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	srv, _, _ := callerServer(t, ServerConfig{ServerConfig: control.ServerConfig{Clock: clock, TokenTTL: time.Minute}})
	c, err := srv.NewCaller(certPeer)
	require.NoError(t, err)
	first := c.capab.Load().ID
	mu.Lock()
	now = now.Add(2 * time.Minute)
	mu.Unlock()
	var got Request
	srv.Handle("who", 0, func(_ context.Context, r *Request) ([]byte, error) { got = *r; return nil, nil })
	_, err = c.Call(context.Background(), "who", nil)
	require.NoError(t, err)
	assert.NotEqual(t, first, got.TokenID)
	assert.Equal(t, certPeer.Subject(), got.Subject)
	assert.Equal(t, certPeer, got.Peer)
}

func TestCallerFeed(t *testing.T) {
	srv, a, _ := callerServer(t, ServerConfig{MaxSubscriptions: 1})
	c, err := srv.NewCaller(certPeer)
	require.NoError(t, err)
	ctx := context.Background()
	f, err := c.Subscribe(ctx, "ticks", 2)
	require.NoError(t, err)
	_, err = c.Subscribe(ctx, "other", 2)
	assert.ErrorIs(t, err, ErrResource)
	a.expect(t, refused(control.EventLimit, CodeResource, 0))

	for _, b := range []string{"1", "2", "3"} {
		require.NoError(t, srv.Publish(ctx, "ticks", []byte(b)))
	}
	assert.Equal(t, "1", string((<-f.C).Body))
	assert.Equal(t, "2", string((<-f.C).Body))
	assert.Equal(t, uint64(1), f.Dropped(), "the third found the feed full")
	assert.Equal(t, uint64(1), srv.Stats().Dropped)

	f.Close()
	require.NoError(t, srv.Publish(ctx, "ticks", []byte("4")))
	assert.Empty(t, f.C)
	g, err := c.Subscribe(ctx, "ticks", 0)
	require.NoError(t, err, "Close gave the subscription back")
	require.NoError(t, srv.Shutdown(ctx))
	select {
	case <-g.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("Shutdown did not end the feed")
	}
	_, err = c.Call(ctx, "echo", nil)
	assert.ErrorIs(t, err, ErrUnavailable)
}

func TestCallerFeedNeedsTheRight(t *testing.T) {
	srv, a, _ := callerServer(t, ServerConfig{ServerConfig: control.ServerConfig{Rights: RightRequest}})
	c, err := srv.NewCaller(certPeer)
	require.NoError(t, err)
	_, err = c.Subscribe(context.Background(), "ticks", 0)
	assert.ErrorIs(t, err, ErrPermission)
	a.expect(t, refused(control.EventPermission, CodePermission, 0))
}

// TestCallerShutdownWaitsForCalls: Shutdown and Close wait for a Caller's
// handler as they wait for a session's (a handler that outlived Close could
// use what its owner tears down after it), and a Caller's request after
// they began is refused E_UNAVAILABLE.
func TestCallerShutdownWaitsForCalls(t *testing.T) {
	for _, stop := range []string{"Close", "Shutdown"} {
		t.Run(stop, func(t *testing.T) {
			srv, _, _ := callerServer(t, ServerConfig{})
			inside := make(chan struct{})
			var finished atomic.Bool
			srv.Handle("slow", RightRequest, func(ctx context.Context, r *Request) ([]byte, error) {
				close(inside)
				<-ctx.Done()
				time.Sleep(50 * time.Millisecond) // cleaning up after the cancel
				finished.Store(true)
				return nil, ctx.Err()
			})
			c, err := srv.NewCaller(certPeer)
			require.NoError(t, err)
			done := make(chan error, 1)
			go func() {
				_, err := c.Call(context.Background(), "slow", nil)
				done <- err
			}()
			<-inside
			if stop == "Close" {
				require.NoError(t, srv.Close())
			} else {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
				defer cancel()
				assert.ErrorIs(t, srv.Shutdown(ctx), context.DeadlineExceeded) // the handler ignores GOAWAY: Close
			}
			assert.True(t, finished.Load(), "%s returned while a Caller's handler ran", stop)
			srv.Close() // ends the handler if Shutdown did not
			assert.ErrorIs(t, <-done, ErrUnavailable)
			_, err = c.Call(context.Background(), "echo", nil)
			assert.ErrorIs(t, err, ErrUnavailable)
		})
	}
}

// TestCallerLongOpNotAudited: an operation name longer than any route's
// (a stock client's sypas-op metadata may be megabytes) is refused
// E_NOT_FOUND without its bytes in the audit record.
func TestCallerLongOpNotAudited(t *testing.T) {
	srv, a, _ := callerServer(t, ServerConfig{})
	c, err := srv.NewCaller(certPeer)
	require.NoError(t, err)
	op := strings.Repeat("x", wire.MaxNameLen+1)
	_, err = c.Call(context.Background(), op, nil)
	assert.ErrorIs(t, err, ErrNotFound)
	r := a.expect(t, refused(control.EventProtocol, CodeNotFound, 1))
	for k, v := range r {
		assert.NotContains(t, v, op[:wire.MaxNameLen], "the op in audit key %s", k)
	}
	_, err = c.Call(context.Background(), op[:wire.MaxNameLen], nil) // as long as a name may be: looked up
	assert.ErrorIs(t, err, ErrNotFound)
	a.expect(t, map[string]string{control.LogKeyOp: op[:wire.MaxNameLen]})
}

// TestCallerCallFrom: a request of the Caller's identity from another
// connection is audited, and handed to the handler, with that
// connection's address, not the first one's; a peer of another identity
// is refused.
func TestCallerCallFrom(t *testing.T) {
	srv, a, _ := callerServer(t, ServerConfig{})
	srv.Handle("remote", RightRequest, func(_ context.Context, r *Request) ([]byte, error) { return []byte(r.Peer.Remote), nil })
	first, second := certPeer, certPeer
	first.Remote, second.Remote = "192.0.2.1:1000", "192.0.2.2:2000"
	c, err := srv.NewCaller(first)
	require.NoError(t, err)
	ctx := context.Background()

	got, err := c.CallFrom(ctx, second, "remote", nil)
	require.NoError(t, err)
	assert.Equal(t, second.Remote, string(got))
	_, err = c.CallFrom(ctx, second, "admin", nil)
	assert.ErrorIs(t, err, ErrPermission)
	r := a.expect(t, refused(control.EventPermission, CodePermission, 2))
	assert.Equal(t, second.Remote, r[control.LogKeyPeerAddr])
	_, err = c.SubscribeFrom(ctx, second, strings.Repeat("t", wire.MaxNameLen+1), 0)
	assert.ErrorIs(t, err, ErrProto)
	r = a.expect(t, refused(control.EventProtocol, CodeProto, 3))
	assert.Equal(t, second.Remote, r[control.LogKeyPeerAddr])

	got, err = c.Call(ctx, "remote", nil)
	require.NoError(t, err)
	assert.Equal(t, first.Remote, string(got))

	other := second
	other.ExeSHA256[0]++ // another certificate
	_, err = c.CallFrom(ctx, other, "echo", nil)
	assert.ErrorIs(t, err, ErrPermission)
	_, err = c.SubscribeFrom(ctx, other, "t", 0)
	assert.ErrorIs(t, err, ErrPermission)
}
