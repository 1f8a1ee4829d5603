package token

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

var (
	t0    = time.Unix(1_700_000_000, 0)
	peer  = Subject{UID: 1000, GID: 1000, PID: 4242, ExeSHA256: sha256.Sum256([]byte("daemon"))}
	key0  = bytes.Repeat([]byte{0x11}, 32)
	key1  = bytes.Repeat([]byte{0x22}, 32)
	claim = Claims{
		ID:        0x0123456789abcdef,
		Subject:   peer,
		Rights:    RightRequest | RightSubscribe | RightBulk,
		Scope:     "svc/orders",
		NotBefore: t0,
		Expiry:    t0.Add(time.Hour),
	}
)

func fixedClock(t time.Time) func() time.Time { return func() time.Time { return t } }

func newVerifier(t testing.TB) (*Keyring, *Verifier) {
	t.Helper()
	k := NewKeyring()
	require.NoError(t, k.Add(7, key0))
	return k, &Verifier{Keys: k, Revoked: NewRevocations(), Clock: fixedClock(t0.Add(time.Minute))}
}

func mint(t testing.TB, k *Keyring, c Claims) []byte {
	t.Helper()
	tok, err := k.Mint(c)
	require.NoError(t, err)
	return tok
}

func TestMintVerifyRoundTrip(t *testing.T) {
	k, v := newVerifier(t)
	tok := mint(t, k, claim)
	assert.Len(t, tok, HeaderSize+len(claim.Scope)+SigSize)

	c, err := v.Verify(tok, peer)
	require.NoError(t, err)
	assert.Equal(t, claim.ID, c.ID)
	assert.Equal(t, uint32(7), c.KeyID)
	assert.Equal(t, peer, c.Subject)
	assert.Equal(t, claim.Rights, c.Rights)
	assert.Equal(t, claim.Scope, c.Scope)
	assert.True(t, c.NotBefore.Equal(claim.NotBefore))
	assert.True(t, c.Expiry.Equal(claim.Expiry))
	assert.True(t, c.MintedExpiry.Equal(claim.Expiry))

	parsed, err := Parse(tok)
	require.NoError(t, err)
	again, err := parsed.MarshalBinary()
	require.NoError(t, err)
	assert.Equal(t, tok, again)
}

func TestMintRandomID(t *testing.T) {
	k, _ := newVerifier(t)
	c := claim
	c.ID = 0
	a, b := mint(t, k, c), mint(t, k, c)
	ta, err := Parse(a)
	require.NoError(t, err)
	tb, err := Parse(b)
	require.NoError(t, err)
	assert.NotZero(t, ta.ID)
	assert.NotEqual(t, ta.ID, tb.ID)
}

func TestMintRejectsBadClaims(t *testing.T) {
	k, _ := newVerifier(t)
	for name, mut := range map[string]func(*Claims){
		"no expiry":        func(c *Claims) { c.Expiry = time.Time{} },
		"expiry before nb": func(c *Claims) { c.Expiry = c.NotBefore },
		"bad scope":        func(c *Claims) { c.Scope = "svc//x" },
		"dotdot":           func(c *Claims) { c.Scope = "svc/.." },
		"long scope":       func(c *Claims) { c.Scope = string(bytes.Repeat([]byte{'a'}, MaxScopeLen+1)) },
		"year 3000":        func(c *Claims) { c.Expiry = time.Date(3000, 1, 1, 0, 0, 0, 0, time.UTC) },
	} {
		c := claim
		mut(&c)
		_, err := k.Mint(c)
		assert.Error(t, err, name)
	}
	_, err := NewKeyring().Mint(claim)
	assert.ErrorIs(t, err, ErrNoCurrentKey)
}

