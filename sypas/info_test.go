package sypas

import (
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/control"
	"github.com/sypas/go/control/token"
)

func TestClientTokenAndParams(t *testing.T) {
	k := startKernel(t, ServerConfig{}, nil)
	c := dialT(t, k.path, ClientConfig{})
	tok, err := c.Token()
	require.NoError(t, err)
	assert.NotZero(t, tok.ID)
	assert.Equal(t, RightRequest|RightSubscribe|RightPublish|RightBulk, tok.Rights, "the control plane's default rights")
	if isTCP(k.path) {
		assert.EqualValues(t, control.NoUID, tok.Subject.UID, "bound to the certificate, no uid")
		assert.Zero(t, tok.Subject.PID)
	} else {
		assert.Equal(t, uint32(os.Getpid()), tok.Subject.PID, "bound to this process as attested")
		assert.Equal(t, uint32(os.Geteuid()), tok.Subject.UID)
	}
	assert.WithinDuration(t, time.Now().Add(control.DefaultTokenTTL), tok.Expiry, time.Minute)
	assert.False(t, tok.Issued.IsZero())
	p, err := c.Params()
	require.NoError(t, err)
	assert.Equal(t, uint32(control.DefaultMaxInFlight), p.MaxInFlight)
	assert.NotZero(t, p.SessionID)

	require.NoError(t, c.Close())
	_, err = c.Token()
	assert.ErrorIs(t, err, ErrClosed)
	_, err = c.Params()
	assert.ErrorIs(t, err, ErrClosed)
}

func TestDescribeTokenFoldsCaveats(t *testing.T) {
	k := testKeys(t)
	exp := time.Now().Add(time.Hour).Truncate(time.Second)
	b, err := k.Mint(token.Claims{ID: 42, Subject: token.Subject{UID: 7, PID: 9}, Rights: RightRequest | RightAdmin, Scope: "svc", Expiry: exp})
	require.NoError(t, err)
	b, err = token.Attenuate(b, token.RestrictRights(RightRequest), token.RestrictExpiry(exp.Add(-time.Minute)), token.RestrictScope("svc/a"))
	require.NoError(t, err)
	info, err := describeToken(b, time.Unix(1, 0))
	require.NoError(t, err)
	assert.Equal(t, uint64(42), info.ID)
	assert.Equal(t, token.Subject{UID: 7, PID: 9}, info.Subject)
	assert.Equal(t, RightRequest, info.Rights)
	assert.Equal(t, "svc/a", info.Scope)
	assert.True(t, info.Expiry.Equal(exp.Add(-time.Minute)), "expiry %v", info.Expiry)
	assert.Equal(t, time.Unix(1, 0), info.Issued)

	_, err = describeToken(b[:10], time.Time{})
	assert.ErrorIs(t, err, ErrAuth)
}
