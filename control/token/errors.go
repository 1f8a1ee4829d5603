package token

import "errors"

// ErrAuth matches every verification failure below through errors.Is, so the
// kernel can map them all to one wire error (E_AUTH) without telling a peer
// which check it failed.
var ErrAuth = errors.New("token: not authorized")

// ErrPermission additionally matches ErrRights and ErrScope: the token is
// authentic and valid but does not grant the operation. A kernel that
// distinguishes E_PERMISSION from E_AUTH (docs/PROTOCOL.md) tests it first.
var ErrPermission = errors.New("token: operation not granted")

// authError is a sentinel that also matches ErrAuth (and ErrPermission if
// perm). The sentinels are returned unwrapped on the hot path
// (Capability.Allows) so that a refusal allocates nothing.
type authError struct {
	msg  string
	perm bool
}

func (e *authError) Error() string { return e.msg }
func (e *authError) Is(target error) bool {
	return target == ErrAuth || (e.perm && target == ErrPermission)
}

// Verification failures. Each matches ErrAuth.
var (
	ErrMalformed   error = &authError{msg: "token: malformed"}
	ErrUnknownKey  error = &authError{msg: "token: unknown key id"}
	ErrForged      error = &authError{msg: "token: signature mismatch"}
	ErrExpired     error = &authError{msg: "token: expired"}
	ErrNotYetValid error = &authError{msg: "token: not yet valid"}
	ErrRevoked     error = &authError{msg: "token: revoked"}
	ErrSubject     error = &authError{msg: "token: subject does not match peer"}
	ErrRights      error = &authError{msg: "token: right not granted", perm: true}
	ErrScope       error = &authError{msg: "token: scope not granted", perm: true}
)