func TestVerifyDefaultsAndSubject(t *testing.T) {
	k, v := newVerifier(t)
	// PID 0 and zero digest bind to uid/gid only.
	c := claim
	c.Subject = Subject{UID: peer.UID, GID: peer.GID}
	tok := mint(t, k, c)
	_, err := v.Verify(tok, peer)
	assert.NoError(t, err)

	tok = mint(t, k, claim)
	for name, p := range map[string]Subject{
		"uid": {UID: 0, GID: peer.GID, PID: peer.PID, ExeSHA256: peer.ExeSHA256},
		"gid": {UID: peer.UID, GID: 0, PID: peer.PID, ExeSHA256: peer.ExeSHA256},
		"pid": {UID: peer.UID, GID: peer.GID, PID: 1, ExeSHA256: peer.ExeSHA256},
		"exe": {UID: peer.UID, GID: peer.GID, PID: peer.PID},
	} {
		_, err := v.Verify(tok, p)
		assert.ErrorIs(t, err, ErrSubject, name)
	}
}

func TestErrorsMatchErrAuth(t *testing.T) {
	for _, e := range []error{ErrMalformed, ErrUnknownKey, ErrForged, ErrExpired, ErrNotYetValid,
		ErrRevoked, ErrSubject, ErrRights, ErrScope} {
		assert.ErrorIs(t, e, ErrAuth, e.Error())
		assert.ErrorIs(t, fmt.Errorf("ctx: %w", e), ErrAuth)
	}
	for _, e := range []error{ErrRights, ErrScope} {
		assert.ErrorIs(t, e, ErrPermission)
	}
	for _, e := range []error{ErrMalformed, ErrUnknownKey, ErrForged, ErrExpired, ErrNotYetValid, ErrRevoked, ErrSubject} {
		assert.NotErrorIs(t, e, ErrPermission)
	}
	assert.NotErrorIs(t, ErrNoCurrentKey, ErrAuth)
	assert.NotErrorIs(t, ErrForged, ErrExpired)
}

// attenuated returns a token with one caveat of each kind, so byte-level
// tests cover the caveat encoding too.
func attenuated(t testing.TB, k *Keyring) []byte {
	t.Helper()
	tok, err := Attenuate(mint(t, k, claim),
		RestrictRights(RightRequest|RightBulk),
		RestrictScope("svc/orders/eu"),
		RestrictExpiry(t0.Add(30*time.Minute)))
	require.NoError(t, err)
	return tok
}

func TestEveryByteFlipFails(t *testing.T) {
	k, v := newVerifier(t)
	tok := attenuated(t, k)
	_, err := v.Verify(tok, peer)
	require.NoError(t, err)
	for i := range tok {
		for _, pat := range []byte{0x01, 0x02, 0x10, 0x80, 0x55, 0xff} {
			b := bytes.Clone(tok)
			b[i] ^= pat
			_, err := v.Verify(b, peer)
			if !assert.ErrorIs(t, err, ErrAuth, "byte %d ^ %#x", i, pat) {
				return
			}
		}
	}
}

func TestTruncationAndExtensionFail(t *testing.T) {
	k, v := newVerifier(t)
	tok := attenuated(t, k)
	for n := range len(tok) {
		_, err := v.Verify(tok[:n], peer)
		assert.ErrorIs(t, err, ErrAuth, "length %d", n)
	}
	for _, tail := range [][]byte{{0}, {1, 8, 0, 0, 0, 0, 0, 0, 0, 0}, make([]byte, SigSize)} {
		_, err := v.Verify(append(bytes.Clone(tok), tail...), peer)
		assert.ErrorIs(t, err, ErrAuth)
	}
}

// A holder can see every caveat and the final signature but not the
// intermediate ones: removing, reordering or widening a caveat is forgery.
func TestCaveatsCannotBeRemovedOrReordered(t *testing.T) {
	k, v := newVerifier(t)
	base := mint(t, k, claim)
	one, err := Attenuate(base, RestrictRights(RightRequest))
	require.NoError(t, err)
	two, err := Attenuate(one, RestrictScope("svc/orders/eu"))
	require.NoError(t, err)
	capTwo, err := v.Verify(two, peer)
	require.NoError(t, err)
	assert.Equal(t, RightRequest, capTwo.Rights)

	// Drop the rights caveat, keep the final signature.
	hdr := HeaderSize + len(claim.Scope)
	dropped := append(bytes.Clone(two[:hdr]), two[hdr+10:]...)
	_, err = v.Verify(dropped, peer)
	assert.ErrorIs(t, err, ErrForged)

	// Swap the two caveats.
	scopeCav := two[hdr+10 : len(two)-SigSize]
	swapped := append(append(append(bytes.Clone(two[:hdr]), scopeCav...), two[hdr:hdr+10]...), two[len(two)-SigSize:]...)
	_, err = v.Verify(swapped, peer)
	assert.ErrorIs(t, err, ErrForged)

	// Rewrite the rights caveat value to all ones.
	widened := bytes.Clone(two)
	copy(widened[hdr+2:hdr+10], bytes.Repeat([]byte{0xff}, 8))
	_, err = v.Verify(widened, peer)
	assert.ErrorIs(t, err, ErrForged)
}

