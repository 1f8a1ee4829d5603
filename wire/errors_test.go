package wire

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/frame"
	"github.com/sypas/go/ring"
)

var errorsIs = errors.Is

func TestCodeStringsAndClasses(t *testing.T) {
	want := map[Code]struct {
		name  string
		class RetryClass
	}{
		CodeOK:          {"E_OK", Fatal},
		CodeProto:       {"E_PROTO", Fatal},
		CodeAuth:        {"E_AUTH", Reauthenticate},
		CodeResource:    {"E_RESOURCE", Transient},
		CodeInternal:    {"E_INTERNAL", Transient},
		CodeNotFound:    {"E_NOT_FOUND", Fatal},
		CodeTimeout:     {"E_TIMEOUT", Transient},
		CodeUnavailable: {"E_UNAVAILABLE", Transient},
		CodeTooLarge:    {"E_TOO_LARGE", Fatal},
		CodeVersion:     {"E_VERSION", Fatal},
		CodeClosed:      {"E_CLOSED", Fatal},
		CodePermission:  {"E_PERMISSION", Fatal},
	}
	require.Len(t, Codes(), len(want))
	for _, c := range Codes() {
		assert.Equal(t, want[c].name, c.String())
		assert.Equal(t, want[c].class, c.Class(), "%v", c)
		assert.True(t, c.Known())
	}
	assert.Equal(t, "Code(0x0100)", Code(0x100).String())
	assert.Equal(t, Fatal, Code(0x100).Class())
	assert.False(t, Code(0x100).Known())
	assert.Equal(t, "fatal transient reauthenticate RetryClass(9)", fmt.Sprint(Fatal, Transient, Reauthenticate, RetryClass(9)))
}

func TestErrorMatchesSentinels(t *testing.T) {
	sentinels := []error{ErrProto, ErrAuth, ErrResource, ErrInternal, ErrNotFound, ErrTimeout,
		ErrUnavailable, ErrTooLarge, ErrVersion, ErrClosed, ErrPermission}
	for i, s := range sentinels {
		code := s.(*Error).Code
		err := fmt.Errorf("calling: %w", &Error{Code: code, Message: "detail"})
		for j, o := range sentinels {
			assert.Equal(t, i == j, errors.Is(err, o), "%v is %v", err, o)
		}
		var e *Error
		require.ErrorAs(t, err, &e)
		assert.Equal(t, "detail", e.Message)
		assert.Equal(t, code, CodeOf(err))
		assert.Equal(t, Codes()[i+1], code, "sentinels in code order")
	}

	cause := io.ErrUnexpectedEOF
	err := &Error{Code: CodeUnavailable, Err: cause}
	assert.ErrorIs(t, err, cause)
	assert.ErrorIs(t, err, ErrUnavailable)
	assert.Equal(t, "sypas: E_UNAVAILABLE: unexpected EOF", err.Error())
	assert.Equal(t, "sypas: E_AUTH: expired", (&Error{Code: CodeAuth, Message: "expired"}).Error())
	assert.Equal(t, "sypas: E_AUTH", ErrAuth.Error())
	assert.False(t, errors.Is(ErrAuth, &Error{Code: CodeAuth, Message: "x"}), "only bare sentinels match")
}

func TestRetryHelpers(t *testing.T) {
	assert.True(t, Retryable(&Error{Code: CodeResource}))
	assert.True(t, Retryable(fmt.Errorf("x: %w", ErrTimeout)))
	assert.False(t, Retryable(&Error{Code: CodeAuth}))
	assert.True(t, NeedsReauth(&Error{Code: CodeAuth}))
	assert.False(t, NeedsReauth(ErrResource))
	assert.False(t, Retryable(nil))
	assert.False(t, NeedsReauth(nil))
	assert.Equal(t, Fatal, ClassOf(nil))
	assert.Equal(t, Fatal, ClassOf(&Error{Code: 0x7777}))
	assert.Equal(t, Transient, (&Error{Code: CodeInternal}).Class())
}

