package token

import "errors"

// ErrAuth matches every verification failure below through errors.Is, so the
// kernel can map them all to one wire error (E_AUTH) without telling a peer
// which check it failed.
var ErrAuth = errors.New("token: not authorized")

// authError is a sentinel that also matches ErrAuth. The sentinels are
// returned unwrapped on the hot path (Capability.Allows) so that a refusal
// allocates nothing.
type authError struct{ msg string }

func (e *authError) Error() string        { return e.msg }
func (e *authError) Is(target error) bool { return target == ErrAuth }

// Verification failures. Each matches ErrAuth.
var (
	ErrMalformed   error = &authError{"token: malformed"}
	ErrUnknownKey  error = &authError{"token: unknown key id"}
	ErrForged      error = &authError{"token: signature mismatch"}
	ErrExpired     error = &authError{"token: expired"}
	ErrNotYetValid error = &authError{"token: not yet valid"}
	ErrRevoked     error = &authError{"token: revoked"}
	ErrSubject     error = &authError{"token: subject does not match peer"}
	ErrRights      error = &authError{"token: right not granted"}
	ErrScope       error = &authError{"token: scope not granted"}
)
