package sypasgrpc

import (
	"encoding/binary"
	"errors"
	"fmt"

	"google.golang.org/grpc/encoding"
	gproto "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
)

// CodecName is the content subtype of the Session stream of SYPAS's own
// client ("application/grpc+sypas"). Its messages are exactly what the
// proto codec makes of a google.protobuf.BytesValue (field 1, bytes), so
// the wire is the same whichever codec a peer uses; this one only skips
// protobuf's reflection and copies the bytes once. It is registered with
// grpc's codec registry when the package is loaded, under its own name: the
// health and reflection services, and any call made without
// grpc.CallContentSubtype(CodecName), keep the proto codec.
const CodecName = "sypas"

func init() { encoding.RegisterCodecV2(codec{}) }

// chunk is a message of the Session stream as this package sends and
// receives it: a run of the session's byte stream.
type chunk struct {
	b []byte
}

// codec encodes a *chunk as a BytesValue, and falls back to the proto
// codec for anything else (a stock client's BytesValue, should one reach
// this codec).
type codec struct{}

func (codec) Name() string { return CodecName }

// maxHeader is a BytesValue's header at most: the tag and a 10-byte varint.
const maxHeader = 1 + binary.MaxVarintLen64

// bytesValueTag is field 1, wire type 2 (length-delimited).
const bytesValueTag = 1<<3 | 2

func (codec) Marshal(v any) (mem.BufferSlice, error) {
	c, ok := v.(*chunk)
	if !ok {
		return protoCodec().Marshal(v)
	}
	if len(c.b) == 0 { // proto3 omits an empty value: an empty message
		return nil, nil
	}
	n := 1 + protowire.SizeBytes(len(c.b))
	pool := mem.DefaultBufferPool()
	if mem.IsBelowBufferPoolingThreshold(n) {
		return mem.BufferSlice{mem.SliceBuffer(appendChunk(make([]byte, 0, n), c.b))}, nil
	}
	buf := pool.Get(n)
	*buf = appendChunk((*buf)[:0], c.b)
	return mem.BufferSlice{mem.NewBuffer(buf, pool)}, nil
}

// appendChunk appends b to dst as a BytesValue: the tag, then the bytes
// length-prefixed.
func appendChunk(dst, b []byte) []byte {
	return protowire.AppendBytes(append(dst, bytesValueTag), b)
}

// errNotBytesValue is a Session message that is not a BytesValue with at
// most field 1.
var errNotBytesValue = errors.New("sypasgrpc: a Session message is not a google.protobuf.BytesValue")

// Unmarshal copies the value of the BytesValue in data into c.b (reusing
// its memory): grpc frees data when Unmarshal returns.
func (codec) Unmarshal(data mem.BufferSlice, v any) error {
	c, ok := v.(*chunk)
	if !ok {
		return protoCodec().Unmarshal(data, v)
	}
	size := data.Len()
	if size == 0 {
		c.b = c.b[:0]
		return nil
	}
	var hdr [maxHeader]byte
	h := hdr[:readPrefix(hdr[:], data)]
	if h[0] != bytesValueTag {
		return fmt.Errorf("%w: tag %#x", errNotBytesValue, h[0])
	}
	l, k := binary.Uvarint(h[1:])
	if k <= 0 || uint64(size-1-k) != l {
		return fmt.Errorf("%w: a value of %d bytes in a message of %d", errNotBytesValue, l, size)
	}
	c.b = copyFrom(c.b[:0], data, 1+k, int(l))
	return nil
}

// readPrefix copies the first bytes of data into dst, and says how many.
func readPrefix(dst []byte, data mem.BufferSlice) int {
	n := 0
	for _, b := range data {
		n += copy(dst[n:], b.ReadOnlyData())
		if n == len(dst) {
			break
		}
	}
	return n
}

// copyFrom appends the n bytes of data from offset off to dst.
func copyFrom(dst []byte, data mem.BufferSlice, off, n int) []byte {
	dst = growTo(dst, n)
	w := 0
	for _, b := range data {
		d := b.ReadOnlyData()
		if off >= len(d) {
			off -= len(d)
			continue
		}
		w += copy(dst[w:], d[off:])
		off = 0
	}
	return dst
}

// growTo returns b resized to n bytes, reusing its memory when it can.
func growTo(b []byte, n int) []byte {
	if cap(b) < n {
		return make([]byte, n)
	}
	return b[:n]
}

func protoCodec() encoding.CodecV2 { return encoding.GetCodecV2(gproto.Name) }
