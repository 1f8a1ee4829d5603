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

	"github.com/sypas/sypas/frame"
	"github.com/sypas/sypas/sypas"
)

var genCorpus = flag.Bool("gen-corpus", false, "rewrite the seed files under testdata/fuzz")

// sampleMessages returns valid payloads of every type: a typical one, a
// minimal one and one with extreme values. Seeds are kept small (no
// maximum-length fields): the fuzzer minimises every new interesting input,
// and that takes minutes on inputs of several KiB.
func sampleMessages() []sypas.Message {
	name := bytes.Repeat([]byte("n"), 40)
	return []sypas.Message{
		&sypas.Request{Timeout: 250_000_000, Method: []byte("kv.get"), Body: []byte(`{"key":"a"}`)},
		&sypas.Request{Method: []byte("m")},
		&sypas.Request{Timeout: 1<<63 - 1, Method: name, Body: bytes.Repeat([]byte("b"), 40)},
		&sypas.Response{Body: []byte(`{"value":1}`)},
		&sypas.Response{},
		&sypas.Event{SubscriptionID: 7, Timestamp: 1_767_225_600_000_000_000, Topic: []byte("cpu.load"), Body: []byte("0.42")},
		&sypas.Event{SubscriptionID: 1, Topic: []byte("t")},
		&sypas.Subscribe{SubscriptionID: 7, Options: sypas.SubLastValue, Topic: []byte("cpu.*")},
		&sypas.Subscribe{SubscriptionID: ^uint64(0), Topic: name},
		&sypas.Unsubscribe{SubscriptionID: 7},
		&sypas.ErrorMsg{Code: sypas.CodeNotFound, Message: []byte("no method kv.put")},
		&sypas.ErrorMsg{Code: sypas.CodeResource, RetryAfterMs: 20},
		&sypas.ErrorMsg{Code: 0xffff, Message: bytes.Repeat([]byte("m"), 40)},
		&sypas.Heartbeat{Nonce: 0x0123456789abcdef, SentAt: 1_000_000_000},
		&sypas.Heartbeat{},
		&sypas.Bulk{InnerType: frame.TypeResponse, Flags: sypas.BulkChecksum, Region: 3, Offset: 1 << 20, Length: 300 << 10, Lease: 99, Checksum: 0xdeadbeef},
		&sypas.Bulk{InnerType: frame.TypeEvent, Offset: ^uint64(0) - 1, Length: 1},
		&sypas.GoAway{LastCorrelation: 41, Message: []byte("shutdown")},
		&sypas.GoAway{Code: sypas.CodeClosed},
		&sypas.Hello{MinVersion: 1, MaxVersion: 1, Features: 0xf, TxRingSize: 1 << 20, RxRingSize: 1 << 20,
			MaxPayload: 64 << 10, MaxInFlight: 128, Name: []byte("netd")},
		&sypas.Hello{MinVersion: 1, MaxVersion: 0xffff, TxRingSize: sypas.MinRingSize, RxRingSize: sypas.MaxRingSize,
			MaxPayload: frame.HardMaxPayload, Features: ^uint64(0)},
		&sypas.Welcome{Version: 1, HeartbeatMisses: 3, HeartbeatIntervalMs: 1000, Features: 3, SessionID: 0x5e55,
			TxRingSize: 1 << 20, RxRingSize: 1 << 20, MaxPayload: 64 << 10, MaxInFlight: 64},
		&sypas.Token{TokenID: 0x8badf00d, ExpiryUnix: 1_767_229_200_000_000_000, Token: []byte("\x01opaque-macaroon-bytes")},
		&sypas.Token{TokenID: 1, ExpiryUnix: 1, Token: bytes.Repeat([]byte("t"), 40)},
		&sypas.TokenRefresh{TokenID: 0x8badf00d, RequestedTTLMs: 3_600_000},
		&sypas.Regions{Entries: []sypas.Region{
			{Role: sypas.RoleControl, ID: 0, Size: 4096},
			{Role: sypas.RoleRingTx, ID: 1, Size: 1 << 20},
			{Role: sypas.RoleRingRx, ID: 2, Size: 1 << 20},
			{Role: sypas.RoleBulk, ID: 3, Size: 64 << 20, Flags: sypas.RegionReadOnly},
		}},
		&sypas.Regions{Entries: []sypas.Region{{Role: sypas.RoleBulk, ID: 9, Size: ^uint64(0) &^ 4095}}},
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
		b, err := sypas.AppendFrame(nil, h, m)
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
	return "FuzzDecode" + reflect.TypeOf(sypas.NewMessage(typ)).Elem().Name()
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
