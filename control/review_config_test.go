package control

import (
	"context"
	"math"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/futex"
	"github.com/sypas/go/ring"
)

// An invalid ring idle policy is refused up front with the field named.
// It used to be accepted: every kernel handshake then failed with
// E_INTERNAL after creating both rings, and every Dial with E_PROTO, which
// the daemon sent to the kernel and recorded as a bad memfd, blaming a
// kernel that had done nothing wrong.
func TestRingConfigValidated(t *testing.T) {
	bad := SessionConfig{Ring: ring.Config{Idle: futex.Config{Policy: futex.Policy(42)}}}
	_, err := Dial(context.Background(), "/nonexistent", DialConfig{SessionConfig: bad})
	require.ErrorIs(t, err, ErrConfig)
	assert.Contains(t, err.Error(), "DialConfig.Ring.Idle ")
	_, err = NewServer(listenFor(t, sockPath(t), nil), ServerConfig{Keys: testKeys(t), SessionConfig: bad})
	require.ErrorIs(t, err, ErrConfig)
	assert.Contains(t, err.Error(), "ServerConfig.Ring.Idle ")
}

// A Backoff whose delays can be zero or negative is refused: a jitter of 1
// or more (the factor 1 ± Jitter reaches 0), or a NaN multiplier (the delay
// becomes a huge negative duration). Both were accepted, and the Client
// then redialed a failing kernel in a tight loop.
func TestBackoffValidated(t *testing.T) {
	for _, tc := range []struct {
		b     Backoff
		field string
	}{
		{Backoff{Jitter: 3}, "DialConfig.Backoff.Jitter"},
		{Backoff{Jitter: 1}, "DialConfig.Backoff.Jitter"},
		{Backoff{Jitter: math.NaN()}, "DialConfig.Backoff.Jitter"},
		{Backoff{Multiplier: math.NaN()}, "DialConfig.Backoff.Multiplier"},
	} {
		_, err := Dial(context.Background(), "/nonexistent", DialConfig{Backoff: tc.b})
		require.ErrorIs(t, err, ErrConfig, "%+v", tc.b)
		assert.Contains(t, err.Error(), tc.field+" ")
	}
	for _, b := range []Backoff{{}, {Jitter: -1}, {Jitter: 0.99}, {Multiplier: 0.5}} {
		require.NoError(t, DialConfig{Backoff: b}.check(), "%+v", b)
	}
}

// An invalid MaxRingSize is reported as MaxRingSize. NewServer derives the
// default ring sizes from it before validating, and used to report the
// derived TxRingSize, a field the caller never set.
func TestInvalidMaxRingSizeNamed(t *testing.T) {
	l := listenFor(t, sockPath(t), nil)
	for _, max := range []uint32{1000, 5000, 3 << 20} {
		_, err := NewServer(l, ServerConfig{Keys: testKeys(t), SessionConfig: SessionConfig{MaxRingSize: max}})
		require.ErrorIs(t, err, ErrConfig)
		assert.Contains(t, err.Error(), "ServerConfig.MaxRingSize ", "MaxRingSize %d", max)
	}
}
