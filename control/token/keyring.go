package token

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"time"
)

// MinKeySize is the shortest HMAC key a Keyring accepts.
const MinKeySize = 32

// Keyring errors. They are configuration errors, not ErrAuth.
var (
	ErrNoCurrentKey = errors.New("token: keyring has no current key")
	ErrKeyExists    = errors.New("token: key id already in the keyring")
	ErrKeyInUse     = errors.New("token: cannot retire the current key")
)

// Keyring holds the HMAC keys by key id: one current key mints, every key
// present verifies. Rotation is Add (or Rotate) then, once every token
// minted under the old key has expired, Retire. Safe for concurrent use.
type Keyring struct {
	mu         sync.RWMutex
	keys       map[uint32][]byte
	current    uint32
	hasCurrent bool
}

// NewKeyring returns an empty keyring.
func NewKeyring() *Keyring { return &Keyring{keys: make(map[uint32][]byte)} }

// Add stores a copy of key under id. The first key added becomes current.
func (k *Keyring) Add(id uint32, key []byte) error {
	if len(key) < MinKeySize {
		return fmt.Errorf("token: key is %d bytes, at least %d", len(key), MinKeySize)
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if _, ok := k.keys[id]; ok {
		return fmt.Errorf("%w: %d", ErrKeyExists, id)
	}
	k.keys[id] = append([]byte(nil), key...)
	if !k.hasCurrent {
		k.current, k.hasCurrent = id, true
	}
	return nil
}

// Rotate adds a fresh random key under the next unused id (one more than the
// highest present) and makes it current. Older keys keep verifying.
func (k *Keyring) Rotate() (uint32, error) {
	key := make([]byte, MinKeySize)
	rand.Read(key) // crypto/rand.Read never fails (Go 1.24+)
	k.mu.Lock()
	defer k.mu.Unlock()
	var id uint32
	for have := range k.keys {
		id = max(id, have+1)
	}
	if _, ok := k.keys[id]; ok {
		return 0, fmt.Errorf("%w: key ids exhausted", ErrKeyExists)
	}
	k.keys[id] = key
	k.current, k.hasCurrent = id, true
	return id, nil
}

// Use makes the key id current for minting.
func (k *Keyring) Use(id uint32) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if _, ok := k.keys[id]; !ok {
		return fmt.Errorf("%w: %d", ErrUnknownKey, id)
	}
	k.current, k.hasCurrent = id, true
	return nil
}

// Retire removes key id and wipes it; tokens minted under it stop verifying.
// The current key cannot be retired.
func (k *Keyring) Retire(id uint32) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	key, ok := k.keys[id]
	if !ok {
		return fmt.Errorf("%w: %d", ErrUnknownKey, id)
	}
	if k.hasCurrent && k.current == id {
		return fmt.Errorf("%w: %d", ErrKeyInUse, id)
	}
	clear(key)
	delete(k.keys, id)
	return nil
}

// Current returns the id of the minting key.
func (k *Keyring) Current() (uint32, bool) {
	k.mu.RLock()
	defer k.mu.RUnlock()
	return k.current, k.hasCurrent
}

// sig0 computes HMAC(key[id], header) under the read lock, so a concurrent
// Retire cannot wipe the key mid-use.
func (k *Keyring) sig0(id uint32, header []byte) ([SigSize]byte, bool) {
	k.mu.RLock()
	defer k.mu.RUnlock()
	key, ok := k.keys[id]
	if !ok {
		return [SigSize]byte{}, false
	}
	return mac(key, header), true
}

func mac(key, msg []byte) (sum [SigSize]byte) {
	h := hmac.New(sha256.New, key)
	h.Write(msg)
	h.Sum(sum[:0])
	return sum
}

// Claims is what the kernel grants when minting.
type Claims struct {
	ID        uint64 // 0: a fresh random id
	Subject   Subject
	Rights    Rights
	Scope     string
	NotBefore time.Time // zero: valid immediately
	Expiry    time.Time // required
}

// Mint signs claims with the current key.
func (k *Keyring) Mint(c Claims) ([]byte, error) {
	if c.Expiry.IsZero() {
		return nil, errors.New("token: claims need an expiry")
	}
	for _, tm := range []time.Time{c.NotBefore, c.Expiry} {
		if !tm.IsZero() && !time.Unix(0, tm.UnixNano()).Equal(tm) {
			return nil, fmt.Errorf("token: time %v outside the int64 nanosecond range", tm)
		}
	}
	t := &Token{
		ID:      c.ID,
		Subject: c.Subject,
		Rights:  c.Rights,
		Scope:   c.Scope,
		Expiry:  c.Expiry.UnixNano(),
	}
	if !c.NotBefore.IsZero() {
		t.NotBefore = c.NotBefore.UnixNano()
	}
	for t.ID == 0 {
		var b [8]byte
		rand.Read(b[:])
		t.ID = binary.LittleEndian.Uint64(b[:])
	}
	id, ok := k.Current()
	if !ok {
		return nil, ErrNoCurrentKey
	}
	t.KeyID = id
	if err := t.validate(); err != nil {
		return nil, err
	}
	out := t.appendHeader(make([]byte, 0, t.Len()))
	sig, ok := k.sig0(id, out)
	if !ok { // retired between Current and here
		return nil, ErrNoCurrentKey
	}
	return append(out, sig[:]...), nil
}

// Attenuate appends caveats to a token the caller holds; no key is needed.
// The result can only do less than tok. A scope caveat must lie within the
// scope in force (ErrScope otherwise); the limits MaxCaveats and MaxTokenSize
// apply. tok is not modified.
func Attenuate(tok []byte, caveats ...Caveat) ([]byte, error) {
	t, err := Parse(tok)
	if err != nil {
		return nil, err
	}
	t.Caveats = append(t.Caveats, caveats...)
	if err := t.validate(); err != nil {
		return nil, err
	}
	if _, _, _, err := t.effective(); err != nil {
		return nil, err
	}
	sig := t.Sig
	out := make([]byte, 0, t.Len())
	out = append(out, tok[:len(tok)-SigSize]...)
	for _, c := range caveats {
		start := len(out)
		out = c.appendTo(out)
		sig = mac(sig[:], out[start:])
	}
	return append(out, sig[:]...), nil
}
