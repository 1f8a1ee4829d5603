package fuzz

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/frame"
	"github.com/sypas/go/wire"
)

var genCorpus = flag.Bool("gen-corpus", false, "rewrite the seed files under testdata/fuzz")

// sampleMessages returns valid payloads of every type: a typical one, a
// minimal one and one with extreme values. Seeds are kept small (no
// maximum-length fields): the fuzzer minimises every new interesting input,
// and that takes minutes on inputs of several KiB.
func sampleMessages() []wire.Message {
	name := bytes.Repeat([]byte("n"), 40)
	return []wire.Message{
		&wire.Request{Timeout: 250_000_000, Method: []byte("kv.get"), Body: []byte(`{"key":"a"}`)},
		&wire.Request{Method: []byte("m")},
		&wire.Request{Timeout: 1<<63 - 1, Method: name, Body: bytes.Repeat([]byte("b"), 40)},
		&wire.Response{Body: []byte(`{"value":1}`)},
		&wire.Response{},
		&wire.Event{SubscriptionID: 7, Timestamp: 1_767_225_600_000_000_000, Topic: []byte("cpu.load"), Body: []byte("0.42")},
		&wire.Event{SubscriptionID: 1, Topic: []byte("t")},
		&wire.Subscribe{SubscriptionID: 7, Options: wire.SubLastValue, Topic: []byte("cpu.*")},
		&wire.Subscribe{SubscriptionID: ^uint64(0), Topic: name},
		&wire.Unsubscribe{SubscriptionID: 7},
		&wire.ErrorMsg{Code: wire.CodeNotFound, Message: []byte("no method kv.put")},
		&wire.ErrorMsg{Code: wire.CodeResource, RetryAfterMs: 20},
		&wire.ErrorMsg{Code: 0xffff, Message: bytes.Repeat([]byte("m"), 40)},
		&wire.Heartbeat{Nonce: 0x0123456789abcdef, SentAt: 1_000_000_000},
		&wire.Heartbeat{},
		&wire.Bulk{InnerType: frame.TypeResponse, Flags: wire.BulkChecksum, Region: 3, Offset: 1 << 20, Length: 300 << 10, Lease: 99, Checksum: 0xdeadbeef},
		&wire.Bulk{InnerType: frame.TypeEvent, Offset: ^uint64(0) - 1, Length: 1},
		&wire.GoAway{LastCorrelation: 41, Message: []byte("shutdown")},
		&wire.GoAway{Code: wire.CodeClosed},
		&wire.Hello{MinVersion: 1, MaxVersion: 1, Features: 0xf, TxRingSize: 1 << 20, RxRingSize: 1 << 20,
			MaxPayload: 64 << 10, MaxInFlight: 128, Name: []byte("netd")},
		&wire.Hello{MinVersion: 1, MaxVersion: 0xffff, TxRingSize: wire.MinRingSize, RxRingSize: wire.MaxRingSize,
			MaxPayload: frame.HardMaxPayload, Features: ^uint64(0)},
		&wire.Welcome{Version: 1, HeartbeatMisses: 3, HeartbeatIntervalMs: 1000, Features: 3, SessionID: 0x5e55,
			TxRingSize: 1 << 20, RxRingSize: 1 << 20, MaxPayload: 64 << 10, MaxInFlight: 64},
		&wire.Token{TokenID: 0x8badf00d, ExpiryUnix: 1_767_229_200_000_000_000, Token: []byte("\x01opaque-macaroon-bytes")},
		&wire.Token{TokenID: 1, ExpiryUnix: 1, Token: bytes.Repeat([]byte("t"), 40)},
		&wire.TokenRefresh{TokenID: 0x8badf00d, RequestedTTLMs: 3_600_000},
		&wire.Regions{Entries: []wire.Region{
			{Role: wire.RoleControl, ID: 0, Size: 4096},
			{Role: wire.RoleRingTx, ID: 1, Size: 1 << 20},
			{Role: wire.RoleRingRx, ID: 2, Size: 1 << 20},
			{Role: wire.RoleBulk, ID: 3, Size: 64 << 20, Flags: wire.RegionReadOnly},
		}},
		&wire.Regions{Entries: []wire.Region{{Role: wire.RoleBulk, ID: 9, Size: ^uint64(0) &^ 4095}}},
	}
}

// payloadSeeds returns the encoded sample payloads of type t.
func payloadSeeds(t testing.TB, typ frame.Type) [][]byte {
	var out [][]byte
	for _, m := range sampleMessages() {
		if m.Type() != typ {
			continue
		}
		p, err := m.Append(nil)
		require.NoError(t, err)
		out = append(out, p)
	}
	require.NotEmpty(t, out, "no samples of %v", typ)
	return out
}