// A holder who bypasses Attenuate and correctly chains a scope caveat that
// points outside the scope in force gets ErrScope, not a wider token.
func TestWideningScopeCaveatRefused(t *testing.T) {
	k, v := newVerifier(t)
	tok := mint(t, k, claim)
	for _, s := range []string{"svc", "svc/ordersx", "other", "svc/orders2/a"} {
		c := RestrictScope(s)
		_, err := Attenuate(tok, c)
		assert.ErrorIs(t, err, ErrScope, s)

		sig := [SigSize]byte(tok[len(tok)-SigSize:])
		raw := c.appendTo(nil)
		sig = mac(sig[:], raw)
		forged := append(append(bytes.Clone(tok[:len(tok)-SigSize]), raw...), sig[:]...)
		_, err = v.Verify(forged, peer)
		assert.ErrorIs(t, err, ErrScope, s)
	}
}

func TestAttenuateLimits(t *testing.T) {
	k, v := newVerifier(t)
	tok := mint(t, k, claim)
	var err error
	for range MaxCaveats {
		tok, err = Attenuate(tok, RestrictRights(RightsAll))
		require.NoError(t, err)
	}
	_, err = Attenuate(tok, RestrictRights(RightsAll))
	assert.ErrorIs(t, err, ErrMalformed)
	_, err = v.Verify(tok, peer)
	assert.NoError(t, err)

	// Size limit: long scopes exhaust MaxTokenSize before MaxCaveats.
	long := "svc/orders"
	c := claim
	c.Scope = ""
	tok = mint(t, k, c)
	scope := ""
	for i := 0; ; i++ {
		next := long
		if scope != "" {
			next = scope + "/" + fmt.Sprintf("%03d", i)
		}
		if len(next) > MaxScopeLen {
			break
		}
		scope = next
	}
	n := 0
	for {
		out, err := Attenuate(tok, RestrictScope(scope))
		if err != nil {
			assert.ErrorIs(t, err, ErrMalformed)
			break
		}
		tok = out
		n++
	}
	assert.LessOrEqual(t, len(tok), MaxTokenSize)
	assert.Less(t, n, MaxCaveats)
	_, err = v.Verify(tok, peer)
	assert.NoError(t, err)

	_, err = Attenuate(tok, Caveat{Kind: 9})
	assert.ErrorIs(t, err, ErrMalformed)
	_, err = Attenuate(tok, RestrictScope(""))
	assert.ErrorIs(t, err, ErrMalformed)
}

func TestKeyRotation(t *testing.T) {
	k, v := newVerifier(t)
	old := mint(t, k, claim)

	id, err := k.Rotate()
	require.NoError(t, err)
	assert.Equal(t, uint32(8), id)
	cur, ok := k.Current()
	require.True(t, ok)
	assert.Equal(t, id, cur)
	fresh := mint(t, k, claim)
	pf, err := Parse(fresh)
	require.NoError(t, err)
	assert.Equal(t, id, pf.KeyID)

	// Both verify while both keys are present.
	_, err = v.Verify(old, peer)
	assert.NoError(t, err)
	_, err = v.Verify(fresh, peer)
	assert.NoError(t, err)

	assert.ErrorIs(t, k.Retire(id), ErrKeyInUse)
	require.NoError(t, k.Retire(7))
	_, err = v.Verify(old, peer)
	assert.ErrorIs(t, err, ErrUnknownKey)
	_, err = v.Verify(fresh, peer)
	assert.NoError(t, err)

	assert.ErrorIs(t, k.Add(8, key1), ErrKeyExists)
	assert.Error(t, k.Add(9, key1[:16]))
	assert.ErrorIs(t, k.Use(99), ErrUnknownKey)
	assert.ErrorIs(t, k.Retire(99), ErrUnknownKey)
}

