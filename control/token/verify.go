package token

import (
	"crypto/hmac"
	"fmt"
	"time"
)

// Verifier checks tokens presented by peers.
type Verifier struct {
	Keys    *Keyring
	Revoked *Revocations     // nil: nothing is revoked
	Clock   func() time.Time // nil: time.Now
}

// Capability is what a verified token grants, after its caveats. The kernel
// caches it per session keyed by ID and calls Allows on every operation.
// Treat the fields as read-only.
type Capability struct {
	ID        uint64
	KeyID     uint32
	Subject   Subject
	Rights    Rights
	Scope     string
	NotBefore time.Time
	Expiry    time.Time // effective: the earliest of the header and the caveats
	// MintedExpiry is the expiry in the header. Revoke a token until this time:
	// copies of the same token with fewer caveats live that long.
	MintedExpiry time.Time

	rev    *Revocations
	revGen uint64 // rev's generation when verified
}

// Verify authenticates tok and binds it to peer, the identity attested on
// this session. Nothing in tok is trusted before the signature chain has been
// recomputed and compared in constant time. Every error matches ErrAuth.
func (v *Verifier) Verify(tok []byte, peer Subject) (*Capability, error) {
	t, err := Parse(tok)
	if err != nil {
		return nil, err
	}
	hdrEnd := t.headerLen()
	if v.Keys == nil {
		return nil, fmt.Errorf("%w: verifier has no keyring", ErrUnknownKey)
	}
	sig, ok := v.Keys.sig0(t.KeyID, tok[:hdrEnd])
	if !ok {
		return nil, fmt.Errorf("%w: %d", ErrUnknownKey, t.KeyID)
	}
	off := hdrEnd
	for _, c := range t.Caveats {
		end := off + c.encodedLen()
		sig = mac(sig[:], tok[off:end])
		off = end
	}
	if !hmac.Equal(sig[:], t.Sig[:]) {
		return nil, ErrForged
	}
	// From here on the fields are authentic.
	rights, scope, expiry, err := t.effective()
	if err != nil {
		return nil, err
	}
	c := &Capability{
		ID:           t.ID,
		KeyID:        t.KeyID,
		Subject:      t.Subject,
		Rights:       rights,
		Scope:        scope,
		NotBefore:    time.Unix(0, t.NotBefore),
		Expiry:       time.Unix(0, expiry),
		MintedExpiry: time.Unix(0, t.Expiry),
		rev:          v.Revoked,
	}
	if !t.Subject.Matches(peer) {
		return nil, ErrSubject
	}
	if c.rev != nil {
		c.revGen = c.rev.generation()
		if c.rev.Contains(c.ID) {
			return nil, ErrRevoked
		}
	}
	now := time.Now()
	if v.Clock != nil {
		now = v.Clock()
	}
	if err := c.checkTime(now); err != nil {
		return nil, err
	}
	return c, nil
}

func (c *Capability) checkTime(now time.Time) error {
	if now.Before(c.NotBefore) {
		return ErrNotYetValid
	}
	if !now.Before(c.Expiry) {
		return ErrExpired
	}
	return nil
}

// Valid reports whether the capability is still in force at now: not
// revoked since Verify, and within [NotBefore, Expiry). It returns
// ErrRevoked, ErrNotYetValid or ErrExpired, and does not allocate. Allows
// includes it; a kernel calls it alone before renewing a token.
func (c *Capability) Valid(now time.Time) error {
	if c.rev != nil && c.rev.generation() != c.revGen && c.rev.Contains(c.ID) {
		return ErrRevoked
	}
	return c.checkTime(now)
}

// Allows reports whether the capability permits an operation needing right
// (one or more bits, all required) on scope at time now. It does not allocate
// and returns the bare sentinels. A revocation made after Verify takes effect
// here: one atomic load while nothing has been revoked since, a map lookup
// under a read lock otherwise.
func (c *Capability) Allows(right Rights, scope string, now time.Time) error {
	if err := c.Valid(now); err != nil {
		return err
	}
	if right == 0 || c.Rights&right != right {
		return ErrRights
	}
	if !within(scope, c.Scope) {
		return ErrScope
	}
	return nil
}
