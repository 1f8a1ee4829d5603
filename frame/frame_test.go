package frame

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// testFrames returns valid frames covering every type, flags, extensions
// and payload sizes.
func testFrames() []Frame {
	var fs []Frame
	for i, t := range Types() {
		fs = append(fs, Frame{
			Header: Header{
				Type: t, Flags: t.AllowedFlags(), StreamID: uint32(i),
				Sequence: uint64(i) + 1, Correlation: 0x1122334455667788, CapRef: 0xfeedfacecafebeef,
			},
			Payload: bytes.Repeat([]byte{byte(i)}, i*7),
		}, Frame{Header: Header{Type: t}})
	}
	fs = append(fs, Frame{
		Header:    Header{Type: TypeRequest, Flags: FlagChecksum, Sequence: 9},
		Extension: []byte("EXTENSIONBYTES16"),
		Payload:   []byte("hello"),
	}, Frame{
		Header:  Header{Type: TypeEvent},
		Payload: make([]byte, DefaultMaxPayload),
	})
	return fs
}

func encode(t testing.TB, f *Frame) []byte {
	t.Helper()
	b, err := f.Append(nil)
	require.NoError(t, err)
	require.Len(t, b, f.Len())
	return b
}

// normal returns f with the lengths a decoder would set.
func normal(f Frame) Frame {
	f.HeaderLen = uint16(HeaderSize + len(f.Extension))
	f.PayloadLen = uint32(len(f.Payload))
	if len(f.Extension) == 0 {
		f.Extension = nil
	}
	if len(f.Payload) == 0 {
		f.Payload = nil
	}
	return f
}

func TestRoundTrip(t *testing.T) {
	for _, want := range testFrames() {
		t.Run(want.Type.String(), func(t *testing.T) {
			b := encode(t, &want)
			var got Frame
			n, err := got.Decode(b, Config{})
			require.NoError(t, err)
			assert.Equal(t, len(b), n)
			assert.Equal(t, normal(want), got)

			var h Header
			require.NoError(t, h.Decode(b, Config{}))
			assert.Equal(t, got.Header, h)

			// EncodeTo writes the same bytes into a larger slot.
			slot := make([]byte, len(b)+8)
			n, err = want.EncodeTo(slot)
			require.NoError(t, err)
			assert.Equal(t, b, slot[:n])

			// Re-encoding the decoded frame gives the same bytes.
			assert.Equal(t, b, encode(t, &got))
		})
	}
}

func TestDecodeIgnoresTrailingBytes(t *testing.T) {
	f := Frame{Header: Header{Type: TypeHeartbeat}, Payload: []byte("12345678")}
	b := append(encode(t, &f), 0xff, 0xff, 0xff)
	var got Frame
	n, err := got.Decode(b, Config{})
	require.NoError(t, err)
	assert.Equal(t, f.Len(), n)
	assert.Equal(t, 8, cap(got.Payload), "payload view must not expose following bytes")
}

func TestDecodeEveryTruncation(t *testing.T) {
	for _, f := range testFrames()[:6] {
		b := encode(t, &f)
		for i := range len(b) {
			var got Frame
			got.Payload = []byte("stale")
			n, err := got.Decode(b[:i], Config{})
			require.ErrorIs(t, err, ErrTruncated, "%v cut at %d", f.Type, i)
			assert.Zero(t, n)
			assert.Equal(t, Frame{}, got)
		}
	}
}

func TestDecodeDetectsEveryBitFlip(t *testing.T) {
	f := Frame{
		Header:  Header{Type: TypeResponse, Flags: FlagChecksum | FlagEndStream, StreamID: 3, Correlation: 77, CapRef: 5},
		Payload: []byte("a response body of some length"),
	}
	b := encode(t, &f)
	for i := range len(b) * 8 {
		c := bytes.Clone(b)
		c[i/8] ^= 1 << (i % 8)
		var got Frame
		_, err := got.Decode(c, Config{})
		assert.Error(t, err, "flip of bit %d of byte %d undetected", i%8, i/8)
	}
}