func TestForgedKey(t *testing.T) {
	_, v := newVerifier(t)
	evil := NewKeyring()
	require.NoError(t, evil.Add(7, key1)) // same id, different key
	_, err := v.Verify(mint(t, evil, claim), peer)
	assert.ErrorIs(t, err, ErrForged)

	_, err = (&Verifier{}).Verify(mint(t, evil, claim), peer)
	assert.ErrorIs(t, err, ErrUnknownKey)

	unknown := NewKeyring()
	require.NoError(t, unknown.Add(1234, key0))
	_, err = v.Verify(mint(t, unknown, claim), peer)
	assert.ErrorIs(t, err, ErrUnknownKey)
}

func TestTimeValidity(t *testing.T) {
	k, v := newVerifier(t)
	tok, err := Attenuate(mint(t, k, claim), RestrictExpiry(t0.Add(10*time.Minute)))
	require.NoError(t, err)
	for _, tc := range []struct {
		at   time.Time
		want error
	}{
		{t0.Add(-time.Nanosecond), ErrNotYetValid},
		{t0, nil},
		{t0.Add(10*time.Minute - 1), nil},
		{t0.Add(10 * time.Minute), ErrExpired}, // the caveat, not the header's hour
		{t0.Add(2 * time.Hour), ErrExpired},
	} {
		v.Clock = fixedClock(tc.at)
		c, err := v.Verify(tok, peer)
		if tc.want == nil {
			require.NoError(t, err, tc.at)
			assert.True(t, c.Expiry.Equal(t0.Add(10*time.Minute)))
			assert.True(t, c.MintedExpiry.Equal(claim.Expiry))
		} else {
			assert.ErrorIs(t, err, tc.want, tc.at)
		}
	}
	// Allows re-checks the clock on every call.
	v.Clock = fixedClock(t0)
	c, err := v.Verify(tok, peer)
	require.NoError(t, err)
	assert.NoError(t, c.Allows(RightRequest, "svc/orders", t0.Add(time.Minute)))
	assert.ErrorIs(t, c.Allows(RightRequest, "svc/orders", t0.Add(11*time.Minute)), ErrExpired)
	assert.ErrorIs(t, c.Allows(RightRequest, "svc/orders", t0.Add(-time.Minute)), ErrNotYetValid)
	// Valid is the same check without a right or scope.
	assert.NoError(t, c.Valid(t0.Add(time.Minute)))
	assert.ErrorIs(t, c.Valid(t0.Add(11*time.Minute)), ErrExpired)
	assert.ErrorIs(t, c.Valid(t0.Add(-time.Minute)), ErrNotYetValid)
}

func TestRevocation(t *testing.T) {
	k, v := newVerifier(t)
	tok := mint(t, k, claim)
	other := claim
	other.ID++
	otherTok := mint(t, k, other)

	c, err := v.Verify(tok, peer)
	require.NoError(t, err)
	oc, err := v.Verify(otherTok, peer)
	require.NoError(t, err)
	now := t0.Add(time.Minute)
	require.NoError(t, c.Allows(RightRequest, "svc/orders", now))

	v.Revoked.Revoke(c.ID, c.MintedExpiry)
	// The cached capability sees it, the other one does not.
	assert.ErrorIs(t, c.Allows(RightRequest, "svc/orders", now), ErrRevoked)
	assert.ErrorIs(t, c.Valid(now), ErrRevoked)
	assert.NoError(t, oc.Valid(now))
	assert.NoError(t, oc.Allows(RightRequest, "svc/orders", now))
	_, err = v.Verify(tok, peer)
	assert.ErrorIs(t, err, ErrRevoked)
	// Attenuated copies share the id.
	att, err := Attenuate(tok, RestrictRights(RightRequest))
	require.NoError(t, err)
	_, err = v.Verify(att, peer)
	assert.ErrorIs(t, err, ErrRevoked)

	assert.Equal(t, 1, v.Revoked.Len())
	assert.Equal(t, 0, v.Revoked.Prune(c.MintedExpiry.Add(-1)))
	assert.Equal(t, 1, v.Revoked.Prune(c.MintedExpiry))
	assert.Equal(t, 0, v.Revoked.Len())
	assert.False(t, v.Revoked.Contains(c.ID))
}

