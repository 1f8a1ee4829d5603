package control

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/sypas/control/token"
	"github.com/sypas/sypas/frame"
	"github.com/sypas/sypas/sypas"
)

// Feature bit 0 (CHECKSUM) is reserved (docs/PROTOCOL.md §2.4, §3.10): no
// configuration may offer or require it, so a kernel never grants it, even
// to a daemon that offers every bit.
func TestChecksumFeatureNeverGranted(t *testing.T) {
	for _, cfg := range []SessionConfig{
		{Features: sypas.FeatureChecksum | sypas.FeatureTokenRefresh},
		{Features: sypas.FeatureChecksum, RequireFeatures: sypas.FeatureChecksum},
	} {
		_, err := NewServer(listenFor(t, sockPath(t), nil), ServerConfig{Keys: testKeys(t), SessionConfig: cfg})
		assert.ErrorContains(t, err, "CHECKSUM", "kernel %+v", cfg)
		_, err = Dial(context.Background(), "/nonexistent", DialConfig{SessionConfig: cfg})
		assert.ErrorContains(t, err, "CHECKSUM", "daemon %+v", cfg)
	}

	ts := startServer(t, "", ServerConfig{SessionConfig: SessionConfig{
		Features: sypas.FeatureBulk | sypas.FeatureSubscribe | sypas.FeatureTokenRefresh}})
	c := rawDial(t, ts.path)
	writeMsg(t, c, 1, &sypas.Hello{MinVersion: 1, MaxVersion: 1, Features: ^uint64(0)})
	f, err := frame.NewReader(c, frame.Config{MaxPayload: controlMaxPayload}).ReadFrame()
	require.NoError(t, err)
	var w sypas.Welcome
	require.NoError(t, sypas.DecodeFrame(f, &w))
	assert.Equal(t, sypas.FeatureBulk|sypas.FeatureSubscribe|sypas.FeatureTokenRefresh, w.Features)
}

// One token size limit (docs/PROTOCOL.md §3.12, §6.6, §7.1): what the TOKEN
// codec accepts is what a token may be.
func TestTokenSizeLimitIsOne(t *testing.T) {
	assert.Equal(t, token.MaxTokenSize, sypas.MaxTokenLen)
	assert.GreaterOrEqual(t, controlMaxPayload, (&sypas.Token{Token: make([]byte, sypas.MaxTokenLen)}).Len())
}