func TestDecodeErrors(t *testing.T) {
	valid := Frame{Header: Header{Type: TypeRequest, Flags: FlagChecksum}, Payload: []byte("payload!")}
	plain := Frame{Header: Header{Type: TypeRequest}, Payload: []byte("payload!")}
	for _, tc := range []struct {
		name  string
		base  *Frame
		mut   func(b []byte)
		cfg   Config
		want  error
		noCRC bool
	}{
		{"magic", &valid, func(b []byte) { b[0] = 'X' }, Config{}, ErrBadMagic, false},
		{"version0", &valid, func(b []byte) { b[offVersion] = 0 }, Config{}, ErrVersion, false},
		{"version2", &valid, func(b []byte) { b[offVersion] = 2 }, Config{}, ErrVersion, false},
		{"type0", &plain, func(b []byte) { b[offType] = 0 }, Config{}, ErrBadType, false},
		{"type7f", &plain, func(b []byte) { b[offType] = 0x7f }, Config{}, ErrBadType, false},
		{"unknownFlag", &plain, func(b []byte) { b[offFlags+1] = 0x80 }, Config{}, ErrBadFlags, false},
		{"ackOnRequest", &plain, func(b []byte) { b[offFlags] = byte(FlagAck) }, Config{}, ErrBadFlags, false},
		{"headerLen40", &plain, func(b []byte) { put16(b[offHeaderLen:], 40) }, Config{}, ErrHeaderLen, false},
		{"headerLen52", &plain, func(b []byte) { put16(b[offHeaderLen:], 52) }, Config{}, ErrHeaderLen, false},
		{"headerLen264", &plain, func(b []byte) { put16(b[offHeaderLen:], 264) }, Config{}, ErrHeaderLen, false},
		{"reserved", &plain, func(b []byte) { b[offReserved] = 1 }, Config{}, ErrReserved, false},
		{"crcWithoutFlag", &plain, func(b []byte) { b[offChecksum] = 1 }, Config{}, ErrReserved, false},
		{"payloadOverDefault", &plain, func(b []byte) { put32(b[offPayloadLen:], DefaultMaxPayload+1) }, Config{}, ErrTooLarge, false},
		{"payloadOverConfig", &plain, func(b []byte) {}, Config{MaxPayload: 7}, ErrTooLarge, false},
		{"payloadHuge", &plain, func(b []byte) { put32(b[offPayloadLen:], 0xffffffff) }, Config{MaxPayload: HardMaxPayload}, ErrTooLarge, false},
		{"payloadPastEnd", &plain, func(b []byte) { put32(b[offPayloadLen:], 9) }, Config{}, ErrTruncated, false},
		{"checksum", &valid, func(b []byte) { b[len(b)-1] ^= 0xff }, Config{}, ErrChecksum, false},
		{"checksumRequired", &plain, func(b []byte) {}, Config{RequireChecksum: true}, ErrChecksum, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := encode(t, tc.base)
			tc.mut(b)
			var f Frame
			_, err := f.Decode(b, tc.cfg)
			require.ErrorIs(t, err, tc.want)
			assert.Equal(t, Frame{}, f)
		})
	}
}

func put16(b []byte, v uint16) { binary.LittleEndian.PutUint16(b, v) }
func put32(b []byte, v uint32) { binary.LittleEndian.PutUint32(b, v) }

func TestHeaderDecodeRejectsBeforePayloadArrives(t *testing.T) {
	f := Frame{Header: Header{Type: TypeRequest}, Payload: make([]byte, 100)}
	b := encode(t, &f)
	put32(b[offPayloadLen:], HardMaxPayload+1)
	var h Header
	err := h.Decode(b[:HeaderSize], Config{MaxPayload: HardMaxPayload})
	require.ErrorIs(t, err, ErrTooLarge)
	assert.Contains(t, err.Error(), "16777217")

	put32(b[offPayloadLen:], 100)
	require.NoError(t, h.Decode(b[:HeaderSize], Config{}), "header-only decode needs no payload")
	assert.Equal(t, HeaderSize+100, h.FrameLen())
}

func TestEncodeErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		f    Frame
		want error
	}{
		{"type0", Frame{}, ErrBadType},
		{"typeUnknown", Frame{Header: Header{Type: 0x30}}, ErrBadType},
		{"flags", Frame{Header: Header{Type: TypeRequest, Flags: FlagAck}}, ErrBadFlags},
		{"extensionOdd", Frame{Header: Header{Type: TypeRequest}, Extension: make([]byte, 4)}, ErrHeaderLen},
		{"extensionLong", Frame{Header: Header{Type: TypeRequest}, Extension: make([]byte, MaxHeaderLen)}, ErrHeaderLen},
		{"payload", Frame{Header: Header{Type: TypeRequest}, Payload: make([]byte, HardMaxPayload+1)}, ErrTooLarge},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := tc.f.Append([]byte("keep"))
			require.ErrorIs(t, err, tc.want)
			assert.Equal(t, []byte("keep"), b)
			_, err = tc.f.EncodeTo(make([]byte, 1<<10))
			require.ErrorIs(t, err, tc.want)
		})
	}
	f := Frame{Header: Header{Type: TypeRequest}, Payload: []byte("x")}
	_, err := f.EncodeTo(make([]byte, HeaderSize))
	require.ErrorIs(t, err, ErrShortBuffer)
}

func TestHardMaxPayloadRoundTrip(t *testing.T) {
	f := Frame{Header: Header{Type: TypeResponse, Flags: FlagChecksum}, Payload: make([]byte, HardMaxPayload)}
	b := encode(t, &f)
	var got Frame
	_, err := got.Decode(b, Config{})
	require.ErrorIs(t, err, ErrTooLarge, "default limit is 64 KiB")
	_, err = got.Decode(b, Config{MaxPayload: HardMaxPayload})
	require.NoError(t, err)
	assert.Len(t, got.Payload, HardMaxPayload)
}

func TestPutInPlace(t *testing.T) {
	want := Frame{
		Header:  Header{Type: TypeEvent, Flags: FlagChecksum, StreamID: 4, Sequence: 2, CapRef: 9},
		Payload: []byte("written in place"),
	}
	slot := make([]byte, want.Len())
	copy(slot[HeaderSize:], want.Payload)
	h := want.Header
	h.PayloadLen = uint32(len(want.Payload))
	require.NoError(t, h.Put(slot))
	require.NoError(t, SetChecksum(slot))
	assert.Equal(t, encode(t, &want), slot)

	require.ErrorIs(t, h.Put(slot[:HeaderSize-1]), ErrShortBuffer)
	require.ErrorIs(t, SetChecksum(slot[:len(slot)-1]), ErrTruncated)
	h.Flags = 0
	require.NoError(t, h.Put(slot))
	require.ErrorIs(t, SetChecksum(slot), ErrBadFlags)
}

func TestConfig(t *testing.T) {
	assert.Equal(t, DefaultMaxPayload, Config{}.Limit())
	assert.Equal(t, 100, Config{MaxPayload: 100}.Limit())
	assert.Equal(t, HardMaxPayload, Config{MaxPayload: HardMaxPayload + 1}.Limit())
	require.NoError(t, Config{MaxPayload: HardMaxPayload}.Validate())
	require.ErrorIs(t, Config{MaxPayload: HardMaxPayload + 1}.Validate(), ErrConfig)
	require.ErrorIs(t, Config{MaxPayload: -1}.Validate(), ErrConfig)
}

func TestStrings(t *testing.T) {
	assert.Equal(t, "REQUEST", TypeRequest.String())
	assert.Equal(t, "TOKEN_REFRESH", TypeTokenRefresh.String())
	assert.Equal(t, "Type(0x7f)", Type(0x7f).String())
	assert.Equal(t, "Type(0x00)", Type(0).String())
	assert.Equal(t, "0", Flags(0).String())
	assert.Equal(t, "CHECKSUM|END_STREAM", (FlagChecksum | FlagEndStream).String())
	assert.Equal(t, "ACK|0x8000", (FlagAck | 0x8000).String())
	assert.Equal(t, "0x0010", Flags(0x10).String())
	assert.Len(t, Types(), 14)
	for _, typ := range Types() {
		assert.True(t, typ.AllowedFlags().Has(FlagChecksum), "%v", typ)
		assert.NotContains(t, typ.String(), "Type(")
	}
	assert.Equal(t, Flags(0), Type(0x7f).AllowedFlags())
	h := Header{Type: TypeRequest, Flags: FlagChecksum, StreamID: 1, Sequence: 7, Correlation: 42, CapRef: 1, HeaderLen: 48, PayloadLen: 16}
	assert.Equal(t, "REQUEST flags=CHECKSUM stream=1 seq=7 corr=42 cap=0x1 len=48+16", h.String())
}

