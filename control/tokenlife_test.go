package control

import (
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/sypas/control/token"
	"github.com/sypas/sypas/frame"
	"github.com/sypas/sypas/sypas"
)

// sendRaw writes m from the daemon session d as the next frame, with the
// session's cap_ref and correlation corr, as if d had sent it itself.
func sendRaw(t *testing.T, d *Session, m sypas.Message, corr uint64) {
	t.Helper()
	d.wmu.Lock()
	defer d.wmu.Unlock()
	d.wseq++
	b, err := sypas.AppendFrame(nil, frame.Header{Sequence: d.wseq, CapRef: d.capRef(), Correlation: corr}, m)
	require.NoError(t, err)
	_, err = d.conn.Write(b)
	require.NoError(t, err)
}

func waitDone(t *testing.T, s *Session, what string) {
	t.Helper()
	select {
	case <-s.Done():
	case <-time.After(5 * time.Second):
		t.Fatalf("%s session survived", what)
	}
}

// A revocation reaches the session's cached capability (Allows refuses at
// once), and a revoked token is not renewed: its refresh ends the session
// with E_AUTH on both sides. Before ServerConfig.Revoked, mint verified
// without revocations, so Allows never saw one and refresh renewed the
// token.
func TestSessionTokenRevoked(t *testing.T) {
	rev := token.NewRevocations()
	ts := startServer(t, "", ServerConfig{Revoked: rev})
	d := dialT(t, ts.path, DialConfig{})
	k := ts.session(t)
	c := k.Capability()
	require.NoError(t, c.Allows(token.RightRequest, "", time.Now()))

	rev.Revoke(c.ID, c.MintedExpiry)
	assert.ErrorIs(t, k.Capability().Allows(token.RightRequest, "", time.Now()), token.ErrRevoked)

	corr := d.corr.Add(1)
	sendRaw(t, d, &sypas.TokenRefresh{TokenID: d.Token().ID}, corr)
	waitDone(t, k, "kernel")
	waitDone(t, d, "daemon")
	assert.Equal(t, sypas.CodeAuth, sypas.CodeOf(k.Err()), "kernel: %v", k.Err())
	assert.ErrorIs(t, k.Err(), token.ErrRevoked)
	assert.Equal(t, sypas.CodeAuth, sypas.CodeOf(d.Err()), "daemon: %v", d.Err())
	assert.ErrorIs(t, d.Err(), errPeerSent)
}

// A token that has expired (by the server's clock) is not renewed either.
func TestRefreshOfExpiredTokenRefused(t *testing.T) {
	var skew atomic.Int64
	clock := func() time.Time { return time.Now().Add(time.Duration(skew.Load())) }
	ts := startServer(t, "", ServerConfig{Clock: clock, TokenTTL: time.Hour})
	d := dialT(t, ts.path, DialConfig{})
	k := ts.session(t)
	skew.Store(int64(2 * time.Hour))
	sendRaw(t, d, &sypas.TokenRefresh{TokenID: d.Token().ID}, d.corr.Add(1))
	waitDone(t, k, "kernel")
	waitDone(t, d, "daemon")
	assert.Equal(t, sypas.CodeAuth, sypas.CodeOf(k.Err()), "kernel: %v", k.Err())
	assert.ErrorIs(t, k.Err(), token.ErrExpired)
	assert.Equal(t, sypas.CodeAuth, sypas.CodeOf(d.Err()), "daemon: %v", d.Err())
}
