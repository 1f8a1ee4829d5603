package fuzz

import (
	"bytes"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/sypas/go/frame"
	"github.com/sypas/go/wire"
)

// fuzzPayload is the body of every payload target: decoding never panics
// and fails only with ErrMalformed; an accepted payload re-encodes to the
// bytes it was decoded from (only HELLO may have ignored trailing bytes)
// and decodes again to an equal struct.
func fuzzPayload[M any, PM interface {
	*M
	wire.Message
}](f *testing.F, typ frame.Type) {
	for _, in := range targets(f)[payloadTarget(typ)] {
		f.Add(in...)
	}
	f.Fuzz(func(t *testing.T, p []byte) {
		var m1 M
		pm1 := PM(&m1)
		require.Equal(t, typ, pm1.Type())
		if err := pm1.Decode(p); err != nil {
			require.ErrorIs(t, err, wire.ErrMalformed)
			return
		}
		enc, err := pm1.Append(nil)
		require.NoError(t, err, "an accepted payload must re-encode")
		require.Equal(t, pm1.Len(), len(enc))
		require.LessOrEqual(t, len(enc), len(p))
		require.True(t, bytes.Equal(p[:len(enc)], enc), "re-encoding must reproduce the bytes")
		if typ != frame.TypeHello {
			require.Equal(t, len(p), len(enc), "only HELLO ignores trailing bytes")
		}

		var m2 M
		require.NoError(t, PM(&m2).Decode(enc))
		require.Equal(t, m1, m2)

		// And inside a frame.
		b, err := wire.AppendFrame(nil, frame.Header{Flags: frame.FlagChecksum}, pm1)
		require.NoError(t, err)
		var fr frame.Frame
		_, err = fr.Decode(b, frame.Config{MaxPayload: frame.HardMaxPayload})
		require.NoError(t, err)
		var m3 M
		require.NoError(t, wire.DecodeFrame(&fr, PM(&m3)))
		require.Equal(t, m1, m3)
	})
}

func FuzzDecodeRequest(f *testing.F)  { fuzzPayload[wire.Request](f, frame.TypeRequest) }
func FuzzDecodeResponse(f *testing.F) { fuzzPayload[wire.Response](f, frame.TypeResponse) }
func FuzzDecodeEvent(f *testing.F)    { fuzzPayload[wire.Event](f, frame.TypeEvent) }
func FuzzDecodeSubscribe(f *testing.F) {
	fuzzPayload[wire.Subscribe](f, frame.TypeSubscribe)
}
func FuzzDecodeUnsubscribe(f *testing.F) {
	fuzzPayload[wire.Unsubscribe](f, frame.TypeUnsubscribe)
}
func FuzzDecodeErrorMsg(f *testing.F)  { fuzzPayload[wire.ErrorMsg](f, frame.TypeError) }
func FuzzDecodeHeartbeat(f *testing.F) { fuzzPayload[wire.Heartbeat](f, frame.TypeHeartbeat) }
func FuzzDecodeBulk(f *testing.F)      { fuzzPayload[wire.Bulk](f, frame.TypeBulk) }
func FuzzDecodeGoAway(f *testing.F)    { fuzzPayload[wire.GoAway](f, frame.TypeGoAway) }
func FuzzDecodeHello(f *testing.F)     { fuzzPayload[wire.Hello](f, frame.TypeHello) }
func FuzzDecodeWelcome(f *testing.F)   { fuzzPayload[wire.Welcome](f, frame.TypeWelcome) }
func FuzzDecodeToken(f *testing.F)     { fuzzPayload[wire.Token](f, frame.TypeToken) }
func FuzzDecodeTokenRefresh(f *testing.F) {
	fuzzPayload[wire.TokenRefresh](f, frame.TypeTokenRefresh)
}
func FuzzDecodeRegions(f *testing.F) { fuzzPayload[wire.Regions](f, frame.TypeRegions) }