func TestAllows(t *testing.T) {
	k, v := newVerifier(t)
	c, err := v.Verify(mint(t, k, claim), peer)
	require.NoError(t, err)
	now := t0.Add(time.Minute)
	for _, tc := range []struct {
		right Rights
		scope string
		want  error
	}{
		{RightRequest, "svc/orders", nil},
		{RightRequest | RightBulk, "svc/orders/eu/1", nil},
		{RightPublish, "svc/orders", ErrRights},
		{RightRequest | RightAdmin, "svc/orders", ErrRights},
		{0, "svc/orders", ErrRights},
		{RightRequest, "svc", ErrScope},
		{RightRequest, "svc/ordersx", ErrScope},
		{RightRequest, "", ErrScope},
		{RightRequest, "svc/orders/", ErrScope},
		{RightRequest, "svc/orders/../admin", ErrScope},
	} {
		err := c.Allows(tc.right, tc.scope, now)
		if tc.want == nil {
			assert.NoError(t, err, "%v %q", tc.right, tc.scope)
		} else {
			assert.ErrorIs(t, err, tc.want, "%v %q", tc.right, tc.scope)
		}
	}
}

func TestAllowsZeroAllocs(t *testing.T) {
	k, v := newVerifier(t)
	c, err := v.Verify(mint(t, k, claim), peer)
	require.NoError(t, err)
	now := t0.Add(time.Minute)
	assert.Zero(t, testing.AllocsPerRun(1000, func() { _ = c.Allows(RightRequest, "svc/orders/eu", now) }))
	assert.Zero(t, testing.AllocsPerRun(1000, func() { _ = c.Allows(RightAdmin, "svc/orders/eu", now) }))
	assert.Zero(t, testing.AllocsPerRun(1000, func() { _ = c.Allows(RightRequest, "other", now) }))
	v.Revoked.Revoke(1, now) // slow path: generation changed
	assert.Zero(t, testing.AllocsPerRun(1000, func() { _ = c.Allows(RightRequest, "svc/orders/eu", now) }))
}

func TestScopeWithin(t *testing.T) {
	valid := []string{"", "a", "svc/orders", "a-b_c.d:e@f+g/0", "..a", "a.."}
	invalid := []string{"/", "/a", "a/", "a//b", ".", "..", "a/./b", "a/../b", "a b", "é", "a\x00", "a*"}
	for _, s := range valid {
		assert.True(t, ValidScope(s), s)
	}
	for _, s := range invalid {
		assert.False(t, ValidScope(s), s)
	}
	for _, tc := range []struct {
		scope, parent string
		want          bool
	}{
		{"a", "", true},
		{"", "", true},
		{"a/b", "a", true},
		{"a/b/c", "a/b", true},
		{"a", "a", true},
		{"ab", "a", false},
		{"a", "a/b", false},
		{"", "a", false},
		{"b/a", "a", false},
		{"a//b", "a", false},
		{"a/b", "a/", false},
	} {
		assert.Equal(t, tc.want, Within(tc.scope, tc.parent), "%q in %q", tc.scope, tc.parent)
	}
}

