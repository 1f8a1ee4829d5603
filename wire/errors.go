package wire

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/sypas/go/frame"
	"github.com/sypas/go/ring"
)

// Code is a SYPAS error code, carried by ERROR and GOAWAY payloads
// (docs/PROTOCOL.md, section 4).
//
// An *Error carrying a code matches the sentinel of that code (ErrAuth,
// ErrResource, ...) with errors.Is.
type Code uint16

// Error codes of protocol version 1. Receivers must accept unknown codes
// (they are fatal).
const (
	CodeOK          Code = 0  // no error; only in GOAWAY (normal shutdown)
	CodeProto       Code = 1  // E_PROTO: malformed or unexpected frame
	CodeAuth        Code = 2  // E_AUTH: token missing, invalid or expired
	CodeResource    Code = 3  // E_RESOURCE: out of ring space, memory, slots
	CodeInternal    Code = 4  // E_INTERNAL: the peer failed internally
	CodeNotFound    Code = 5  // E_NOT_FOUND: no such method, topic, region
	CodeTimeout     Code = 6  // E_TIMEOUT: the request's deadline passed
	CodeUnavailable Code = 7  // E_UNAVAILABLE: the service is not serving now
	CodeTooLarge    Code = 8  // E_TOO_LARGE: payload above the peer's limit
	CodeVersion     Code = 9  // E_VERSION: no common protocol version
	CodeClosed      Code = 10 // E_CLOSED: the session is closed/closing
	CodePermission  Code = 11 // E_PERMISSION: token valid but lacks the right
)

var codeNames = [...]string{
	CodeOK:          "E_OK",
	CodeProto:       "E_PROTO",
	CodeAuth:        "E_AUTH",
	CodeResource:    "E_RESOURCE",
	CodeInternal:    "E_INTERNAL",
	CodeNotFound:    "E_NOT_FOUND",
	CodeTimeout:     "E_TIMEOUT",
	CodeUnavailable: "E_UNAVAILABLE",
	CodeTooLarge:    "E_TOO_LARGE",
	CodeVersion:     "E_VERSION",
	CodeClosed:      "E_CLOSED",
	CodePermission:  "E_PERMISSION",
}

// Codes returns every code defined by protocol version 1.
func Codes() []Code {
	cs := make([]Code, len(codeNames))
	for i := range cs {
		cs[i] = Code(i)
	}
	return cs
}

// Known reports whether c is defined by protocol version 1.
func (c Code) Known() bool { return int(c) < len(codeNames) }

// String returns the protocol name ("E_AUTH") or "Code(0x0100)".
func (c Code) String() string {
	if c.Known() {
		return codeNames[c]
	}
	return fmt.Sprintf("Code(%#04x)", uint16(c))
}

// RetryClass tells a caller what to do about an error.
type RetryClass uint8

const (
	// Fatal: retrying the same operation cannot succeed.
	Fatal RetryClass = iota
	// Transient: retry later (with backoff, honouring RetryAfter).
	Transient
	// Reauthenticate: obtain a fresh token (TOKEN_REFRESH or a new
	// attestation), then retry.
	Reauthenticate
)

func (r RetryClass) String() string {
	switch r {
	case Fatal:
		return "fatal"
	case Transient:
		return "transient"
	case Reauthenticate:
		return "reauthenticate"
	}
	return fmt.Sprintf("RetryClass(%d)", uint8(r))
}

// Class returns the retry class of c. Unknown codes are Fatal.
func (c Code) Class() RetryClass {
	switch c {
	case CodeResource, CodeInternal, CodeTimeout, CodeUnavailable:
		return Transient
	case CodeAuth:
		return Reauthenticate
	}
	return Fatal
}

// Sentinels, one per code, for errors.Is. Each is an *Error with only its
// Code set; any *Error with the same Code matches it.
var (
	ErrProto       error = &Error{Code: CodeProto}
	ErrAuth        error = &Error{Code: CodeAuth}
	ErrResource    error = &Error{Code: CodeResource}
	ErrInternal    error = &Error{Code: CodeInternal}
	ErrNotFound    error = &Error{Code: CodeNotFound}
	ErrTimeout     error = &Error{Code: CodeTimeout}
	ErrUnavailable error = &Error{Code: CodeUnavailable}
	ErrTooLarge    error = &Error{Code: CodeTooLarge}
	ErrVersion     error = &Error{Code: CodeVersion}
	ErrClosed      error = &Error{Code: CodeClosed}
	ErrPermission  error = &Error{Code: CodePermission}
)

// sentinels are the sentinels above in code order, for CodeOf.
var sentinels = [...]error{ErrProto, ErrAuth, ErrResource, ErrInternal, ErrNotFound, ErrTimeout,
	ErrUnavailable, ErrTooLarge, ErrVersion, ErrClosed, ErrPermission}

