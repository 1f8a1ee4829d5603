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

	"github.com/sypas/go/wire"
)

// Each sentinel has the code a caller expects, so that wire.CodeOf,
// Retryable and errors.Is(err, wire.ErrX) agree with what happened. A gone
// peer or a draining one is E_UNAVAILABLE (reconnect and retry); a local
// close is E_CLOSED; a broken rule is E_PROTO; a refused peer E_PERMISSION.
// ErrPeerGone was E_INTERNAL, ErrSessionClosed too (net.ErrClosed is not
// os.ErrClosed).
func TestSentinelCodes(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		want wire.Code
	}{
		{"ErrPeerGone", ErrPeerGone, wire.CodeUnavailable},
		{"ErrPeerGone as the session wraps it", fmt.Errorf("%w: connection closed in state operation: %w", ErrPeerGone, io.EOF), wire.CodeUnavailable},
		{"ErrPeerGone after a write timeout", fmt.Errorf("%w: heartbeat: %w", ErrPeerGone, os.ErrDeadlineExceeded), wire.CodeUnavailable},
		{"ErrGoAway", fmt.Errorf("%w: drained for 5s without Shutdown", ErrGoAway), wire.CodeUnavailable},
		{"ErrSessionClosed", ErrSessionClosed, wire.CodeClosed},
		{"ErrClientClosed", ErrClientClosed, wire.CodeClosed},
		{"ErrFDPassing", fmt.Errorf("%w: got 3 fds, want 2", ErrFDPassing), wire.CodeProto},
		{"ErrPeerRejected", fmt.Errorf("%w: uid 65534 not allowed", ErrPeerRejected), wire.CodePermission},
		// ErrHandshake has no code of its own: its cause decides.
		{"ErrHandshake of a gone peer", fmt.Errorf("%w in state hello: %w", ErrHandshake, ErrPeerGone), wire.CodeUnavailable},
		{"ErrHandshake of an E_VERSION", fmt.Errorf("%w in state hello: %w", ErrHandshake, &wire.Error{Code: wire.CodeVersion}), wire.CodeVersion},
		{"ErrHandshake of a rejected kernel", fmt.Errorf("%w in state attest: %w", ErrHandshake, ErrPeerRejected), wire.CodePermission},
		// Local setup errors of Listen: never sent, no protocol code fits.
		{"ErrAddrInUse", ErrAddrInUse, wire.CodeInternal},
		{"ErrNotSocket", ErrNotSocket, wire.CodeInternal},
	} {
		assert.Equal(t, tc.want, wire.CodeOf(tc.err), tc.name)
	}
	assert.ErrorIs(t, ErrPeerGone, wire.ErrUnavailable)
	assert.True(t, wire.Retryable(ErrPeerGone))
	assert.False(t, wire.Retryable(ErrSessionClosed))
	assert.ErrorIs(t, ErrSessionClosed, net.ErrClosed, "still matches what it matched")
	assert.ErrorIs(t, ErrClientClosed, net.ErrClosed)
	// A coded sentinel is not an *wire.Error: the session answers with an
	// ERROR frame only for those, and never a gone peer.
	var se *wire.Error
	assert.False(t, errors.As(ErrPeerGone, &se))
	assert.Equal(t, "control: peer gone", ErrPeerGone.Error())
	assert.Equal(t, "control: session closed: use of closed network connection", ErrSessionClosed.Error())
}

// A bad configuration is no reason to retry: a retry loop built on
// wire.Retryable must stop at once.
func TestConfigErrorNotRetryable(t *testing.T) {
	_, err := NewServer(nil, ServerConfig{})
	require.ErrorIs(t, err, ErrConfig)
	assert.ErrorIs(t, err, os.ErrInvalid)
	assert.False(t, wire.Retryable(err))
	assert.Equal(t, wire.Fatal, wire.ClassOf(err))
}
