package control

import (
	"errors"
	"net"
	"os"

	"github.com/sypas/sypas/sypas"
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
	// matches sypas.ErrPermission.
	ErrPeerRejected error = &codedError{"control: peer rejected", sypas.ErrPermission, nil}
	// ErrFDPassing: a message broke the fd-passing rules (wrong count,
	// truncated or unexpected control data). Any received fds were closed.
	// It matches sypas.ErrProto.
	ErrFDPassing error = &codedError{"control: bad fd-passing message", sypas.ErrProto, nil}
	// ErrConfig: a Config, DialConfig or ServerConfig field (named in the
	// message) is invalid. Returned by NewServer, Dial and Client.Session
	// before any socket is touched. It matches os.ErrInvalid, so
	// sypas.Retryable reports false for it.
	ErrConfig error = &codedError{"control: invalid configuration", os.ErrInvalid, nil}
)

var (
	// ErrPeerGone: the peer died or hung up (EOF, ECONNRESET, its pidfd
	// became readable) or missed HeartbeatMisses heartbeats. Ring waiters
	// are interrupted with it. It matches sypas.ErrUnavailable: reconnect
	// and retry.
	ErrPeerGone error = &codedError{"control: peer gone", sypas.ErrUnavailable, nil}
	// ErrHandshake wraps every failure of Dial or Server.Accept after the
	// connection exists; the wrapped error says why (a *sypas.Error such
	// as E_VERSION, ErrFDPassing, ErrPeerGone, ErrPeerRejected...) and
	// gives the code: ErrHandshake has none of its own.
	ErrHandshake = errors.New("control: handshake failed")
	// ErrSessionClosed: the session was closed locally, or ended with a
	// completed GOAWAY exchange. It matches net.ErrClosed and
	// sypas.ErrClosed.
	ErrSessionClosed error = &codedError{"control: session closed: " + net.ErrClosed.Error(), sypas.ErrClosed, net.ErrClosed}
	// ErrGoAway: the peer sent GOAWAY and the owner did not call Shutdown
	// within DrainTimeout. It matches sypas.ErrUnavailable: the peer is
	// draining; reconnect and retry.
	ErrGoAway error = &codedError{"control: peer sent GOAWAY", sypas.ErrUnavailable, nil}
	// ErrClientClosed: Client.Close was called. It matches net.ErrClosed and
	// sypas.ErrClosed.
	ErrClientClosed error = &codedError{"control: client closed: " + net.ErrClosed.Error(), sypas.ErrClosed, net.ErrClosed}
)

// codedError is a sentinel that matches the sypas sentinel of its code with
// errors.Is, so that sypas.CodeOf and sypas.Retryable say what it means. It
// is deliberately not a *sypas.Error (errors.As finds none): the session
// answers a *sypas.Error with an ERROR frame, and a gone peer or a local
// close must not be answered.
type codedError struct {
	msg  string
	code error // a sypas sentinel: sypas.ErrUnavailable, ...
	wrap error // what else it matches, or nil
}

func (e *codedError) Error() string        { return e.msg }
func (e *codedError) Is(target error) bool { return target == e.code }
func (e *codedError) Unwrap() error        { return e.wrap }
