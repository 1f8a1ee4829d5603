package token

import (
	"encoding/binary"
	"fmt"
	"strings"
	"time"
)

// Format constants. See the package documentation for the layout.
const (
	Version      = 1
	HeaderSize   = 84 // fixed part of the header; the scope follows it
	SigSize      = 32
	MaxCaveats   = 16
	MaxTokenSize = 2048 // header, caveats and signature together
	MinTokenSize = HeaderSize + SigSize
)

// Header field offsets.
const (
	offVersion   = 0
	offScopeLen  = 1
	offReserved  = 2
	offKeyID     = 4
	offID        = 8
	offUID       = 16
	offGID       = 20
	offPID       = 24
	offExe       = 28
	offRights    = 60
	offNotBefore = 68
	offExpiry    = 76
)

// Rights is a bitmask of operations a token grants.
type Rights uint64

// Rights. A caveat can only clear bits.
const (
	RightRequest   Rights = 1 << iota // send requests and receive replies
	RightSubscribe                    // receive events
	RightPublish                      // emit events
	RightBulk                         // bulk regions (large shared buffers)
	RightAdmin                        // administrative operations

	RightEvent = RightPublish
	RightsAll  = RightRequest | RightSubscribe | RightPublish | RightBulk | RightAdmin
)

var rightNames = [...]string{"request", "subscribe", "publish", "bulk", "admin"}

func (r Rights) String() string {
	if r == 0 {
		return "none"
	}
	var parts []string
	for i, name := range rightNames {
		if r&(1<<i) != 0 {
			parts = append(parts, name)
		}
	}
	if rest := r &^ RightsAll; rest != 0 {
		parts = append(parts, fmt.Sprintf("%#x", uint64(rest)))
	}
	return strings.Join(parts, "|")
}

// Subject is the attested peer a token is bound to.
type Subject struct {
	UID, GID  uint32
	PID       uint32   // 0: any process with this UID and GID
	ExeSHA256 [32]byte // all zero: any executable
}

// Matches reports whether the attested peer satisfies the token subject s:
// same uid and gid, same pid unless s.PID is 0, same executable digest unless
// s.ExeSHA256 is all zero.
func (s Subject) Matches(peer Subject) bool {
	if s.UID != peer.UID || s.GID != peer.GID {
		return false
	}
	if s.PID != 0 && s.PID != peer.PID {
		return false
	}
	return s.ExeSHA256 == [32]byte{} || s.ExeSHA256 == peer.ExeSHA256
}

// CaveatKind identifies a caveat on the wire.
type CaveatKind uint8

// Caveat kinds.
const (
	CaveatRights CaveatKind = 1 // AND the rights
	CaveatExpiry CaveatKind = 2 // the earlier expiry wins
	CaveatScope  CaveatKind = 3 // move into a sub-scope
)

// Caveat is one restriction appended to a token. Only the field for Kind is
// used.
type Caveat struct {
	Kind   CaveatKind
	Rights Rights // CaveatRights
	Expiry int64  // CaveatExpiry, unix nanoseconds
	Scope  string // CaveatScope
}

// RestrictRights keeps only the rights in r.
func RestrictRights(r Rights) Caveat { return Caveat{Kind: CaveatRights, Rights: r} }

// RestrictExpiry ends validity at t at the latest.
func RestrictExpiry(t time.Time) Caveat { return Caveat{Kind: CaveatExpiry, Expiry: t.UnixNano()} }

// RestrictScope confines the token to scope s, which must be Within the
// scope in force.
func RestrictScope(s string) Caveat { return Caveat{Kind: CaveatScope, Scope: s} }

func (c Caveat) valueLen() int {
	if c.Kind == CaveatScope {
		return len(c.Scope)
	}
	return 8
}

// encodedLen is the caveat's size on the wire, including kind and length.
func (c Caveat) encodedLen() int { return 2 + c.valueLen() }

