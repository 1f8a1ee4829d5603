package fuzz

import (
	"bytes"
	"errors"
	"hash/crc32"
	"io"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/frame"
	"github.com/sypas/go/wire"
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func addSeeds(f *testing.F, name string) {
	for _, in := range targets(f)[name] {
		f.Add(in...)
	}
}

// frameSentinels are the errors a decoder may return.
var frameSentinels = []error{frame.ErrBadMagic, frame.ErrVersion, frame.ErrBadType, frame.ErrBadFlags,
	frame.ErrHeaderLen, frame.ErrReserved, frame.ErrTooLarge, frame.ErrTruncated, frame.ErrChecksum}

func isOneOf(err error, targets ...error) bool {
	for _, t := range targets {
		if errors.Is(err, t) {
			return true
		}
	}
	return false
}

// checkFrame asserts the invariants of a frame f accepted from data.
func checkFrame(t *testing.T, f *frame.Frame, data []byte, n int, cfg frame.Config) {
	t.Helper()
	hl, pl := int(f.HeaderLen), int(f.PayloadLen)
	require.Equal(t, hl+pl, n)
	require.LessOrEqual(t, n, len(data))
	assert.True(t, f.Type.Valid(), "type %v", f.Type)
	assert.Zero(t, f.Flags&^f.Type.AllowedFlags(), "flags %v on %v", f.Flags, f.Type)
	assert.True(t, hl >= frame.HeaderSize && hl <= frame.MaxHeaderLen && hl%8 == 0, "header length %d", hl)
	assert.LessOrEqual(t, pl, cfg.Limit())
	assert.Equal(t, hl-frame.HeaderSize, len(f.Extension))
	assert.Equal(t, len(f.Extension), cap(f.Extension))
	assert.Equal(t, pl, len(f.Payload))
	assert.Equal(t, pl, cap(f.Payload), "payload view must not reach past the frame")
	assert.Equal(t, data[hl:n], nilOr(f.Payload))
	assert.Equal(t, []byte("SYPS"), data[:4])
	if f.Flags.Has(frame.FlagChecksum) {
		c := bytes.Clone(data[:n])
		copy(c[20:24], make([]byte, 4))
		assert.Equal(t, crc32.Checksum(c, castagnoli), uint32(data[20])|uint32(data[21])<<8|uint32(data[22])<<16|uint32(data[23])<<24)
	} else {
		assert.Equal(t, []byte{0, 0, 0, 0}, data[20:24])
	}
	var h frame.Header
	require.NoError(t, h.Decode(data, cfg), "header-only decode must accept what Decode accepts")
	assert.Equal(t, f.Header, h)
}

func nilOr(b []byte) []byte {
	if b == nil {
		return []byte{}
	}
	return b
}

func FuzzFrameDecode(f *testing.F) {
	addSeeds(f, "FuzzFrameDecode")
	f.Fuzz(func(t *testing.T, data []byte, limit uint32) {
		cfg := frame.Config{MaxPayload: int(limit % (frame.HardMaxPayload + 1))}
		var fr frame.Frame
		fr.Payload = []byte("stale")
		n, err := fr.Decode(data, cfg)
		if err != nil {
			require.True(t, isOneOf(err, frameSentinels...), "unexpected error %v", err)
			require.Zero(t, n)
			require.Equal(t, frame.Frame{}, fr, "a failed Decode leaves a zero Frame")
			return
		}
		checkFrame(t, &fr, data, n, cfg)

		// The payload decoder of the type never panics, and fails only
		// with ErrMalformed.
		m := wire.NewMessage(fr.Type)
		require.NotNil(t, m)
		if err := wire.DecodeFrame(&fr, m); err != nil {
			require.ErrorIs(t, err, wire.ErrMalformed)
		}
	})
}

func FuzzFrameRoundTrip(f *testing.F) {
	addSeeds(f, "FuzzFrameRoundTrip")
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg := frame.Config{MaxPayload: frame.HardMaxPayload}
		var f1 frame.Frame
		n, err := f1.Decode(data, cfg)
		if err != nil {
			return
		}
		enc, err := f1.Append(nil)
		require.NoError(t, err, "an accepted frame must re-encode")
		require.Equal(t, f1.Len(), len(enc))
		require.Equal(t, data[:n], enc, "re-encoding must reproduce the bytes")

		slot := make([]byte, len(enc)+3)
		m, err := f1.EncodeTo(slot)
		require.NoError(t, err)
		require.Equal(t, enc, slot[:m])

		var f2 frame.Frame
		n2, err := f2.Decode(enc, cfg)
		require.NoError(t, err)
		require.Equal(t, n, n2)
		require.Equal(t, f1, f2)
	})
}

// chunkReader hands out data in chunks whose sizes cycle through sizes
// (each byte + 1).
type chunkReader struct {
	data  []byte
	sizes []byte
	i     int
}

func (c *chunkReader) Read(p []byte) (int, error) {
	if len(c.data) == 0 {
		return 0, io.EOF
	}
	n := 1
	if len(c.sizes) > 0 {
		n = int(c.sizes[c.i%len(c.sizes)]) + 1
	}
	c.i++
	n = min(n, len(p), len(c.data))
	copy(p, c.data[:n])
	c.data = c.data[n:]
	return n, nil
}

type result struct {
	frames []frame.Frame
	err    error
}

// readStream reads every frame of r, copying them.
func readStream(r *frame.Reader) result {
	var res result
	for {
		f, err := r.ReadFrame()
		if err != nil {
			res.err = err
			return res
		}
		c := *f
		c.Extension = bytes.Clone(f.Extension)
		c.Payload = bytes.Clone(f.Payload)
		res.frames = append(res.frames, c)
	}
}

// decodeAll is the reference model: Frame.Decode in a loop over the whole
// stream, mapping a truncated tail to io.ErrUnexpectedEOF.
func decodeAll(data []byte, cfg frame.Config) result {
	var res result
	for {
		if len(data) == 0 {
			res.err = io.EOF
			return res
		}
		var f frame.Frame
		n, err := f.Decode(data, cfg)
		if errors.Is(err, frame.ErrTruncated) {
			res.err = io.ErrUnexpectedEOF
			return res
		}
		if err != nil {
			res.err = err
			return res
		}
		f.Extension = bytes.Clone(f.Extension)
		f.Payload = bytes.Clone(f.Payload)
		res.frames = append(res.frames, f)
		data = data[n:]
	}
}

func FuzzFrameStream(f *testing.F) {
	addSeeds(f, "FuzzFrameStream")
	f.Fuzz(func(t *testing.T, data, sizes []byte) {
		cfg := frame.Config{}
		want := decodeAll(data, cfg)
		whole := readStream(frame.NewReader(bytes.NewReader(data), cfg))
		chunked := readStream(frame.NewReader(&chunkReader{data: data, sizes: sizes}, cfg))

		for _, got := range []result{whole, chunked} {
			require.Equal(t, len(want.frames), len(got.frames))
			for i := range want.frames {
				require.Equal(t, want.frames[i], got.frames[i], "frame %d", i)
			}
			if want.err == io.EOF || want.err == io.ErrUnexpectedEOF {
				require.Equal(t, want.err, got.err)
			} else {
				require.EqualError(t, got.err, want.err.Error())
			}
		}
	})
}
