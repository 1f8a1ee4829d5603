package sypas

import (
	"context"
	"time"

	"github.com/sypas/go/control/token"
	"github.com/sypas/go/wire"
)

// TokenInfo describes the token of a Client's current session, without
// its bytes. The daemon holds no key, so it reads the token unverified:
// these fields are what the kernel says it granted (the kernel checks the
// token itself on every frame), fit for display and for planning, not for
// a security decision.
type TokenInfo struct {
	// ID is the token id that every frame's cap_ref carries.
	ID uint64
	// Subject is the identity the kernel attested (uid, gid, pid,
	// executable digest) and bound the token to.
	Subject token.Subject
	// Rights, Scope and Expiry are in force after the token's caveats.
	Rights Rights
	Scope  string
	Expiry time.Time
	// Issued is when this side received the token (TOKEN or a refresh).
	Issued time.Time
}

// Token describes the current session's token. With no session (before
// the first one, or while reconnecting) it fails with an error matching
// ErrUnavailable.
func (c *Client) Token() (TokenInfo, error) {
	cc, err := c.conn(context.Background(), false)
	if err != nil {
		return TokenInfo{}, err
	}
	tok := cc.sess.Token()
	return describeToken(tok.Bytes, tok.Issued)
}

// describeToken reads b without verifying it, folding its caveats in.
func describeToken(b []byte, issued time.Time) (TokenInfo, error) {
	t, err := token.Parse(b)
	if err != nil {
		return TokenInfo{}, &Error{Code: CodeAuth, Message: "the session's token", Err: err}
	}
	info := TokenInfo{ID: t.ID, Subject: t.Subject, Rights: t.Rights, Scope: t.Scope, Issued: issued}
	expiry := t.Expiry
	for _, cv := range t.Caveats { // each caveat only narrows
		switch cv.Kind {
		case token.CaveatRights:
			info.Rights &= cv.Rights
		case token.CaveatExpiry:
			expiry = min(expiry, cv.Expiry)
		case token.CaveatScope:
			info.Scope = cv.Scope
		}
	}
	info.Expiry = time.Unix(0, expiry)
	return info, nil
}

// Params returns what the kernel granted the current session in WELCOME:
// its limits (MaxPayload, MaxInFlight), ring sizes, heartbeats and
// features. With no session it fails with an error matching
// ErrUnavailable.
func (c *Client) Params() (wire.Welcome, error) {
	cc, err := c.conn(context.Background(), false)
	if err != nil {
		return wire.Welcome{}, err
	}
	return cc.sess.Params(), nil
}
