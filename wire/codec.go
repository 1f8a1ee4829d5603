package wire

import (
	"encoding/binary"
	"fmt"
	"slices"

	"github.com/sypas/go/frame"
)

var le = binary.LittleEndian

// Message is implemented by every payload type of this package. Decode
// fills the receiver from a payload (keeping views into it, see each
// type); Append appends the payload encoding; Len is the encoded length.
type Message interface {
	Type() frame.Type
	Len() int
	Append(b []byte) ([]byte, error)
	Decode(payload []byte) error
}

// AppendFrame appends a complete frame carrying m to b: h with its Type
// set to m.Type() and its lengths set from m, then the payload, encoded in
// place (no intermediate buffer, no allocation when b has room). The
// checksum is computed when h.Flags has frame.FlagChecksum. On error b is
// returned unchanged.
func AppendFrame(b []byte, h frame.Header, m Message) ([]byte, error) {
	return AppendFrameExt(b, h, nil, m)
}

// AppendFrameExt is AppendFrame with ext (nil, or a multiple of 8 bytes)
// as the frame's header extension, HeaderLen set to match.
func AppendFrameExt(b []byte, h frame.Header, ext []byte, m Message) ([]byte, error) {
	n := m.Len()
	if n > frame.HardMaxPayload {
		return b, fmt.Errorf("sypas: %v payload of %d bytes: %w", m.Type(), n, ErrTooLarge)
	}
	hl := frame.HeaderSize + len(ext)
	h.Type = m.Type()
	h.HeaderLen = uint16(hl)
	h.PayloadLen = uint32(n)
	off := len(b)
	b = slices.Grow(b, hl+n)
	out := b[:off+hl]
	if err := h.Put(out[off:]); err != nil {
		return b[:off], err
	}
	copy(out[off+frame.HeaderSize:], ext)
	out, err := m.Append(out)
	if err != nil {
		return b[:off], err
	}
	if len(out) != off+hl+n {
		return b[:off], fmt.Errorf("sypas: %v: Len %d disagrees with Append %d: %w", m.Type(), n, len(out)-off-hl, ErrInternal)
	}
	if h.Flags.Has(frame.FlagChecksum) {
		if err := frame.SetChecksum(out[off:]); err != nil {
			return b[:off], err
		}
	}
	return out, nil
}

// NewMessage returns a new zero payload struct for frame type t, or nil if
// t has no payload codec (an unknown type). It allocates; dispatchers on a
// hot path keep one struct per type instead.
func NewMessage(t frame.Type) Message {
	switch t {
	case frame.TypeRequest:
		return new(Request)
	case frame.TypeResponse:
		return new(Response)
	case frame.TypeEvent:
		return new(Event)
	case frame.TypeSubscribe:
		return new(Subscribe)
	case frame.TypeUnsubscribe:
		return new(Unsubscribe)
	case frame.TypeError:
		return new(ErrorMsg)
	case frame.TypeHeartbeat:
		return new(Heartbeat)
	case frame.TypeBulk:
		return new(Bulk)
	case frame.TypeGoAway:
		return new(GoAway)
	case frame.TypeHello:
		return new(Hello)
	case frame.TypeWelcome:
		return new(Welcome)
	case frame.TypeToken:
		return new(Token)
	case frame.TypeTokenRefresh:
		return new(TokenRefresh)
	case frame.TypeRegions:
		return new(Regions)
	}
	return nil
}

// DecodeFrame decodes the payload of f into m after checking that f
// carries m's type. The views m keeps point into f.Payload.
func DecodeFrame(f *frame.Frame, m Message) error {
	if f.Type != m.Type() {
		return fmt.Errorf("%w: %v frame decoded as %v", ErrMalformed, f.Type, m.Type())
	}
	return m.Decode(f.Payload)
}

// decoder reads a payload front to back. Each byte is read once; a short
// read records ErrTruncated and every later read returns zero values, so a
// Decode method can read all fields and check d.err once.
type decoder struct {
	b   []byte
	off int
	t   frame.Type
	err error
}

func (d *decoder) need(n int) bool {
	if d.err != nil {
		return false
	}
	if n < 0 || len(d.b)-d.off < n {
		d.err = fmt.Errorf("%v: %d bytes at offset %d, need %d: %w", d.t, len(d.b)-d.off, d.off, n, ErrTruncated)
		return false
	}
	return true
}

func (d *decoder) u8() uint8 {
	if !d.need(1) {
		return 0
	}
	v := d.b[d.off]
	d.off++
	return v
}

func (d *decoder) u16() uint16 {
	if !d.need(2) {
		return 0
	}
	v := le.Uint16(d.b[d.off:])
	d.off += 2
	return v
}

func (d *decoder) u32() uint32 {
	if !d.need(4) {
		return 0
	}
	v := le.Uint32(d.b[d.off:])
	d.off += 4
	return v
}

func (d *decoder) u64() uint64 {
	if !d.need(8) {
		return 0
	}
	v := le.Uint64(d.b[d.off:])
	d.off += 8
	return v
}

// bytes returns a view of the next n bytes (nil when n is 0), capped so
// that appending to it cannot overwrite what follows.
func (d *decoder) bytes(n int) []byte {
	if !d.need(n) || n == 0 {
		return nil
	}
	v := d.b[d.off : d.off+n : d.off+n]
	d.off += n
	return v
}

// rest returns a view of the remaining bytes (nil when none).
func (d *decoder) rest() []byte {
	if d.err != nil {
		return nil
	}
	return d.bytes(len(d.b) - d.off)
}

// invalid records a field error (the first one wins).
func (d *decoder) invalid(format string, args ...any) {
	if d.err == nil {
		d.err = fmt.Errorf("%v: %s: %w", d.t, fmt.Sprintf(format, args...), ErrMalformed)
	}
}

// strict returns the decoding error, or ErrTrailing if bytes are left.
func (d *decoder) strict() error {
	if d.err == nil && d.off != len(d.b) {
		d.err = fmt.Errorf("%v: %d bytes after the last field: %w", d.t, len(d.b)-d.off, ErrTrailing)
	}
	return d.err
}

// tooLong is the encoding error for an over-long field.
func tooLong(t frame.Type, field string, n, limit int) error {
	return fmt.Errorf("sypas: %v %s of %d bytes exceeds %d: %w", t, field, n, limit, ErrFieldTooLong)
}

// invalidField is the encoding error for a field value a decoder would
// reject.
func invalidField(t frame.Type, format string, args ...any) error {
	return fmt.Errorf("sypas: %v: %s: %w", t, fmt.Sprintf(format, args...), ErrMalformed)
}

// nilIfEmpty normalises views so that decoded structs compare equal.
func nilIfEmpty(b []byte) []byte {
	if len(b) == 0 {
		return nil
	}
	return b
}