func (c Caveat) validate() error {
	switch c.Kind {
	case CaveatRights, CaveatExpiry:
		return nil
	case CaveatScope:
		if c.Scope == "" || !ValidScope(c.Scope) {
			return fmt.Errorf("%w: invalid scope caveat %q", ErrMalformed, c.Scope)
		}
		return nil
	}
	return fmt.Errorf("%w: unknown caveat kind %d", ErrMalformed, c.Kind)
}

func (c Caveat) appendTo(b []byte) []byte {
	b = append(b, byte(c.Kind), byte(c.valueLen()))
	switch c.Kind {
	case CaveatRights:
		b = binary.LittleEndian.AppendUint64(b, uint64(c.Rights))
	case CaveatExpiry:
		b = binary.LittleEndian.AppendUint64(b, uint64(c.Expiry))
	case CaveatScope:
		b = append(b, c.Scope...)
	}
	return b
}

// Token is the decoded form of a token. A Token from Parse is NOT verified:
// no field may be trusted until Verifier.Verify accepts the bytes.
type Token struct {
	KeyID     uint32
	ID        uint64
	Subject   Subject
	Rights    Rights
	Scope     string
	NotBefore int64 // unix nanoseconds, inclusive
	Expiry    int64 // unix nanoseconds, exclusive
	Caveats   []Caveat
	Sig       [SigSize]byte
}

func (t *Token) headerLen() int { return HeaderSize + len(t.Scope) }

// Len is the encoded size of t.
func (t *Token) Len() int {
	n := t.headerLen() + SigSize
	for _, c := range t.Caveats {
		n += c.encodedLen()
	}
	return n
}

func (t *Token) validate() error {
	switch {
	case t.ID == 0:
		return fmt.Errorf("%w: token id 0 is reserved", ErrMalformed)
	case !ValidScope(t.Scope):
		return fmt.Errorf("%w: invalid scope %q", ErrMalformed, t.Scope)
	case t.NotBefore >= t.Expiry:
		return fmt.Errorf("%w: not-before %d is not before expiry %d", ErrMalformed, t.NotBefore, t.Expiry)
	case len(t.Caveats) > MaxCaveats:
		return fmt.Errorf("%w: %d caveats, at most %d", ErrMalformed, len(t.Caveats), MaxCaveats)
	}
	for _, c := range t.Caveats {
		if err := c.validate(); err != nil {
			return err
		}
	}
	if n := t.Len(); n > MaxTokenSize {
		return fmt.Errorf("%w: %d bytes, at most %d", ErrMalformed, n, MaxTokenSize)
	}
	return nil
}

func (t *Token) appendHeader(b []byte) []byte {
	le := binary.LittleEndian
	b = append(b, Version, byte(len(t.Scope)), 0, 0)
	b = le.AppendUint32(b, t.KeyID)
	b = le.AppendUint64(b, t.ID)
	b = le.AppendUint32(b, t.Subject.UID)
	b = le.AppendUint32(b, t.Subject.GID)
	b = le.AppendUint32(b, t.Subject.PID)
	b = append(b, t.Subject.ExeSHA256[:]...)
	b = le.AppendUint64(b, uint64(t.Rights))
	b = le.AppendUint64(b, uint64(t.NotBefore))
	b = le.AppendUint64(b, uint64(t.Expiry))
	return append(b, t.Scope...)
}

// AppendBinary appends the encoding of t, signature included, to b.
func (t *Token) AppendBinary(b []byte) ([]byte, error) {
	if err := t.validate(); err != nil {
		return b, err
	}
	b = t.appendHeader(b)
	for _, c := range t.Caveats {
		b = c.appendTo(b)
	}
	return append(b, t.Sig[:]...), nil
}

// MarshalBinary returns the encoding of t.
func (t *Token) MarshalBinary() ([]byte, error) {
	return t.AppendBinary(make([]byte, 0, t.Len()))
}

