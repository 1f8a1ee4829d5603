package sypas

import "github.com/sypas/go/wire"

// Code is a SYPAS error code (docs/PROTOCOL.md §4). An error carrying one
// is an *Error; match it with errors.Is against the sentinels below.
type Code = wire.Code

// Error is a SYPAS error as a Go error: what an ERROR frame carries, or a
// local failure with a protocol code. A handler that returns an *Error
// answers with its Code and Message; any other error is answered
// E_INTERNAL without its text.
type Error = wire.Error

// RetryClass says what a caller may do about an error.
type RetryClass = wire.RetryClass

// The retry classes.
const (
	Fatal          = wire.Fatal
	Transient      = wire.Transient
	Reauthenticate = wire.Reauthenticate
)

// The error codes of protocol version 1.
const (
	CodeOK          = wire.CodeOK
	CodeProto       = wire.CodeProto
	CodeAuth        = wire.CodeAuth
	CodeResource    = wire.CodeResource
	CodeInternal    = wire.CodeInternal
	CodeNotFound    = wire.CodeNotFound
	CodeTimeout     = wire.CodeTimeout
	CodeUnavailable = wire.CodeUnavailable
	CodeTooLarge    = wire.CodeTooLarge
	CodeVersion     = wire.CodeVersion
	CodeClosed      = wire.CodeClosed
	CodePermission  = wire.CodePermission
)

// Sentinels, one per code: errors.Is(err, ErrAuth) holds for any *Error
// with CodeAuth, whoever produced it.
var (
	ErrProto       = wire.ErrProto
	ErrAuth        = wire.ErrAuth
	ErrResource    = wire.ErrResource
	ErrInternal    = wire.ErrInternal
	ErrNotFound    = wire.ErrNotFound
	ErrTimeout     = wire.ErrTimeout
	ErrUnavailable = wire.ErrUnavailable
	ErrTooLarge    = wire.ErrTooLarge
	ErrVersion     = wire.ErrVersion
	ErrClosed      = wire.ErrClosed
	ErrPermission  = wire.ErrPermission
)

// CodeOf returns the protocol code describing err (CodeOK for nil).
func CodeOf(err error) Code { return wire.CodeOf(err) }

// ClassOf returns the retry class of err.
func ClassOf(err error) RetryClass { return wire.ClassOf(err) }

// Retryable reports whether the same operation may succeed later.
func Retryable(err error) bool { return wire.Retryable(err) }

// errorf is an *Error with code and a formatted message.
func errorf(code Code, msg string) *Error { return &Error{Code: code, Message: msg} }
