package control

import (
	"errors"
	"net"
	"os"

	"github.com/sypas/go/wire"
)

var (
	// ErrAddrInUse: a live server answers at the socket path, or another
	// Listen holds its lock.
	ErrAddrInUse = errors.New("control: socket address in use")
	// ErrNotSocket: something other than a socket exists at the path; it is
	// never removed.
	ErrNotSocket = errors.New("control: path exists and is not a socket")
	// ErrPeerRejected: the peer failed attestation (the wrapped error says
	// why). The connection has been closed; a Listener stays usable. It
	// matches wire.ErrPermission.
	ErrPeerRejected error = &codedError{"control: peer rejected", wire.ErrPermission, nil}
	// ErrFDPassing: a message broke the fd-passing rules (wrong count,
	// truncated or unexpected control data). Any received fds were closed.
	// It matches wire.ErrProto.
	ErrFDPassing error = &codedError{"control: bad fd-passing message", wire.ErrProto, nil}
	// ErrConfig: a Config, DialConfig or ServerConfig field (named in the
	// message) is invalid. Returned by NewServer, Dial and Client.Session
	// before any socket is touched. It matches os.ErrInvalid, so
	// wire.Retryable reports false for it.
	ErrConfig error = &codedError{"control: invalid configuration", os.ErrInvalid, nil}
)

var (
	// ErrPeerGone: the peer died or hung up (EOF, ECONNRESET, its pidfd
	// became readable) or missed HeartbeatMisses heartbeats. Ring waiters
	// are interrupted with it. It matches wire.ErrUnavailable: reconnect
	// and retry.
	ErrPeerGone error = &codedError{"control: peer gone", wire.ErrUnavailable, nil}
	// ErrHandshake wraps every failure of Dial or Server.Accept after the
	// connection exists; the wrapped error says why (a *wire.Error such
	// as E_VERSION, ErrFDPassing, ErrPeerGone, ErrPeerRejected...) and
	// gives the code: ErrHandshake has none of its own.
	ErrHandshake = errors.New("control: handshake failed")
	// ErrSessionClosed: the session was closed locally, or ended with a
	// completed GOAWAY exchange. It matches net.ErrClosed and
	// wire.ErrClosed.
	ErrSessionClosed error = &codedError{"control: session closed: " + net.ErrClosed.Error(), wire.ErrClosed, net.ErrClosed}
	// ErrGoAway: the peer sent GOAWAY and the owner did not call Shutdown
	// within DrainTimeout. It matches wire.ErrUnavailable: the peer is
	// draining; reconnect and retry.
	ErrGoAway error = &codedError{"control: peer sent GOAWAY", wire.ErrUnavailable, nil}
	// ErrClientClosed: Client.Close was called. It matches net.ErrClosed and
	// wire.ErrClosed.
	ErrClientClosed error = &codedError{"control: client closed: " + net.ErrClosed.Error(), wire.ErrClosed, net.ErrClosed}
)

// codedError is a sentinel that matches the sypas sentinel of its code with
// errors.Is, so that wire.CodeOf and wire.Retryable say what it means. It
// is deliberately not a *wire.Error (errors.As finds none): the session
// answers a *wire.Error with an ERROR frame, and a gone peer or a local
// close must not be answered.
type codedError struct {
	msg  string
	code error // a sypas sentinel: wire.ErrUnavailable, ...
	wrap error // what else it matches, or nil
}

func (e *codedError) Error() string        { return e.msg }
func (e *codedError) Is(target error) bool { return target == e.code }
func (e *codedError) Unwrap() error        { return e.wrap }
