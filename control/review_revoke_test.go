package control

import (
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/sypas/go/control/token"
	"github.com/sypas/go/wire"
)

// inGoroutine reports whether the calling goroutine's stack holds fn.
func inGoroutine(fn string) bool {
	buf := make([]byte, 16<<10)
	return strings.Contains(string(buf[:runtime.Stack(buf, false)]), fn)
}

// A revocation that lands while a refresh is minting the current token's
// successor must still end the session, however late the session's expiry
// goroutine runs. It used to look again only at the current and previous
// ids when it woke, so two quick refreshes before it ran (a scheduling
// delay, forced here through the server clock, which that goroutine reads)
// pushed the revoked id out of both and the session lived on with a chain
// of tokens minted from a revoked one.
func TestRevocationDuringRefreshNotLost(t *testing.T) {
	rev := token.NewRevocations()
	var (
		stallExpiry atomic.Bool
		stalled     = make(chan struct{})
		release     = make(chan struct{})
		inMint      atomic.Pointer[func()]
	)
	clock := func() time.Time {
		if stallExpiry.Load() && inGoroutine(").expiryLoop(") && stallExpiry.CompareAndSwap(true, false) {
			close(stalled)
			<-release
		}
		if f := inMint.Load(); f != nil && inGoroutine(").mint(") && inMint.CompareAndSwap(f, nil) {
			(*f)()
		}
		return time.Now()
	}
	ts := startServer(t, "", ServerConfig{Revoked: rev, Clock: clock})
	d := dialT(t, ts.path, DialConfig{})
	k := ts.session(t)
	defer func() {
		select {
		case <-release:
		default:
			close(release)
		}
	}()

	refresh := func() {
		t.Helper()
		sendRaw(t, d, &wire.TokenRefresh{TokenID: d.Token().ID}, d.corr.Add(1))
		select {
		case <-d.tokenUp:
		case <-time.After(5 * time.Second):
			t.Fatalf("no refreshed TOKEN: kernel %v, daemon %v", k.Err(), d.Err())
		}
	}

	// The expiry goroutine wakes for the new token and stalls in its clock
	// read, as if the scheduler had not run it yet.
	stallExpiry.Store(true)
	refresh()
	select {
	case <-stalled:
	case <-time.After(5 * time.Second):
		t.Fatal("the expiry goroutine never read the clock")
	}

	// The current token is revoked while the refresh mints its successor:
	// the session's watcher sees it current and signals.
	a := k.Capability()
	revokeA := func() { rev.Revoke(a.ID, a.MintedExpiry) }
	inMint.Store(&revokeA)
	refresh()
	require.Nil(t, inMint.Load(), "the revocation ran inside mint")
	require.True(t, rev.Contains(a.ID))
	refresh() // and one more before the expiry goroutine runs
	close(release)

	select {
	case <-k.Done():
		require.ErrorIs(t, k.Err(), token.ErrRevoked)
	case <-time.After(3 * time.Second):
		t.Fatalf("the session whose token %#x was revoked lives on with token %#x", a.ID, k.Token().ID)
	}
}
