package frame

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"slices"
)

// Wire constants. See docs/PROTOCOL.md, section 2.
const (
	// Magic is the first four header bytes, "SYPS", read as a
	// little-endian uint32.
	Magic uint32 = 'S' | 'Y'<<8 | 'P'<<16 | 'S'<<24
	// Version is the only header version this package encodes and decodes.
	Version = 1
	// HeaderSize is the size of the fixed header. It is a multiple of 8 so
	// that a payload starts 8-byte aligned in an 8-byte-aligned ring record.
	HeaderSize = 48
	// MaxHeaderLen is the largest header length (fixed header plus
	// extension) a version 1 decoder accepts.
	MaxHeaderLen = 256
	// DefaultMaxPayload is the default payload limit: the inline limit of
	// the rings. Larger messages travel in bulk memory (BULK frames).
	DefaultMaxPayload = 64 << 10
	// HardMaxPayload is the absolute payload limit. No Config may raise the
	// limit above it and no encoder produces a larger payload.
	HardMaxPayload = 16 << 20
	// MaxFrameLen is the largest frame any Config admits.
	MaxFrameLen = MaxHeaderLen + HardMaxPayload
)

// Header byte offsets (docs/PROTOCOL.md, section 2.1).
const (
	offMagic       = 0
	offVersion     = 4
	offType        = 5
	offFlags       = 6
	offHeaderLen   = 8
	offReserved    = 10
	offPayloadLen  = 12
	offStreamID    = 16
	offChecksum    = 20
	offSequence    = 24
	offCorrelation = 32
	offCapRef      = 40
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Config holds a receiver's decoding limits. The zero value means the
// documented defaults.
type Config struct {
	// MaxPayload is the largest payload accepted, in bytes. 0 means
	// DefaultMaxPayload; it must not exceed HardMaxPayload (values above it
	// are clamped by the decoder and rejected by Validate).
	MaxPayload int
	// RequireChecksum rejects frames without FlagChecksum (ErrChecksum).
	// Useful on TCP, where the peer is not on the same host.
	RequireChecksum bool
}

// Validate reports whether c is usable (ErrConfig otherwise).
func (c Config) Validate() error {
	if c.MaxPayload < 0 || c.MaxPayload > HardMaxPayload {
		return fmt.Errorf("%w: MaxPayload %d outside [0, %d]", ErrConfig, c.MaxPayload, HardMaxPayload)
	}
	return nil
}

// Limit returns the effective payload limit of c.
func (c Config) Limit() int {
	switch {
	case c.MaxPayload <= 0:
		return DefaultMaxPayload
	case c.MaxPayload > HardMaxPayload:
		return HardMaxPayload
	}
	return c.MaxPayload
}

// Header is the decoded fixed header. Version, magic, the checksum and the
// reserved field are not kept: they are validated, and re-derived when
// encoding.
type Header struct {
	Type  Type
	Flags Flags
	// HeaderLen is the length of the header including the extension, a
	// multiple of 8 in [HeaderSize, MaxHeaderLen]. Set by decoding;
	// Frame encoding derives it from len(Extension).
	HeaderLen uint16
	// PayloadLen is the payload length. Set by decoding; Frame encoding
	// derives it from len(Payload).
	PayloadLen uint32
	// StreamID is the logical stream (channel); 0 is the connection.
	StreamID uint32
	// Sequence is the sender's per-direction frame counter.
	Sequence uint64
	// Correlation links a REQUEST to its RESPONSE/ERROR; 0 means none.
	Correlation uint64
	// CapRef is the capability reference: the id of the token the kernel
	// minted for this session; 0 means none (control frames before TOKEN).
	CapRef uint64
}

// FrameLen returns the frame length announced by the header, HeaderLen +
// PayloadLen. (Frame.Len, by contrast, is computed from the slices.)
func (h *Header) FrameLen() int { return int(h.HeaderLen) + int(h.PayloadLen) }

// Decode reads and validates the fixed header at the start of b; it does
// not need the extension or payload bytes to be present and does not
// verify the checksum (Frame.Decode does). On error *h is zeroed.
func (h *Header) Decode(b []byte, cfg Config) error {
	_, err := h.decode(b, cfg)
	return err
}

// decode reads every field of the fixed header from b exactly once into h
// and validates the private copy. It returns the checksum field.
func (h *Header) decode(b []byte, cfg Config) (uint32, error) {
	if len(b) < HeaderSize {
		*h = Header{}
		// Garbage fails as garbage even when short (as in Reader).
		if len(b) >= 4 {
			if m := binary.LittleEndian.Uint32(b); m != Magic {
				return 0, fmt.Errorf("%w: %#08x", ErrBadMagic, m)
			}
		}
		return 0, fmt.Errorf("%w: %d bytes, fixed header needs %d", ErrTruncated, len(b), HeaderSize)
	}
	b = b[:HeaderSize:HeaderSize]
	// Three 8-byte loads cover the fields that need checking, so the
	// checks are a few masked compares; every field is still read once.
	w0 := binary.LittleEndian.Uint64(b[offMagic:])     // magic, version, type, flags
	w1 := binary.LittleEndian.Uint64(b[offHeaderLen:]) // header_len, reserved, payload_len
	w2 := binary.LittleEndian.Uint64(b[offStreamID:])  // stream_id, checksum
	h.Type = Type(w0 >> 40)
	h.Flags = Flags(w0 >> 48)
	h.HeaderLen = uint16(w1)
	h.PayloadLen = uint32(w1 >> 32)
	h.StreamID = uint32(w2)
	h.Sequence = binary.LittleEndian.Uint64(b[offSequence:])
	h.Correlation = binary.LittleEndian.Uint64(b[offCorrelation:])
	h.CapRef = binary.LittleEndian.Uint64(b[offCapRef:])
	crc := uint32(w2 >> 32)
	// From here on only the private copies are used. typeFlags[t] is zero
	// for an unknown type (every known type allows FlagChecksum), so one
	// lookup checks the type and its flags. The fast path is one branch;
	// the error is built out of line so that decode stays small.
	allowed := typeFlags[uint8(w0>>40)]
	if w0&(1<<40-1) != uint64(Version)<<32|uint64(Magic) ||
		allowed == 0 || h.Flags&^allowed != 0 ||
		h.HeaderLen-HeaderSize > MaxHeaderLen-HeaderSize || h.HeaderLen%8 != 0 ||
		uint16(w1>>16) != 0 || uint64(h.PayloadLen) > uint64(cfg.Limit()) ||
		(h.Flags&FlagChecksum == 0 && (crc != 0 || cfg.RequireChecksum)) {
		return 0, h.invalid(uint32(w0), uint8(w0>>32), uint16(w1>>16), crc, cfg)
	}
	return crc, nil
}

// invalid builds the error for a header that failed validation, checking
// in the order of docs/PROTOCOL.md 2.5, and zeroes h.
//
//go:noinline
func (h *Header) invalid(magic uint32, version uint8, reserved uint16, crc uint32, cfg Config) error {
	var err error
	switch {
	case magic != Magic:
		err = fmt.Errorf("%w: %#08x", ErrBadMagic, magic)
	case version != Version:
		err = fmt.Errorf("%w: %d", ErrVersion, version)
	default:
		err = h.validate(cfg.Limit())
		if err == nil && reserved != 0 {
			err = fmt.Errorf("%w: header bytes 10..11 = %#04x", ErrReserved, reserved)
		}
		if err == nil && !h.Flags.Has(FlagChecksum) {
			if crc != 0 {
				err = fmt.Errorf("%w: checksum field %#08x without CHECKSUM flag", ErrReserved, crc)
			} else if cfg.RequireChecksum {
				err = fmt.Errorf("%w: CHECKSUM flag required", ErrChecksum)
			}
		}
	}
	if err == nil { // unreachable while the fast path mirrors the checks above
		err = fmt.Errorf("%w: header rejected", ErrReserved)
	}
	*h = Header{}
	return err
}

// validate checks the fields common to decoding and encoding.
func (h *Header) validate(limit int) error {
	switch {
	case !h.Type.Valid():
		return fmt.Errorf("%w: %v", ErrBadType, h.Type)
	case h.Flags&^h.Type.AllowedFlags() != 0:
		return fmt.Errorf("%w: %v on %v", ErrBadFlags, h.Flags, h.Type)
	case h.HeaderLen < HeaderSize || h.HeaderLen > MaxHeaderLen || h.HeaderLen%8 != 0:
		return fmt.Errorf("%w: %d", ErrHeaderLen, h.HeaderLen)
	case uint64(h.PayloadLen) > uint64(limit):
		return fmt.Errorf("%w: %d bytes, limit %d", ErrTooLarge, h.PayloadLen, limit)
	}
	return nil
}

// Put writes the fixed header h into dst[:HeaderSize] with a zero checksum
// field. A zero HeaderLen means HeaderSize. It is the building block for
// frames assembled in place (see the package comment): the caller writes
// any extension at dst[HeaderSize:HeaderLen] and the payload at
// dst[HeaderLen:], then calls SetChecksum if FlagChecksum is set.
func (h *Header) Put(dst []byte) error {
	hh := *h
	if hh.HeaderLen == 0 {
		hh.HeaderLen = HeaderSize
	}
	if err := hh.validate(HardMaxPayload); err != nil {
		return err
	}
	if len(dst) < HeaderSize {
		return fmt.Errorf("frame: %w: %d bytes, header needs %d", ErrShortBuffer, len(dst), HeaderSize)
	}
	hh.put(dst, 0)
	return nil
}

func (h *Header) put(b []byte, crc uint32) {
	b = b[:HeaderSize:HeaderSize]
	binary.LittleEndian.PutUint32(b[offMagic:], Magic)
	b[offVersion] = Version
	b[offType] = byte(h.Type)
	binary.LittleEndian.PutUint16(b[offFlags:], uint16(h.Flags))
	binary.LittleEndian.PutUint16(b[offHeaderLen:], h.HeaderLen)
	binary.LittleEndian.PutUint16(b[offReserved:], 0)
	binary.LittleEndian.PutUint32(b[offPayloadLen:], h.PayloadLen)
	binary.LittleEndian.PutUint32(b[offStreamID:], h.StreamID)
	binary.LittleEndian.PutUint32(b[offChecksum:], crc)
	binary.LittleEndian.PutUint64(b[offSequence:], h.Sequence)
	binary.LittleEndian.PutUint64(b[offCorrelation:], h.Correlation)
	binary.LittleEndian.PutUint64(b[offCapRef:], h.CapRef)
}

// zeroCRC stands in for the checksum field while hashing. (A package
// variable: slices passed to crc32.Update escape, so a stack array would be
// allocated on every call.)
var zeroCRC [4]byte

// checksum is the CRC32C of the frame b (exactly one frame, header
// included) with the checksum field taken as zero.
func checksum(b []byte) uint32 {
	c := crc32.Update(0, castagnoli, b[:offChecksum])
	c = crc32.Update(c, castagnoli, zeroCRC[:])
	return crc32.Update(c, castagnoli, b[offChecksum+4:])
}

// SetChecksum computes the CRC32C of the frame at the start of b, which
// must have FlagChecksum set, and stores it in the header. It is for frames
// assembled in place with Header.Put; Append and EncodeTo do it themselves.
func SetChecksum(b []byte) error {
	var h Header
	if _, err := h.decode(b, Config{MaxPayload: HardMaxPayload}); err != nil {
		return err
	}
	if !h.Flags.Has(FlagChecksum) {
		return fmt.Errorf("%w: SetChecksum on a frame without CHECKSUM flag", ErrBadFlags)
	}
	n := h.FrameLen()
	if len(b) < n {
		return fmt.Errorf("%w: %d bytes, frame needs %d", ErrTruncated, len(b), n)
	}
	binary.LittleEndian.PutUint32(b[offChecksum:], checksum(b[:n]))
	return nil
}

// Frame is a header with its extension and payload. After Decode,
// Extension and Payload are views into the decoded buffer (nil when empty).
type Frame struct {
	Header
	// Extension holds header bytes beyond the fixed header (HeaderLen -
	// HeaderSize bytes, a multiple of 8). Version 1 defines none: decoders
	// skip it, encoders normally leave it empty; it is kept so that a frame
	// can be forwarded unchanged.
	Extension []byte
	// Payload is the frame payload, encoded as its Type says.
	Payload []byte
}

// Len returns the encoded length of f: HeaderSize + len(Extension) +
// len(Payload).
func (f *Frame) Len() int { return HeaderSize + len(f.Extension) + len(f.Payload) }

// header returns the header to encode: f.Header with the lengths derived
// from the slices, validated against the hard limits.
func (f *Frame) header() (Header, error) {
	h := f.Header
	if len(f.Payload) > HardMaxPayload {
		return h, fmt.Errorf("%w: %d bytes, hard limit %d", ErrTooLarge, len(f.Payload), HardMaxPayload)
	}
	if hl := HeaderSize + len(f.Extension); hl > MaxHeaderLen || len(f.Extension)%8 != 0 {
		return h, fmt.Errorf("%w: extension of %d bytes", ErrHeaderLen, len(f.Extension))
	}
	h.HeaderLen = uint16(HeaderSize + len(f.Extension))
	h.PayloadLen = uint32(len(f.Payload))
	return h, h.validate(HardMaxPayload)
}

// Append appends the encoding of f to b and returns the extended slice. It
// allocates only when cap(b)-len(b) < f.Len(). HeaderLen and PayloadLen are
// derived from Extension and Payload; the checksum is computed when
// FlagChecksum is set. On error b is returned unchanged.
func (f *Frame) Append(b []byte) ([]byte, error) {
	h, err := f.header()
	if err != nil {
		return b, err
	}
	n := h.FrameLen()
	b = slices.Grow(b, n)
	off := len(b)
	b = b[:off+n]
	f.put(&h, b[off:])
	return b, nil
}

// EncodeTo writes the encoding of f to the start of dst (for example a
// reserved ring slot) and returns the number of bytes written, f.Len().
// It returns ErrShortBuffer if dst is too small.
func (f *Frame) EncodeTo(dst []byte) (int, error) {
	h, err := f.header()
	if err != nil {
		return 0, err
	}
	n := h.FrameLen()
	if len(dst) < n {
		return 0, fmt.Errorf("frame: %w: %d bytes, frame needs %d", ErrShortBuffer, len(dst), n)
	}
	f.put(&h, dst[:n])
	return n, nil
}

// put writes the frame into b, which is exactly h.FrameLen() bytes.
func (f *Frame) put(h *Header, b []byte) {
	h.put(b, 0)
	copy(b[HeaderSize:], f.Extension)
	copy(b[h.HeaderLen:], f.Payload)
	if h.Flags.Has(FlagChecksum) {
		binary.LittleEndian.PutUint32(b[offChecksum:], checksum(b))
	}
}

// Decode decodes the frame at the start of b into f and returns its length;
// bytes after it (ring padding, the next frame) are not examined. Every
// header field is read from b exactly once and validated before use: magic,
// version, type, flags (known and allowed for the type), header length,
// reserved fields, payload length against cfg and against len(b), and the
// CRC32C when FlagChecksum is set. Nothing is allocated.
//
// The checksum detects accidental corruption (a torn or stale ring record,
// a broken stream); it is not a defence against a hostile peer, which can
// compute it too.
//
// On success f.Extension and f.Payload are views into b: they are valid for
// as long as b is and must not be retained past the caller's ownership of
// b (for a ring record: until the record is released). If b is shared
// memory the peer can still change the bytes under those views after
// Decode returned — even after the checksum was verified — so payload
// decoders must treat them as untrusted too; the header fields in f are
// private copies and do not change. On error *f is zeroed.
func (f *Frame) Decode(b []byte, cfg Config) (int, error) {
	crc, err := f.Header.decode(b, cfg)
	if err != nil {
		*f = Frame{}
		return 0, err
	}
	hl, n := int(f.HeaderLen), f.FrameLen()
	if len(b) < n {
		*f = Frame{}
		return 0, fmt.Errorf("%w: %d bytes, frame needs %d", ErrTruncated, len(b), n)
	}
	f.Extension, f.Payload = nil, nil
	if hl > HeaderSize {
		f.Extension = b[HeaderSize:hl:hl]
	}
	if n > hl {
		f.Payload = b[hl:n:n]
	}
	if f.Flags.Has(FlagChecksum) {
		// Hashes the bytes of b; the header fields are not re-read.
		if got := checksum(b[:n]); got != crc {
			*f = Frame{}
			return 0, fmt.Errorf("%w: header says %#08x, frame hashes to %#08x", ErrChecksum, crc, got)
		}
	}
	return n, nil
}

// String formats the header for logs: "REQUEST flags=CHECKSUM stream=1
// seq=7 corr=42 cap=0x1 len=48+16".
func (h Header) String() string {
	return fmt.Sprintf("%v flags=%v stream=%d seq=%d corr=%d cap=%#x len=%d+%d",
		h.Type, h.Flags, h.StreamID, h.Sequence, h.Correlation, h.CapRef, h.HeaderLen, h.PayloadLen)
}
