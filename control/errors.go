package control

import "errors"

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
)