// Parse decodes b with strict bounds and checks its structure only. It does
// NOT check the signature; use Verifier.Verify for anything that matters.
// Every accepted input re-encodes (MarshalBinary) to exactly b.
func Parse(b []byte) (*Token, error) {
	if len(b) > MaxTokenSize {
		return nil, fmt.Errorf("%w: %d bytes, at most %d", ErrMalformed, len(b), MaxTokenSize)
	}
	if len(b) < MinTokenSize {
		return nil, fmt.Errorf("%w: %d bytes, at least %d", ErrMalformed, len(b), MinTokenSize)
	}
	if b[offVersion] != Version {
		return nil, fmt.Errorf("%w: version %d", ErrMalformed, b[offVersion])
	}
	if b[offReserved] != 0 || b[offReserved+1] != 0 {
		return nil, fmt.Errorf("%w: reserved bytes set", ErrMalformed)
	}
	hdrEnd := HeaderSize + int(b[offScopeLen])
	sigOff := len(b) - SigSize
	if hdrEnd > sigOff {
		return nil, fmt.Errorf("%w: scope runs past the signature", ErrMalformed)
	}
	le := binary.LittleEndian
	t := &Token{
		KeyID: le.Uint32(b[offKeyID:]),
		ID:    le.Uint64(b[offID:]),
		Subject: Subject{
			UID: le.Uint32(b[offUID:]),
			GID: le.Uint32(b[offGID:]),
			PID: le.Uint32(b[offPID:]),
		},
		Rights:    Rights(le.Uint64(b[offRights:])),
		NotBefore: int64(le.Uint64(b[offNotBefore:])),
		Expiry:    int64(le.Uint64(b[offExpiry:])),
		Scope:     string(b[HeaderSize:hdrEnd]),
	}
	copy(t.Subject.ExeSHA256[:], b[offExe:offExe+32])
	copy(t.Sig[:], b[sigOff:])

	for off := hdrEnd; off < sigOff; {
		if len(t.Caveats) == MaxCaveats {
			return nil, fmt.Errorf("%w: more than %d caveats", ErrMalformed, MaxCaveats)
		}
		if sigOff-off < 2 {
			return nil, fmt.Errorf("%w: truncated caveat at %d", ErrMalformed, off)
		}
		kind, n := CaveatKind(b[off]), int(b[off+1])
		val := off + 2
		if n > sigOff-val {
			return nil, fmt.Errorf("%w: caveat at %d runs past the signature", ErrMalformed, off)
		}
		c := Caveat{Kind: kind}
		switch kind {
		case CaveatRights, CaveatExpiry:
			if n != 8 {
				return nil, fmt.Errorf("%w: caveat kind %d has length %d, want 8", ErrMalformed, kind, n)
			}
			v := le.Uint64(b[val:])
			if kind == CaveatRights {
				c.Rights = Rights(v)
			} else {
				c.Expiry = int64(v)
			}
		case CaveatScope:
			c.Scope = string(b[val : val+n])
		}
		if err := c.validate(); err != nil {
			return nil, err
		}
		t.Caveats = append(t.Caveats, c)
		off = val + n
	}
	if err := t.validate(); err != nil {
		return nil, err
	}
	return t, nil
}

// effective folds the caveats into the rights, scope and expiry in force.
// A scope caveat outside the scope in force fails with ErrScope rather than
// narrowing to nothing, so a confused holder learns about it.
func (t *Token) effective() (Rights, string, int64, error) {
	rights, scope, expiry := t.Rights, t.Scope, t.Expiry
	for _, c := range t.Caveats {
		switch c.Kind {
		case CaveatRights:
			rights &= c.Rights
		case CaveatExpiry:
			expiry = min(expiry, c.Expiry)
		case CaveatScope:
			if !Within(c.Scope, scope) {
				return 0, "", 0, ErrScope
			}
			scope = c.Scope
		}
	}
	return rights, scope, expiry, nil
}
