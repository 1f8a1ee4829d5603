package frame

import (
	"errors"
	"io"
)

// Sentinel errors. Decoding and encoding errors wrap exactly one of these
// (with detail such as the offending value); match them with [errors.Is].
var (
	// ErrBadMagic: the first four bytes are not "SYPS". On a byte stream
	// this means the framing is lost; the stream must be closed.
	ErrBadMagic = errors.New("frame: bad magic")
	// ErrVersion: the header version is not one this package decodes.
	ErrVersion = errors.New("frame: unsupported version")
	// ErrBadType: the type is zero or not defined by this version.
	ErrBadType = errors.New("frame: unknown type")
	// ErrBadFlags: a flag bit is unknown or not allowed for the type.
	ErrBadFlags = errors.New("frame: invalid flags")
	// ErrHeaderLen: the header length is below HeaderSize, above
	// MaxHeaderLen or not a multiple of 8.
	ErrHeaderLen = errors.New("frame: invalid header length")
	// ErrReserved: a reserved field is not zero.
	ErrReserved = errors.New("frame: reserved field not zero")
	// ErrTooLarge: the payload length exceeds the configured limit (or
	// HardMaxPayload when encoding).
	ErrTooLarge = errors.New("frame: payload too large")
	// ErrTruncated: the buffer holds fewer bytes than the header announces.
	ErrTruncated = errors.New("frame: truncated")
	// ErrChecksum: the CRC32C does not match, or a checksum is required by
	// the Config and absent.
	ErrChecksum = errors.New("frame: checksum mismatch")
	// ErrConfig: a Config field is out of range.
	ErrConfig = errors.New("frame: invalid config")
	// ErrShortBuffer: the destination slice is too small for the encoding.
	ErrShortBuffer = io.ErrShortBuffer
)

// ErrShort is an alias of ErrTruncated.
var ErrShort = ErrTruncated
