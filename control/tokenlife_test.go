package control

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/control/token"
	"github.com/sypas/go/frame"
	"github.com/sypas/go/wire"
)

// sendRaw writes m from the daemon session d as the next frame, with the
// session's cap_ref and correlation corr, as if d had sent it itself.
func sendRaw(t *testing.T, d *Session, m wire.Message, corr uint64) {
	t.Helper()
	require.NoError(t, trySendRaw(d, m, corr))
}

// trySendRaw writes m on d's control socket as d would, bypassing its state
// checks, and reports the write error.
func trySendRaw(d *Session, m wire.Message, corr uint64) error {
	d.wmu.Lock()
	defer d.wmu.Unlock()
	d.wseq++
	b, err := wire.AppendFrame(nil, frame.Header{Sequence: d.wseq, CapRef: d.capRef(), Correlation: corr}, m)
	if err != nil {
		return err
	}
	_, err = d.conn.Write(b)
	return err
}

func waitDone(t *testing.T, s *Session, what string) {
	t.Helper()
	select {
	case <-s.Done():
	case <-time.After(5 * time.Second):
		t.Fatalf("%s session survived", what)
	}
}

// Revoking a session's token ends the session: the kernel's and the
// daemon's ring waiters are woken with an error matching wire.ErrAuth
// within milliseconds, the daemon gets GOAWAY E_AUTH, the capability
// refuses at once, and the kernel writes one audit record. Before, the
// session kept its socket and rings until its next refresh or its expiry
// (an hour by default); only Allows refused.
func TestSessionTokenRevoked(t *testing.T) {
	rev := token.NewRevocations()
	sink, log := newAuditSink()
	ts := startServer(t, "", ServerConfig{Revoked: rev, SessionConfig: SessionConfig{Logger: log}})
	var lats []time.Duration
	for i := range 10 {
		other := dialT(t, ts.path, DialConfig{})
		ts.session(t)
		d := dialT(t, ts.path, DialConfig{})
		k := ts.session(t)
		c := k.Capability()
		require.NoError(t, c.Allows(token.RightRequest, "", time.Now()))
		kwoken, dwoken := waitWoken(k), waitWoken(d)

		rev.Revoke(c.ID, c.MintedExpiry)
		revoked := time.Now()
		assert.ErrorIs(t, k.Capability().Allows(token.RightRequest, "", time.Now()), token.ErrRevoked)
		var kw, dw wake
		for _, w := range []struct {
			ch  <-chan wake
			got *wake
		}{{kwoken, &kw}, {dwoken, &dw}} {
			select {
			case *w.got = <-w.ch:
			case <-time.After(5 * time.Second):
				t.Fatal("a ring waiter survived the revocation")
			}
		}
		lats = append(lats, kw.at.Sub(revoked), dw.at.Sub(revoked))
		assert.ErrorIs(t, kw.err, wire.ErrAuth, "kernel ring waiter: %v", kw.err)
		assert.ErrorIs(t, dw.err, wire.ErrAuth, "daemon ring waiter: %v", dw.err)
		waitDone(t, k, "kernel")
		waitDone(t, d, "daemon")
		assert.ErrorIs(t, k.Err(), wire.ErrAuth)
		assert.ErrorIs(t, k.Err(), token.ErrRevoked)
		assert.ErrorIs(t, d.Err(), wire.ErrAuth, "daemon: %v", d.Err())
		assert.ErrorIs(t, d.Err(), errPeerSent, "told by GOAWAY")
		assert.ErrorContains(t, d.Err(), "GOAWAY")
		assert.ErrorContains(t, d.Err(), "revoked")

		// Only the session holding the token ends.
		assertAlive(t, other)
		assert.NoError(t, other.Err())
		if i == 0 {
			r := sink.one(t, EventRevocation)
			assert.Equal(t, hexID(c.ID), r[LogKeyTokenID])
			assert.Equal(t, "E_AUTH", r[LogKeyCode])
			assertSelf(t, r)
			sink.noSecret(t, k.Token().Bytes)
		}
	}
	slices.Sort(lats)
	t.Logf("revocation → ring waiter woken (kernel and daemon, 10 sessions): median %v, max %v", lats[len(lats)/2], lats[len(lats)-1])
	assert.Less(t, lats[len(lats)-1], time.Second, "within milliseconds (loose bound)")
}

// assertAlive checks that the kernel session behind d is alive: a
// heartbeat is answered.
func assertAlive(t *testing.T, d *Session) {
	t.Helper()
	sendRaw(t, d, &wire.Heartbeat{Nonce: 42}, 0)
	time.Sleep(10 * time.Millisecond)
	assert.NoError(t, d.Err())
}