func TestParseRejects(t *testing.T) {
	k, _ := newVerifier(t)
	good := attenuated(t, k)
	hdr := HeaderSize + len(claim.Scope)
	for name, mut := range map[string]func([]byte) []byte{
		"version":         func(b []byte) []byte { b[0] = 2; return b },
		"reserved":        func(b []byte) []byte { b[3] = 1; return b },
		"id zero":         func(b []byte) []byte { clear(b[offID : offID+8]); return b },
		"scope past sig":  func(b []byte) []byte { b[1] = 255; return b },
		"bad scope byte":  func(b []byte) []byte { b[HeaderSize] = '/'; return b },
		"unknown caveat":  func(b []byte) []byte { b[hdr] = 9; return b },
		"caveat len 7":    func(b []byte) []byte { b[hdr+1] = 7; return b },
		"caveat past sig": func(b []byte) []byte { b[hdr+1] = 200; return b },
		"nb after expiry": func(b []byte) []byte { b[offNotBefore+7] = 0x7f; return b },
		"half caveat":     func(b []byte) []byte { return append(b[:len(b)-SigSize], append([]byte{1}, b[len(b)-SigSize:]...)...) },
		"too big":         func(b []byte) []byte { return append(b, make([]byte, MaxTokenSize)...) },
		"empty scope cav": func(b []byte) []byte {
			return append(b[:len(b)-SigSize], append([]byte{3, 0}, b[len(b)-SigSize:]...)...)
		},
		"dotdot scope cav": func(b []byte) []byte {
			return append(b[:len(b)-SigSize], append([]byte{3, 2, '.', '.'}, b[len(b)-SigSize:]...)...)
		},
	} {
		_, err := Parse(mut(bytes.Clone(good)))
		assert.ErrorIs(t, err, ErrMalformed, name)
	}
	// More than MaxCaveats, even if every one is well formed.
	b := bytes.Clone(good[:len(good)-SigSize])
	for range MaxCaveats {
		b = RestrictRights(RightsAll).appendTo(b)
	}
	_, err := Parse(append(b, make([]byte, SigSize)...))
	assert.ErrorIs(t, err, ErrMalformed)
}

// Property: whatever chain of caveats a holder appends, the verified
// capability never has a right, scope or expiry the previous token did not.
func TestAttenuationNeverWidens(t *testing.T) {
	k, v := newVerifier(t)
	rnd := rand.New(rand.NewPCG(1, 2))
	segs := []string{"a", "b", "svc", "x.y"}
	randScope := func(depth int) string {
		s := ""
		for i := range depth {
			if i > 0 {
				s += "/"
			}
			s += segs[rnd.IntN(len(segs))]
		}
		return s
	}
	iterations := 3000
	if testing.Short() {
		iterations = 300
	}
	for it := range iterations {
		c := claim
		c.ID = uint64(it + 1)
		c.Rights = Rights(rnd.Uint64())
		c.Scope = randScope(rnd.IntN(3))
		c.Expiry = t0.Add(time.Duration(1+rnd.IntN(3600)) * time.Second)
		tok := mint(t, k, c)
		v.Clock = fixedClock(t0)
		prev, err := v.Verify(tok, peer)
		require.NoError(t, err)
		wantRights, wantScope, wantExpiry := c.Rights, c.Scope, c.Expiry

		for range 1 + rnd.IntN(MaxCaveats) {
			var cav Caveat
			switch rnd.IntN(3) {
			case 0:
				cav = RestrictRights(Rights(rnd.Uint64()))
			case 1:
				cav = RestrictExpiry(t0.Add(time.Duration(1+rnd.IntN(7200)) * time.Second))
			default:
				if rnd.IntN(2) == 0 && prev.Scope != "" {
					cav = RestrictScope(prev.Scope + "/" + randScope(1+rnd.IntN(2)))
				} else {
					cav = RestrictScope(randScope(1 + rnd.IntN(3))) // often not within
				}
			}
			next, err := Attenuate(tok, cav)
			if err != nil {
				require.ErrorIs(t, err, ErrAuth)
				continue
			}
			got, err := v.Verify(next, peer)
			require.NoError(t, err)

			switch cav.Kind {
			case CaveatRights:
				wantRights &= cav.Rights
			case CaveatExpiry:
				if e := time.Unix(0, cav.Expiry); e.Before(wantExpiry) {
					wantExpiry = e
				}
			case CaveatScope:
				wantScope = cav.Scope
			}
			assert.Zero(t, got.Rights&^prev.Rights, "rights widened")
			assert.True(t, Within(got.Scope, prev.Scope), "scope %q not within %q", got.Scope, prev.Scope)
			assert.False(t, got.Expiry.After(prev.Expiry), "expiry extended")
			assert.Equal(t, wantRights, got.Rights)
			assert.Equal(t, wantScope, got.Scope)
			assert.True(t, wantExpiry.Equal(got.Expiry))
			assert.Equal(t, prev.ID, got.ID)
			tok, prev = next, got
		}
	}
}

