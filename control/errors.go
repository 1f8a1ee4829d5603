package control

import (
	"errors"
	"fmt"
	"net"
)

var (
	// ErrAddrInUse: a live server answers at the socket path, or another
	// Listen holds its lock.
	ErrAddrInUse = errors.New("control: socket address in use")
	// ErrNotSocket: something other than a socket exists at the path; it is
	// never removed.
	ErrNotSocket = errors.New("control: path exists and is not a socket")
	// ErrPeerRejected: the peer failed attestation (the wrapped error says
	// why). The connection has been closed; a Listener stays usable.
	ErrPeerRejected = errors.New("control: peer rejected")
	// ErrFDPassing: a message broke the fd-passing rules (wrong count,
	// truncated or unexpected control data). Any received fds were closed.
	ErrFDPassing = errors.New("control: bad fd-passing message")
	// ErrConfig: a Config, DialConfig or ServerConfig field (named in the
	// message) is invalid. Returned by NewServer, Dial and Client.Session
	// before any socket is touched.
	ErrConfig = errors.New("control: invalid configuration")
)

var (
	// ErrPeerGone: the peer died or hung up (EOF, ECONNRESET, its pidfd
	// became readable) or missed HeartbeatMisses heartbeats. Ring waiters
	// are interrupted with it.
	ErrPeerGone = errors.New("control: peer gone")
	// ErrHandshake wraps every failure of Dial or Server.Accept after the
	// connection exists; the wrapped error says why (a *sypas.Error such
	// as E_VERSION, ErrFDPassing, ErrPeerGone, ErrPeerRejected...).
	ErrHandshake = errors.New("control: handshake failed")
	// ErrSessionClosed: the session was closed locally, or ended with a
	// completed GOAWAY exchange. It matches net.ErrClosed.
	ErrSessionClosed = fmt.Errorf("control: session closed: %w", net.ErrClosed)
	// ErrGoAway: the peer sent GOAWAY and the owner did not call Shutdown
	// within DrainTimeout.
	ErrGoAway = errors.New("control: peer sent GOAWAY")
	// ErrClientClosed: Client.Close was called.
	ErrClientClosed = fmt.Errorf("control: client closed: %w", net.ErrClosed)
)