func TestZeroAllocs(t *testing.T) {
	f := Frame{
		Header:  Header{Type: TypeRequest, Flags: FlagChecksum, Correlation: 1},
		Payload: make([]byte, 1024),
	}
	buf := make([]byte, 0, f.Len())
	slot := make([]byte, f.Len())
	b := encode(t, &f)
	var got Frame
	var h Header
	var err error
	allocs := testing.AllocsPerRun(100, func() {
		buf, err = f.Append(buf[:0])
	})
	require.NoError(t, err)
	assert.Zero(t, allocs, "Append")
	assert.Zero(t, testing.AllocsPerRun(100, func() { _, err = f.EncodeTo(slot) }), "EncodeTo")
	require.NoError(t, err)
	assert.Zero(t, testing.AllocsPerRun(100, func() { _, err = got.Decode(b, Config{}) }), "Decode")
	require.NoError(t, err)
	assert.Zero(t, testing.AllocsPerRun(100, func() { err = h.Decode(b, Config{}) }), "Header.Decode")
	require.NoError(t, err)
	assert.Zero(t, testing.AllocsPerRun(100, func() { err = h.Put(slot) }), "Header.Put")
	require.NoError(t, err)
	assert.Zero(t, testing.AllocsPerRun(100, func() { err = SetChecksum(slot) }), "SetChecksum")
	require.NoError(t, err)
}

// TestDecodeReadsHeaderOnce checks the TOCTOU rule: the decoder acts on its
// private copy of the lengths, so rewriting the buffer after Decode cannot
// move or grow the views it returned.
func TestDecodeViewsBoundedByPrivateCopy(t *testing.T) {
	f := Frame{Header: Header{Type: TypeEvent}, Payload: []byte("0123456789")}
	b := append(encode(t, &f), make([]byte, 64)...)
	var got Frame
	_, err := got.Decode(b, Config{})
	require.NoError(t, err)
	put32(b[offPayloadLen:], 70) // the peer scribbles after validation
	assert.Len(t, got.Payload, 10)
	assert.Equal(t, 10, cap(got.Payload))
	assert.Equal(t, uint32(10), got.PayloadLen)
	assert.True(t, errors.Is(ErrShort, ErrTruncated))
}

// TestWireLayout pins the header layout of docs/PROTOCOL.md section 2.1
// with bytes written by hand, independently of the encoder.
func TestWireLayout(t *testing.T) {
	wire := []byte{
		'S', 'Y', 'P', 'S', // magic
		1,          // version
		0x06,       // type ERROR
		0x03, 0x00, // flags CHECKSUM|END_STREAM
		56, 0, // header_len: 48 + 8 bytes of extension
		0, 0, // reserved
		3, 0, 0, 0, // payload_len
		0x04, 0x03, 0x02, 0x01, // stream_id
		0, 0, 0, 0, // checksum, patched below
		0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, // sequence
		0x18, 0x17, 0x16, 0x15, 0x14, 0x13, 0x12, 0x11, // correlation
		0x28, 0x27, 0x26, 0x25, 0x24, 0x23, 0x22, 0x21, // cap_ref
		'e', 'x', 't', 'e', 'n', 's', 'i', 'o', // extension
		'a', 'b', 'c', // payload
	}
	crc := crc32.Checksum(wire, crc32.MakeTable(crc32.Castagnoli)) // field is zero here
	binary.LittleEndian.PutUint32(wire[20:], crc)

	var f Frame
	n, err := f.Decode(wire, Config{})
	require.NoError(t, err)
	assert.Equal(t, len(wire), n)
	assert.Equal(t, Frame{
		Header: Header{Type: TypeError, Flags: FlagChecksum | FlagEndStream, HeaderLen: 56, PayloadLen: 3,
			StreamID: 0x01020304, Sequence: 0x0102030405060708, Correlation: 0x1112131415161718, CapRef: 0x2122232425262728},
		Extension: []byte("extensio"),
		Payload:   []byte("abc"),
	}, f)
	assert.Equal(t, wire, encode(t, &f))
	assert.Equal(t, uint32(0xe3069283), crc32.Checksum([]byte("123456789"), castagnoli), "CRC-32C check value")
}