func TestRefreshAt(t *testing.T) {
	rnd := rand.New(rand.NewPCG(3, 4))
	life := time.Hour
	lo, hi := t0.Add(life*70/100), t0.Add(life*80/100)
	var below, above int
	for range 10000 {
		at := RefreshAt(t0, t0.Add(life), rnd)
		require.False(t, at.Before(lo), at)
		require.True(t, at.Before(hi) || at.Equal(hi), at)
		if at.Before(t0.Add(life * 75 / 100)) {
			below++
		} else {
			above++
		}
	}
	// Jitter goes both ways, roughly evenly.
	assert.InDelta(t, 5000, below, 500)
	assert.InDelta(t, 5000, above, 500)
	assert.Equal(t, t0, RefreshAt(t0, t0, nil))
	assert.Equal(t, t0, RefreshAt(t0, t0.Add(-time.Second), nil))
	at := RefreshAt(t0, t0.Add(life), nil)
	assert.True(t, !at.Before(lo) && !at.After(hi))
}

func TestRightsString(t *testing.T) {
	assert.Equal(t, "none", Rights(0).String())
	assert.Equal(t, "request|bulk", (RightRequest | RightBulk).String())
	assert.Equal(t, "admin|0x100", (RightAdmin | 1<<8).String())
}

func TestKeyringConcurrentUse(t *testing.T) {
	k, v := newVerifier(t)
	tok := mint(t, k, claim)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for range 50 {
			if _, err := k.Rotate(); !assert.NoError(t, err) {
				return
			}
			_, err := k.Mint(claim)
			assert.NoError(t, err)
		}
	}()
	for range 200 {
		_, err := v.Verify(tok, peer)
		require.NoError(t, err)
	}
	<-done
}

func FuzzTokenParse(f *testing.F) {
	k, v := newVerifier(f)
	base := mint(f, k, claim)
	f.Add(base)
	f.Add(attenuated(f, k))
	c := claim
	c.Scope = ""
	f.Add(mint(f, k, c))
	f.Add([]byte{})
	f.Add(make([]byte, MinTokenSize))
	f.Fuzz(func(t *testing.T, b []byte) {
		tok, err := Parse(b)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("Parse error %v does not match ErrMalformed", err)
			}
			return
		}
		out, err := tok.MarshalBinary()
		if err != nil {
			t.Fatalf("accepted token does not re-encode: %v", err)
		}
		if !bytes.Equal(out, b) {
			t.Fatalf("re-encoding differs:\n in %x\nout %x", b, out)
		}
		if _, err := v.Verify(b, peer); err != nil && !errors.Is(err, ErrAuth) {
			t.Fatalf("Verify error %v does not match ErrAuth", err)
		}
		_, _ = Attenuate(b, RestrictRights(RightRequest))
	})
}

func BenchmarkMint(b *testing.B) {
	k, _ := newVerifier(b)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := k.Mint(claim); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkVerify(b *testing.B) {
	k, v := newVerifier(b)
	for _, bc := range []struct {
		name string
		tok  []byte
	}{{"0caveats", mint(b, k, claim)}, {"3caveats", attenuated(b, k)}} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(bc.tok)))
			for b.Loop() {
				if _, err := v.Verify(bc.tok, peer); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkAllows(b *testing.B) {
	k, v := newVerifier(b)
	c, err := v.Verify(mint(b, k, claim), peer)
	require.NoError(b, err)
	now := t0.Add(time.Minute)
	b.ReportAllocs()
	for b.Loop() {
		if err := c.Allows(RightRequest, "svc/orders/eu", now); err != nil {
			b.Fatal(err)
		}
	}
}
