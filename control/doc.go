// Package control is the SYPAS control plane: the Unix socket beside the
// shared-memory rings, or for a daemon on another host a TCP connection
// with TLS 1.3 whose verified client certificate is the peer's identity
// (ListenTLS, AttestTLS, Dial("tcp://host:port"); docs/PROTOCOL.md §9).
// A session runs on any reliable stream (Server.HandshakeConn, DialConn):
// off a Unix socket its data plane is always inline.
//
// Sessions: Dial (daemon) and Server.Serve or Server.Accept (kernel) run
// the handshake of docs/PROTOCOL.md §6 as an explicit state machine —
// attestation, HELLO → WELCOME, REGIONS with the two ring memfds, TOKEN —
// and return a Session holding this side's ring ends and the current token.
// The session then exchanges heartbeats, refreshes the token, notices peer
// death (socket hang-up, the peer's pidfd, missed heartbeats) and
// interrupts the ring waiters with ErrPeerGone, ends when its token is
// revoked (ServerConfig.Revoked), and ends with a GOAWAY exchange
// (Shutdown). Client keeps a daemon connected across kernel restarts with
// gRPC connection backoff, and dials as soon as a restarted kernel listens.
//
// The kernel bounds what daemons can make it hold (ServerConfig.Limits:
// sessions and handshakes per uid and in all, descriptor headroom,
// refreshes and control frames per session) and refuses the rest with
// E_RESOURCE. Each side writes one audit record per refusal to its
// *slog.Logger with stable keys (LogKey*, Event*). Invalid configuration
// is refused up front with ErrConfig.
//
// Building blocks: a listener whose socket file is 0600 from its first
// instant, peer attestation (SO_PEERCRED, pidfd, executable digest) with a
// defence against pid recycling, and SCM_RIGHTS fd passing that never
// leaks a descriptor. Capability tokens live in control/token.
//
// Closing: a Session is closed by whoever got it (Dial, Server.Accept,
// Client.Session), and Client.Close closes the Client's current session
// too, even one it handed out. Closing is safe at any time, from any
// goroutine: ring calls in flight in other goroutines, and every later
// one, return an error matching ring.ErrClosed, and views the rings handed
// out never fault while the session or the ring end is still reachable
// (their bytes are meaningless after Close). A session
// that ends on its own (the peer died, hung up or fell silent) interrupts
// waiting ring calls with its Err, which matches ErrPeerGone in those
// cases; records already published can still be read until Close.
//
// Everything read from the socket or about the peer is untrusted. Blocking
// calls honour the net.Conn deadlines of the connection they use.
// See docs/SECURITY.md for the threat model.
package control