// The token a refresh replaced is still accepted as cap_ref until the next
// refresh, so revoking it ends the session too. Revoking an id no session
// holds ends nothing, and sessions that ended no longer watch the set.
func TestPreviousTokenRevoked(t *testing.T) {
	rev := token.NewRevocations()
	ts := startServer(t, "", ServerConfig{Revoked: rev})
	d := dialT(t, ts.path, DialConfig{})
	k := ts.session(t)
	first := k.Capability()
	sendRaw(t, d, &wire.TokenRefresh{TokenID: d.Token().ID}, d.corr.Add(1))
	select {
	case <-d.tokenUp:
	case <-time.After(5 * time.Second):
		t.Fatal("no refreshed TOKEN")
	}
	require.NotEqual(t, first.ID, k.Token().ID)

	rev.Revoke(first.ID^0xFFFF, time.Now().Add(time.Hour)) // nobody's
	time.Sleep(20 * time.Millisecond)
	require.NoError(t, k.Err())
	require.NoError(t, d.Err())

	rev.Revoke(first.ID, first.MintedExpiry)
	waitDone(t, k, "kernel")
	waitDone(t, d, "daemon")
	assert.ErrorIs(t, k.Err(), token.ErrRevoked)
	assert.ErrorContains(t, k.Err(), fmt.Sprintf("%#x", first.ID))
	assert.ErrorIs(t, d.Err(), wire.ErrAuth)
	require.NoError(t, k.Close())
	require.NoError(t, d.Close())
	assert.Zero(t, rev.Watching(), "an ended session stops watching")
}

// A token that has expired (by the server's clock) is not renewed either.
func TestRefreshOfExpiredTokenRefused(t *testing.T) {
	var skew atomic.Int64
	clock := func() time.Time { return time.Now().Add(time.Duration(skew.Load())) }
	ts := startServer(t, "", ServerConfig{Clock: clock, TokenTTL: time.Hour})
	d := dialT(t, ts.path, DialConfig{})
	k := ts.session(t)
	skew.Store(int64(2 * time.Hour))
	// The kernel's expiry check may see the skewed clock first and end the
	// session with the same E_AUTH before the refresh is written; then the
	// write finds the connection closed, and the assertions below still hold.
	if err := trySendRaw(d, &wire.TokenRefresh{TokenID: d.Token().ID}, d.corr.Add(1)); err != nil {
		closed := errors.Is(err, net.ErrClosed) || errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET)
		require.True(t, closed, "send refresh: %v", err)
	}
	waitDone(t, k, "kernel")
	waitDone(t, d, "daemon")
	assert.Equal(t, wire.CodeAuth, wire.CodeOf(k.Err()), "kernel: %v", k.Err())
	assert.ErrorIs(t, k.Err(), token.ErrExpired)
	assert.Equal(t, wire.CodeAuth, wire.CodeOf(d.Err()), "daemon: %v", d.Err())
}

// Without TOKEN_REFRESH a session used to outlive its token forever. Now
// each side ends it at the token's expiry with E_AUTH, whichever sees it
// first telling the other. The kernel's clock is skewed so that one side's
// deadline comes clearly first: +10 s puts the daemon's (wall-clock) expiry
// far later, so the kernel ends the session; -ttl/2 makes the daemon first.
func TestSessionEndsAtTokenExpiry(t *testing.T) {
	const ttl = 600 * time.Millisecond
	for _, tc := range []struct {
		name   string
		skew   time.Duration
		kernel bool // the kernel ends it
	}{
		{"kernel", 10 * time.Second, true},
		{"daemon", -ttl / 2, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clock := func() time.Time { return time.Now().Add(tc.skew) }
			ts := startServer(t, "", ServerConfig{Clock: clock, TokenTTL: ttl})
			start := time.Now()
			d := dialT(t, ts.path, DialConfig{SessionConfig: SessionConfig{Features: wire.FeatureBulk}})
			k := ts.session(t)
			require.Zero(t, d.Params().Features&wire.FeatureTokenRefresh)
			waitDone(t, k, "kernel")
			waitDone(t, d, "daemon")
			el := time.Since(start)
			t.Logf("ended after %v: kernel %v; daemon %v", el, k.Err(), d.Err())
			assert.Equal(t, wire.CodeAuth, wire.CodeOf(k.Err()), "kernel: %v", k.Err())
			assert.Equal(t, wire.CodeAuth, wire.CodeOf(d.Err()), "daemon: %v", d.Err())
			first, second := k, d
			if !tc.kernel {
				first, second = d, k
			}
			assert.ErrorIs(t, first.Err(), token.ErrExpired)
			assert.NotErrorIs(t, first.Err(), errPeerSent)
			assert.ErrorIs(t, second.Err(), errPeerSent, "told by the other side")
			assert.Contains(t, first.Err().Error(), "TOKEN_REFRESH was not negotiated")
			assert.Greater(t, el, ttl/3)
		})
	}
}

// A TOKEN_REFRESH that crosses the kernel's GOAWAY used to kill the drain
// with E_PROTO. The kernel now serves it while draining.
func TestRefreshWhileDraining(t *testing.T) {
	ts := startServer(t, "", ServerConfig{})
	d := dialT(t, ts.path, DialConfig{})
	k := ts.session(t)
	require.NoError(t, k.sendGoAway())
	require.Equal(t, StateDraining, k.State())
	old := d.Token().ID
	sendRaw(t, d, &wire.TokenRefresh{TokenID: old}, d.corr.Add(1))
	require.Eventually(t, func() bool { return d.Token().ID != old || d.Err() != nil }, 5*time.Second, time.Millisecond)
	require.NoError(t, d.Err())
	require.NoError(t, k.Err())
	assert.Equal(t, k.Token().ID, d.Token().ID)
	// And the drain completes normally.
	<-d.GoAway()
	require.NoError(t, d.Shutdown(context.Background()))
	<-k.Done()
	assert.ErrorIs(t, k.Err(), ErrSessionClosed)
}
