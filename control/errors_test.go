package control

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/sypas/sypas"
)

// Each sentinel has the code a caller expects, so that sypas.CodeOf,
// Retryable and errors.Is(err, sypas.ErrX) agree with what happened. A gone
// peer or a draining one is E_UNAVAILABLE (reconnect and retry); a local
// close is E_CLOSED; a broken rule is E_PROTO; a refused peer E_PERMISSION.
// ErrPeerGone was E_INTERNAL, ErrSessionClosed too (net.ErrClosed is not
// os.ErrClosed).
func TestSentinelCodes(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		want sypas.Code
	}{
		{"ErrPeerGone", ErrPeerGone, sypas.CodeUnavailable},
		{"ErrPeerGone as the session wraps it", fmt.Errorf("%w: connection closed in state operation: %w", ErrPeerGone, io.EOF), sypas.CodeUnavailable},
		{"ErrPeerGone after a write timeout", fmt.Errorf("%w: heartbeat: %w", ErrPeerGone, os.ErrDeadlineExceeded), sypas.CodeUnavailable},
		{"ErrGoAway", fmt.Errorf("%w: drained for 5s without Shutdown", ErrGoAway), sypas.CodeUnavailable},
		{"ErrSessionClosed", ErrSessionClosed, sypas.CodeClosed},
		{"ErrClientClosed", ErrClientClosed, sypas.CodeClosed},
		{"ErrFDPassing", fmt.Errorf("%w: got 3 fds, want 2", ErrFDPassing), sypas.CodeProto},
		{"ErrPeerRejected", fmt.Errorf("%w: uid 65534 not allowed", ErrPeerRejected), sypas.CodePermission},
		// ErrHandshake has no code of its own: its cause decides.
		{"ErrHandshake of a gone peer", fmt.Errorf("%w in state hello: %w", ErrHandshake, ErrPeerGone), sypas.CodeUnavailable},
		{"ErrHandshake of an E_VERSION", fmt.Errorf("%w in state hello: %w", ErrHandshake, &sypas.Error{Code: sypas.CodeVersion}), sypas.CodeVersion},
		{"ErrHandshake of a rejected kernel", fmt.Errorf("%w in state attest: %w", ErrHandshake, ErrPeerRejected), sypas.CodePermission},
		// Local setup errors of Listen: never sent, no protocol code fits.
		{"ErrAddrInUse", ErrAddrInUse, sypas.CodeInternal},
		{"ErrNotSocket", ErrNotSocket, sypas.CodeInternal},
	} {
		assert.Equal(t, tc.want, sypas.CodeOf(tc.err), tc.name)
	}
	assert.ErrorIs(t, ErrPeerGone, sypas.ErrUnavailable)
	assert.True(t, sypas.Retryable(ErrPeerGone))
	assert.False(t, sypas.Retryable(ErrSessionClosed))
	assert.ErrorIs(t, ErrSessionClosed, net.ErrClosed, "still matches what it matched")
	assert.ErrorIs(t, ErrClientClosed, net.ErrClosed)
	// A coded sentinel is not an *sypas.Error: the session answers with an
	// ERROR frame only for those, and never a gone peer.
	var se *sypas.Error
	assert.False(t, errors.As(ErrPeerGone, &se))
	assert.Equal(t, "control: peer gone", ErrPeerGone.Error())
	assert.Equal(t, "control: session closed: use of closed network connection", ErrSessionClosed.Error())
}

// A bad configuration is no reason to retry: a retry loop built on
// sypas.Retryable must stop at once.
func TestConfigErrorNotRetryable(t *testing.T) {
	_, err := NewServer(nil, ServerConfig{})
	require.ErrorIs(t, err, ErrConfig)
	assert.ErrorIs(t, err, os.ErrInvalid)
	assert.False(t, sypas.Retryable(err))
	assert.Equal(t, sypas.Fatal, sypas.ClassOf(err))
}
