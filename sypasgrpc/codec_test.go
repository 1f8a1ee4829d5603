package sypasgrpc

import (
	"bytes"
	"context"
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/sypas/go/sypas"
)

// TestCodecIsBytesValue: what the codec sends is what protobuf makes of a
// BytesValue, and it reads protobuf's BytesValue, for every size class of
// the length varint, however grpc splits the message into buffers.
func TestCodecIsBytesValue(t *testing.T) {
	c := encoding.GetCodecV2(CodecName)
	require.NotNil(t, c, "registered under its name")
	for _, n := range []int{0, 1, 127, 128, 16383, 16384, 1 << 20} {
		v := bytes.Repeat([]byte{0xA5}, n)
		if n > 0 {
			v[0] = byte(n) // catch an offset error
		}
		want, err := proto.Marshal(wrapperspb.Bytes(v))
		require.NoError(t, err)

		out, err := c.Marshal(&chunk{b: v})
		require.NoError(t, err)
		assert.True(t, bytes.Equal(want, out.Materialize()), "%d bytes", n)
		out.Free()

		for _, split := range []int{1, 2, len(want) / 2} {
			data := splitBuffers(want, split)
			var ch chunk
			require.NoError(t, c.Unmarshal(data, &ch), "%d bytes split at %d", n, split)
			assert.True(t, bytes.Equal(v, ch.b), "%d bytes split at %d", n, split)
		}
	}
}

func splitBuffers(b []byte, at int) mem.BufferSlice {
	if at <= 0 || at >= len(b) {
		return mem.BufferSlice{mem.SliceBuffer(b)}
	}
	return mem.BufferSlice{mem.SliceBuffer(b[:at]), mem.SliceBuffer(b[at:])}
}

func TestCodecRefusesOtherMessages(t *testing.T) {
	c := encoding.GetCodecV2(CodecName)
	for name, b := range map[string][]byte{
		"field 2":         {2<<3 | 2, 1, 'x'},
		"varint field 1":  {1 << 3, 1},
		"short value":     {bytesValueTag, 5, 'x'},
		"long value":      {bytesValueTag, 1, 'x', 'y'},
		"broken varint":   {bytesValueTag, 0x80},
		"two occurrences": {bytesValueTag, 1, 'x', bytesValueTag, 1, 'y'},
	} {
		var ch chunk
		assert.ErrorIs(t, c.Unmarshal(mem.BufferSlice{mem.SliceBuffer(b)}, &ch), errNotBytesValue, name)
	}
}

// TestCodecFallsBackToProto: a proto message given to the codec (a stock
// client's, say) is encoded as the proto codec would.
func TestCodecFallsBackToProto(t *testing.T) {
	c := encoding.GetCodecV2(CodecName)
	out, err := c.Marshal(wrapperspb.String("hi"))
	require.NoError(t, err)
	var s wrapperspb.StringValue
	require.NoError(t, c.Unmarshal(out, &s))
	assert.Equal(t, "hi", s.GetValue())
}

// TestProtoFileMatchesDescriptor holds the published sypas.proto and the
// descriptor built in Go together: the file's declarations, comments
// aside, are those rendered from the descriptor.
func TestProtoFileMatchesDescriptor(t *testing.T) {
	src, err := os.ReadFile("sypas.proto")
	require.NoError(t, err)
	var got []string
	for _, l := range strings.Split(string(src), "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "//") {
			got = append(got, l)
		}
	}
	fd := FileDescriptor()
	want := []string{`syntax = "proto3";`, "package " + string(fd.Package()) + ";"}
	for i := range fd.Imports().Len() {
		want = append(want, `import "`+fd.Imports().Get(i).Path()+`";`)
	}
	want = append(want, `option go_package = "github.com/sypas/go/sypasgrpc";`)
	for i := range fd.Services().Len() {
		s := fd.Services().Get(i)
		want = append(want, "service "+string(s.Name())+" {")
		for j := range s.Methods().Len() {
			m := s.Methods().Get(j)
			want = append(want, "rpc "+string(m.Name())+"("+streamed(m.IsStreamingClient(), m.Input())+") returns ("+
				streamed(m.IsStreamingServer(), m.Output())+");")
		}
		want = append(want, "}")
	}
	assert.Equal(t, want, got)
	assert.Equal(t, ProtoFile, fd.Path())
	assert.Equal(t, ServiceName, string(fd.Services().Get(0).FullName()))
}

func streamed(s bool, m protoreflect.MessageDescriptor) string {
	if s {
		return "stream " + string(m.FullName())
	}
	return string(m.FullName())
}

// Every SYPAS code has its gRPC status, and a status back to its code:
// the same, except the two that share a status with another
// (E_TOO_LARGE and E_CLOSED read back as E_RESOURCE and E_UNAVAILABLE).
func TestCodeMap(t *testing.T) {
	shared := map[sypas.Code]sypas.Code{sypas.CodeTooLarge: sypas.CodeResource, sypas.CodeClosed: sypas.CodeUnavailable}
	for c := sypas.CodeOK; c <= sypas.CodePermission; c++ {
		want := c
		if w, ok := shared[c]; ok {
			want = w
		}
		assert.Equal(t, want, wireCode(grpcCode(c)), "%v", c)
	}
	assert.Equal(t, codes.Internal, grpcCode(sypas.Code(200)))
}

// FuzzSessionMessage feeds the raw codec a hostile peer's messages, split
// into buffers anywhere: it never panics, and what it accepts is a
// BytesValue that encodes back to the same bytes.
func FuzzSessionMessage(f *testing.F) {
	for _, b := range [][]byte{nil, {bytesValueTag, 0}, {bytesValueTag, 3, 'a', 'b', 'c'}, {bytesValueTag, 0x80, 1}, {2<<3 | 2, 1, 'x'}} {
		f.Add(b, uint8(1))
	}
	c := encoding.GetCodecV2(CodecName)
	f.Fuzz(func(t *testing.T, b []byte, split uint8) {
		var ch chunk
		if err := c.Unmarshal(splitBuffers(b, int(split)), &ch); err != nil {
			return
		}
		out, err := c.Marshal(&chunk{b: ch.b})
		require.NoError(t, err)
		if len(ch.b) == 0 {
			assert.Empty(t, out.Materialize())
			return
		}
		assert.Equal(t, b, out.Materialize())
	})
}

// A failure that is not a *sypas.Error (a deadline, say) gets the status
// of the code its sypas-code trailer names, not Internal.
func TestToStatusFollowsCodeOf(t *testing.T) {
	for _, err := range []error{context.DeadlineExceeded, &sypas.Error{Code: sypas.CodePermission}, errors.New("boom")} {
		assert.Equal(t, grpcCode(sypas.CodeOf(err)), status.Code(toStatus(err)), "%v", err)
	}
}