func TestCodeOf(t *testing.T) {
	var f frame.Frame
	_, badMagic := f.Decode(make([]byte, 64), frame.Config{})
	for _, tc := range []struct {
		err  error
		want Code
	}{
		{nil, CodeOK},
		{badMagic, CodeProto},
		{fmt.Errorf("x: %w", frame.ErrTooLarge), CodeTooLarge},
		{frame.ErrVersion, CodeVersion},
		{(&Unsubscribe{}).Decode(nil), CodeProto},
		{context.DeadlineExceeded, CodeTimeout},
		{os.ErrDeadlineExceeded, CodeTimeout},
		{os.ErrClosed, CodeClosed},
		{errors.New("disk on fire"), CodeInternal},
		{ErrNotFound, CodeNotFound},
	} {
		assert.Equal(t, tc.want, CodeOf(tc.err), "%v", tc.err)
	}
}

// isCode is an error that matches a code's sentinel through its Is method,
// as control's sentinels do.
type isCode struct{ code error }

func (e isCode) Error() string        { return "coded" }
func (e isCode) Is(target error) bool { return target == e.code }

// Each ring sentinel has the code its caller expects: the peer's corruption
// is E_PROTO and fatal (it was E_INTERNAL, so Retryable said yes); a local
// bad argument is, to the peer, an internal failure, and no retry fixes it.
func TestCodeOfRingAndCodedErrors(t *testing.T) {
	for _, tc := range []struct {
		name  string
		err   error
		want  Code
		class RetryClass
	}{
		{"ring.ErrCorrupt", fmt.Errorf("%w: producer index 9", ring.ErrCorrupt), CodeProto, Fatal},
		{"ring.ErrTooLarge", ring.ErrTooLarge, CodeTooLarge, Fatal},
		{"ring.ErrShortBuffer", ring.ErrShortBuffer, CodeTooLarge, Fatal},
		{"ring.ErrPeerClosed", ring.ErrPeerClosed, CodeClosed, Fatal},
		{"ring.ErrClosed", fmt.Errorf("ring: %w", ring.ErrClosed), CodeClosed, Fatal},
		{"ring.ErrInvalid", ring.ErrInvalid, CodeInternal, Fatal},
		{"ring.ErrNoReservation", ring.ErrNoReservation, CodeInternal, Fatal},
		{"os.ErrInvalid", fmt.Errorf("x: %w", os.ErrInvalid), CodeInternal, Fatal},
		{"Is(ErrUnavailable)", fmt.Errorf("x: %w", isCode{ErrUnavailable}), CodeUnavailable, Transient},
		{"Is(ErrClosed) beats a deadline", fmt.Errorf("%w: %w", isCode{ErrClosed}, os.ErrDeadlineExceeded), CodeClosed, Fatal},
		{"an *Error beats Is", fmt.Errorf("%w: %w", isCode{ErrUnavailable}, ErrProto), CodeProto, Fatal},
	} {
		assert.Equal(t, tc.want, CodeOf(tc.err), tc.name)
		assert.Equal(t, tc.class, ClassOf(tc.err), tc.name)
		assert.Equal(t, tc.class == Transient, Retryable(tc.err), tc.name)
	}
}

func TestErrorMsgConversion(t *testing.T) {
	e := &Error{Code: CodeResource, Message: "ring full", RetryAfter: 250 * time.Millisecond}
	m := NewErrorMsg(e)
	assert.Equal(t, ErrorMsg{Code: CodeResource, RetryAfterMs: 250, Message: []byte("ring full")}, m)
	p, err := m.Append(nil)
	require.NoError(t, err)
	var got ErrorMsg
	require.NoError(t, got.Decode(p))
	back := got.Err()
	assert.Equal(t, e, back)
	assert.ErrorIs(t, back, ErrResource)
	assert.True(t, Retryable(back))

	m = NewErrorMsg(errors.New(string(make([]byte, MaxMessageLen+10))))
	assert.Equal(t, CodeInternal, m.Code)
	assert.Len(t, m.Message, MaxMessageLen)
	assert.Equal(t, CodeInternal, NewErrorMsg(nil).Code)
}
