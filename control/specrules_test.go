package control

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/control/token"
	"github.com/sypas/go/frame"
	"github.com/sypas/go/wire"
)

// Feature bit 0 (CHECKSUM) is reserved (docs/PROTOCOL.md §2.4, §3.10): no
// configuration may offer or require it, so a kernel never grants it, even
// to a daemon that offers every bit.
func TestChecksumFeatureNeverGranted(t *testing.T) {
	for _, cfg := range []SessionConfig{
		{Features: wire.FeatureChecksum | wire.FeatureTokenRefresh},
		{Features: wire.FeatureChecksum, RequireFeatures: wire.FeatureChecksum},
	} {
		_, err := NewServer(listenFor(t, sockPath(t), nil), ServerConfig{Keys: testKeys(t), SessionConfig: cfg})
		assert.ErrorContains(t, err, "CHECKSUM", "kernel %+v", cfg)
		_, err = Dial(context.Background(), "/nonexistent", DialConfig{SessionConfig: cfg})
		assert.ErrorContains(t, err, "CHECKSUM", "daemon %+v", cfg)
	}

	ts := startServer(t, "", ServerConfig{SessionConfig: SessionConfig{
		Features: wire.FeatureBulk | wire.FeatureSubscribe | wire.FeatureTokenRefresh}})
	c := rawDial(t, ts.path)
	// Every bit but INLINE_ONLY, which a kernel that does not go inline
	// refuses (§8.6, TestInlineRefusedWhenOneSideCannot).
	writeMsg(t, c, 1, &wire.Hello{MinVersion: 1, MaxVersion: 1, Features: ^wire.FeatureInlineOnly, HasBulkSize: true})
	f, err := frame.NewReader(c, frame.Config{MaxPayload: controlMaxPayload}).ReadFrame()
	require.NoError(t, err)
	var w wire.Welcome
	require.NoError(t, wire.DecodeFrame(f, &w))
	assert.Equal(t, wire.FeatureBulk|wire.FeatureSubscribe|wire.FeatureTokenRefresh, w.Features)
}

// One token size limit (docs/PROTOCOL.md §3.12, §6.6, §7.1): what the TOKEN
// codec accepts is what a token may be.
func TestTokenSizeLimitIsOne(t *testing.T) {
	assert.Equal(t, token.MaxTokenSize, wire.MaxTokenLen)
	assert.GreaterOrEqual(t, controlMaxPayload, (&wire.Token{Token: make([]byte, wire.MaxTokenLen)}).Len())
}
