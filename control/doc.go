// Package control holds the security-critical building blocks of the SYPAS
// control plane, the Unix socket beside the shared-memory rings: a listener
// whose socket file is 0600 from its first instant, peer attestation
// (SO_PEERCRED, pidfd, executable digest) with a defence against pid
// recycling, and SCM_RIGHTS fd passing that never leaks a descriptor.
// Capability tokens live in control/token.
//
// Everything read from the socket or about the peer is untrusted. Blocking
// calls honour the net.Conn deadlines of the connection they use.
// See docs/SECURITY.md for the threat model.
package control