// frameSeeds returns valid encoded frames: every sample message in a frame,
// with and without checksum, plus an extension and an empty payload.
func frameSeeds(t testing.TB) [][]byte {
	var out [][]byte
	for i, m := range sampleMessages() {
		h := frame.Header{StreamID: uint32(i), Sequence: uint64(i + 1), Correlation: uint64(i * 3), CapRef: 0x8badf00d}
		if i%2 == 0 {
			h.Flags = frame.FlagChecksum
		}
		b, err := wire.AppendFrame(nil, h, m)
		require.NoError(t, err)
		out = append(out, b)
	}
	ext := frame.Frame{
		Header:    frame.Header{Type: frame.TypeHeartbeat, Flags: frame.FlagChecksum | frame.FlagAck},
		Extension: []byte("tracing-id:00001"),
		Payload:   make([]byte, 16),
	}
	b, err := ext.Append(nil)
	require.NoError(t, err)
	empty := frame.Frame{Header: frame.Header{Type: frame.TypeResponse, Flags: frame.FlagEndStream}}
	b2, err := empty.Append(nil)
	require.NoError(t, err)
	return append(out, b, b2)
}

// streamSeeds returns (stream, chunk sizes) pairs: runs of valid frames,
// some ending in a cut frame or garbage.
func streamSeeds(t testing.TB) [][2][]byte {
	fs := frameSeeds(t)
	some := bytes.Join([][]byte{fs[1], fs[9], fs[len(fs)-2], fs[len(fs)-1]}, nil)
	return [][2][]byte{
		{some, []byte{0}},
		{some, []byte{47, 1, 200, 3}},
		{bytes.Join(fs[13:15], nil), []byte{255}},
		{append(bytes.Join(fs[:2], nil), fs[2][:30]...), []byte{5, 17}},
		{append(bytes.Clone(fs[0]), "GET / HTTP/1.1\r\n"...), []byte{1}},
		{nil, []byte{1}},
	}
}

// targets maps each fuzz target to its seed inputs, each a list of the
// target's arguments.
func targets(t testing.TB) map[string][][]any {
	m := map[string][][]any{}
	for _, b := range frameSeeds(t) {
		m["FuzzFrameDecode"] = append(m["FuzzFrameDecode"], []any{b, uint32(0)})
		m["FuzzFrameRoundTrip"] = append(m["FuzzFrameRoundTrip"], []any{b})
	}
	m["FuzzFrameDecode"] = append(m["FuzzFrameDecode"], []any{frameSeeds(t)[0], uint32(16)})
	for _, s := range streamSeeds(t) {
		m["FuzzFrameStream"] = append(m["FuzzFrameStream"], []any{s[0], s[1]})
	}
	for _, b := range bulkSeeds() {
		m["FuzzBulk"] = append(m["FuzzBulk"], []any{b})
	}
	for _, typ := range frame.Types() {
		for _, p := range payloadSeeds(t, typ) {
			name := payloadTarget(typ)
			m[name] = append(m[name], []any{p})
		}
	}
	return m
}

// payloadTarget names the fuzz target of a payload type after its Go
// struct: FuzzDecodeTokenRefresh.
func payloadTarget(typ frame.Type) string {
	return "FuzzDecode" + reflect.TypeOf(wire.NewMessage(typ)).Elem().Name()
}

// marshalCorpus encodes one input in the "go test fuzz v1" file format.
func marshalCorpus(args []any) []byte {
	var b bytes.Buffer
	b.WriteString("go test fuzz v1\n")
	for _, a := range args {
		switch v := a.(type) {
		case []byte:
			fmt.Fprintf(&b, "[]byte(%q)\n", v)
		case uint32:
			fmt.Fprintf(&b, "uint32(%d)\n", v)
		default:
			panic(fmt.Sprintf("unsupported corpus type %T", a))
		}
	}
	return b.Bytes()
}

// TestWriteSeedCorpus writes testdata/fuzz/<target>/seed-NN with -gen-corpus
// and otherwise checks that the committed seeds are the generated ones.
// Other files there (crash regressions) are left alone.
func TestWriteSeedCorpus(t *testing.T) {
	for name, inputs := range targets(t) {
		dir := filepath.Join("testdata", "fuzz", name)
		for i, in := range inputs {
			path := filepath.Join(dir, fmt.Sprintf("seed-%02d", i))
			want := marshalCorpus(in)
			if *genCorpus {
				require.NoError(t, os.MkdirAll(dir, 0o755))
				require.NoError(t, os.WriteFile(path, want, 0o644))
				continue
			}
			got, err := os.ReadFile(path)
			if assert.NoError(t, err, "run: go test ./fuzz/ -run TestWriteSeedCorpus -gen-corpus") {
				assert.Equal(t, string(want), string(got), "%s is stale", path)
			}
		}
	}
}

func TestEveryPayloadTypeHasATarget(t *testing.T) {
	fs := targets(t)
	for _, typ := range frame.Types() {
		assert.Contains(t, fs, payloadTarget(typ))
	}
	assert.Equal(t, "FuzzDecodeTokenRefresh", payloadTarget(frame.TypeTokenRefresh))
	assert.Equal(t, "FuzzDecodeErrorMsg", payloadTarget(frame.TypeError))
}