// Error is a SYPAS error as a Go error: what an ERROR frame carries, or
// what a local operation reports with a protocol code. It matches the
// sentinel of its Code (errors.Is(err, ErrAuth)) and, if Err is set, what
// Err matches.
type Error struct {
	Code       Code
	Message    string        // human-readable detail; may be empty
	RetryAfter time.Duration // hint for Transient errors; 0 = none
	Err        error         // local cause, never sent on the wire
}

func (e *Error) Error() string {
	s := "sypas: " + e.Code.String()
	if e.Message != "" {
		s += ": " + e.Message
	}
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

// Is matches the sentinel of e.Code: an *Error with the same Code and no
// Message, RetryAfter or Err.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Code == e.Code && t.Message == "" && t.RetryAfter == 0 && t.Err == nil
}

// Unwrap returns the local cause.
func (e *Error) Unwrap() error { return e.Err }

// Class returns the retry class of e.Code.
func (e *Error) Class() RetryClass { return e.Code.Class() }

// CodeOf returns the protocol code describing err, for replying with an
// ERROR frame: the Code of an *Error in the chain; else the code of the
// first sentinel (ErrProto, ErrAuth, ...) that err matches with errors.Is
// (how control's sentinels carry a code: control.ErrPeerGone is
// CodeUnavailable); CodeTooLarge for frame.ErrTooLarge, ring.ErrTooLarge and
// a short buffer; CodeVersion for frame.ErrVersion; CodeProto for malformed
// frames and payloads and ring.ErrCorrupt (the peer broke the ring);
// CodeTimeout for deadline errors; CodeClosed for os.ErrClosed (ring.ErrClosed)
// and ring.ErrPeerClosed; CodeInternal otherwise (a local bug such as
// ring.ErrInvalid is, to the peer, an internal failure). CodeOf(nil) is
// CodeOK.
func CodeOf(err error) Code {
	var e *Error
	switch {
	case err == nil:
		return CodeOK
	case errors.As(err, &e):
		return e.Code
	}
	for _, s := range sentinels {
		if errors.Is(err, s) {
			return s.(*Error).Code
		}
	}
	switch {
	case errors.Is(err, frame.ErrTooLarge), errors.Is(err, ring.ErrTooLarge), errors.Is(err, io.ErrShortBuffer):
		return CodeTooLarge
	case errors.Is(err, frame.ErrVersion):
		return CodeVersion
	case errors.Is(err, ErrMalformed), isFrameError(err), errors.Is(err, ring.ErrCorrupt):
		return CodeProto
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, os.ErrDeadlineExceeded):
		return CodeTimeout
	case errors.Is(err, os.ErrClosed), errors.Is(err, ring.ErrPeerClosed):
		return CodeClosed
	}
	return CodeInternal
}

func isFrameError(err error) bool {
	for _, s := range []error{frame.ErrBadMagic, frame.ErrBadType, frame.ErrBadFlags,
		frame.ErrHeaderLen, frame.ErrReserved, frame.ErrTruncated, frame.ErrChecksum} {
		if errors.Is(err, s) {
			return true
		}
	}
	return false
}

// ClassOf returns the retry class of err: that of CodeOf(err), except that
// an error matching os.ErrInvalid (a bad argument or configuration, such as
// ring.ErrInvalid or control.ErrConfig) is Fatal whatever its code, since no
// retry can fix it. nil is Fatal.
func ClassOf(err error) RetryClass {
	if err == nil || errors.Is(err, os.ErrInvalid) {
		return Fatal
	}
	return CodeOf(err).Class()
}

// Retryable reports whether err is Transient: the same operation may
// succeed later.
func Retryable(err error) bool { return err != nil && ClassOf(err) == Transient }

// NeedsReauth reports whether err asks for a fresh token before retrying.
func NeedsReauth(err error) bool { return err != nil && ClassOf(err) == Reauthenticate }

// Payload decoding errors. Every decoding failure wraps ErrMalformed;
// ErrTruncated and ErrTrailing (which also match ErrMalformed) say more.
var (
	ErrMalformed = errors.New("sypas: malformed payload")
	ErrTruncated = fmt.Errorf("%w: truncated", ErrMalformed)
	ErrTrailing  = fmt.Errorf("%w: trailing bytes", ErrMalformed)
	// ErrFieldTooLong is returned when encoding a field longer than its
	// limit (MaxNameLen, MaxMessageLen, ...). Decoding reports the same
	// condition as ErrMalformed.
	ErrFieldTooLong = errors.New("sypas: field too long")
)
