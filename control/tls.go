package control

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"time"

	"github.com/sypas/go/frame"
	"github.com/sypas/go/wire"
)

// Network names: what Session.Network reports for the stream a session
// runs on.
const (
	NetworkUnix  = "unix"    // a Unix socket: shared memory, or inline (§8.6)
	NetworkTLS   = "tcp+tls" // TCP with TLS 1.3 and client certificates: inline
	NetworkPlain = "tcp"     // plain TCP on loopback (Config.InsecurePlaintextLoopback): inline
)

// networkOf names the stream c: NetworkUnix, NetworkTLS, NetworkPlain, or
// for any other net.Conn (a gRPC stream adapted to one) the network of its
// LocalAddr.
func networkOf(c net.Conn) string {
	switch c.(type) {
	case *net.UnixConn, *pollConn:
		return NetworkUnix
	case *tls.Conn:
		return NetworkTLS
	case *net.TCPConn:
		return NetworkPlain
	}
	if a := c.LocalAddr(); a != nil {
		return a.Network()
	}
	return "stream"
}

// closeConn closes c at once. A TLS connection's own Close first sends
// close_notify, waiting up to 5 s for a peer that does not read; a session
// ends in order with its GOAWAY exchange (§6.8) instead, so the socket
// under it is closed.
func closeConn(c net.Conn) error { return socketOf(c).Close() }

// socketOf is the stream under c: the socket of a TLS connection, c
// itself otherwise.
func socketOf(c net.Conn) net.Conn {
	if tc, ok := c.(*tls.Conn); ok {
		return tc.NetConn()
	}
	return c
}

// errorLinger is how long a TCP stream stays open after the ERROR that
// ended its session: time for the peer to read it.
const errorLinger = 250 * time.Millisecond

// lingerAfterError closes c, a stream whose session has just ended with an
// ERROR frame written to it. On TCP (plain or under TLS), close(2) with
// bytes of the peer's still unread resets the connection, and the reset
// discards whatever of the ERROR has not left the host yet (a peer that
// reads slowly, a congested link): the peer would see a bare reset instead
// of the reason (docs/PROTOCOL.md §8.4). So the writing side is shut at
// once (the peer reads the ERROR, then end of stream), readers and writers
// blocked on c are woken by a deadline in the past, and the socket itself
// is closed errorLinger later. Any other stream is closed at once.
func lingerAfterError(c net.Conn) {
	raw := socketOf(c)
	tcp, ok := raw.(*net.TCPConn)
	if !ok {
		raw.Close()
		return
	}
	tcp.CloseWrite()
	tcp.SetDeadline(time.Unix(1, 0))
	time.AfterFunc(errorLinger, func() { tcp.Close() })
}

// ListenTLS listens on the TCP address addr ("host:port") for daemons on
// another host: every connection runs a TLS 1.3 handshake that requires a
// client certificate verified against tlsCfg.ClientCAs, and the
// certificate's identity (CertIdentity) must be admitted by a rule of
// cfg.Policy (CertURIs, CertSubjects): a Policy without one is refused
// with ErrConfig, as nothing could connect. Then the usual handshake runs
// on the TLS stream (docs/PROTOCOL.md §9), without REGIONS: the data
// plane is inline (§8.6). The Listener serves a control.Server or a
// sypas.Server as a Unix one does; Accept does the TLS handshake and the
// policy check within DefaultAttestTimeout, and Server.Serve does them in
// each connection's goroutine, within HandshakeTimeout, off its accept
// loop.
//
// tlsCfg is cloned; it must hold the server's certificate (Certificates,
// GetCertificate or GetConfigForClient) and ClientCAs. MinVersion is
// raised to TLS 1.3 and ClientAuth set to RequireAndVerifyClientCert; a
// weaker ClientAuth or a MaxVersion below 1.3 is refused with ErrConfig.
//
// A nil tlsCfg listens in plaintext, with no peer identity at all, and
// only when cfg.InsecurePlaintextLoopback says so and addr's host is a
// loopback address ("localhost", 127.0.0.0/8, ::1); anything else is
// refused with ErrConfig.
func ListenTLS(addr string, tlsCfg *tls.Config, cfg Config) (*Listener, error) {
	l := &Listener{log: cfg.Logger}
	if cfg.Policy != nil {
		l.policy = *cfg.Policy
	}
	if tlsCfg == nil {
		if !cfg.InsecurePlaintextLoopback {
			return nil, configErr("ListenTLS", "tlsCfg is nil: plain TCP needs Config.InsecurePlaintextLoopback and a loopback address")
		}
		if err := checkLoopback("ListenTLS", addr); err != nil {
			return nil, err
		}
	} else {
		c, err := serverTLS(tlsCfg)
		if err != nil {
			return nil, err
		}
		if len(l.policy.CertURIs) == 0 && len(l.policy.CertSubjects) == 0 {
			return nil, configErr("Config.Policy", "admits no certificate: a TLS listener needs CertURIs or CertSubjects")
		}
		l.tlsCfg = c
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("control: listen tcp %s: %w", addr, err)
	}
	if tlsCfg == nil {
		if err := onLoopback("ListenTLS", ln.Addr()); err != nil {
			ln.Close()
			return nil, err
		}
	}
	l.tl = ln.(*net.TCPListener)
	return l, nil
}

// serverTLS is the kernel's TLS configuration made from the caller's:
// TLS 1.3 and verified client certificates, whatever it said.
func serverTLS(in *tls.Config) (*tls.Config, error) {
	c := in.Clone()
	switch {
	case c.MaxVersion != 0 && c.MaxVersion < tls.VersionTLS13:
		return nil, configErr("ListenTLS tlsCfg.MaxVersion", "%#x: TLS 1.3 is required", c.MaxVersion)
	case c.ClientAuth != tls.NoClientCert && c.ClientAuth != tls.RequireAndVerifyClientCert:
		return nil, configErr("ListenTLS tlsCfg.ClientAuth", "%v: client certificates are required and verified (RequireAndVerifyClientCert)", c.ClientAuth)
	case c.GetConfigForClient == nil && c.ClientCAs == nil:
		return nil, configErr("ListenTLS tlsCfg.ClientCAs", "is nil: the CAs that sign daemon certificates are required")
	case c.GetConfigForClient == nil && len(c.Certificates) == 0 && c.GetCertificate == nil:
		return nil, configErr("ListenTLS tlsCfg.Certificates", "is empty: the kernel needs a certificate")
	}
	c.MinVersion = tls.VersionTLS13
	c.ClientAuth = tls.RequireAndVerifyClientCert
	return c, nil
}

// clientTLS is the daemon's TLS configuration for a kernel at host: TLS
// 1.3, the server name from the address unless set.
func clientTLS(in *tls.Config, host string) (*tls.Config, error) {
	c := in.Clone()
	if c.MaxVersion != 0 && c.MaxVersion < tls.VersionTLS13 {
		return nil, configErr("DialConfig.TLS.MaxVersion", "%#x: TLS 1.3 is required", c.MaxVersion)
	}
	if len(c.Certificates) == 0 && c.GetClientCertificate == nil {
		return nil, configErr("DialConfig.TLS.Certificates", "is empty: the kernel requires a client certificate")
	}
	c.MinVersion = tls.VersionTLS13
	if c.ServerName == "" {
		c.ServerName = host
	}
	return c, nil
}

// checkLoopback refuses addr unless its host is a loopback address: plain
// TCP carries tokens and frames in the clear, and nothing identifies the
// peer.
func checkLoopback(field, addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return configErr(field, "address %q: %v", addr, err)
	}
	if host == "localhost" {
		return nil
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsLoopback() {
		return nil
	}
	return configErr(field, "plaintext TCP refused on %q: only a loopback address (localhost, 127.0.0.0/8, ::1) may go without TLS", addr)
}

// onLoopback refuses a plaintext connection or listener whose address,
// as the system resolved it, is not loopback: "localhost" passes
// checkLoopback by name, and a hosts file may say otherwise.
func onLoopback(field string, a net.Addr) error {
	if ta, ok := a.(*net.TCPAddr); ok && ta.IP.IsLoopback() {
		return nil
	}
	return configErr(field, "plaintext TCP refused: %v is not a loopback address", a)
}

// AttestTLS is the attestation of a peer on TLS (a Listener from ListenTLS
// does it, and a gRPC server with mutual TLS calls it with
// credentials.TLSInfo's State): the identity of the verified client
// certificate (the leaf of state's first verified chain), checked against
// p's certificate rules. remote is the peer's address, for the logs. A
// connection without a verified certificate, or one no rule admits, is
// refused with an error wrapping ErrPeerRejected (which matches
// wire.ErrPermission). A nil p admits no certificate.
func AttestTLS(state tls.ConnectionState, remote net.Addr, p *Policy) (PeerIdentity, error) {
	id := netPeer(remote)
	if !state.HandshakeComplete {
		return id, reject("TLS handshake not complete")
	}
	if state.Version < tls.VersionTLS13 {
		return id, reject("TLS version %#x: 1.3 is required", state.Version)
	}
	if len(state.VerifiedChains) == 0 || len(state.VerifiedChains[0]) == 0 {
		return id, reject("no verified client certificate")
	}
	leaf := state.VerifiedChains[0][0]
	ci := &CertIdentity{Subject: leaf.Subject.String(), SHA256: sha256.Sum256(leaf.Raw)}
	for _, u := range leaf.URIs {
		ci.URIs = append(ci.URIs, u.String())
	}
	id.Cert = ci
	if p == nil {
		p = &Policy{}
	}
	return id, p.admitCert(ci)
}

// netPeer is the identity of a network peer at remote (nil: unknown)
// before TLS says more: no uid, gid or pid.
func netPeer(remote net.Addr) PeerIdentity {
	id := PeerIdentity{UID: NoUID, GID: NoUID}
	if remote != nil {
		id.Remote = remote.String()
	}
	return id
}

// admitCert checks a verified certificate's identity against the
// certificate rules: one URI SAN in CertURIs, or the subject in
// CertSubjects.
//
// An empty subject or URI never matches, not even an empty rule (an
// "-allow-uri ," typed by mistake): certificates without a subject are
// common (SPIFFE's), and an empty rule admitting them all would be a hole.
func (p *Policy) admitCert(c *CertIdentity) error {
	if c.Subject != "" && slices.Contains(p.CertSubjects, c.Subject) {
		return nil
	}
	for _, u := range c.URIs {
		if u != "" && slices.Contains(p.CertURIs, u) {
			return nil
		}
	}
	if len(p.CertURIs) == 0 && len(p.CertSubjects) == 0 {
		return reject("certificate %q: the policy admits no certificate (set Policy.CertURIs or CertSubjects)", c.Subject)
	}
	return reject("certificate identity not allowed: subject %q, URIs %q", c.Subject, c.URIs)
}

// attestNet is Listener.attest for a TCP connection, which it owns: the
// TLS handshake and the policy check under ctx (nothing on plaintext
// loopback). A certificate the CA vouches for that the policy does not
// admit is told so with ERROR E_PERMISSION; other refusals just close.
func (l *Listener) attestNet(ctx context.Context, c net.Conn, log *slog.Logger) (*Conn, error) {
	id := netPeer(c.RemoteAddr())
	if l.tlsCfg == nil {
		return &Conn{Conn: c, Peer: id, attested: true}, nil
	}
	tc := tls.Server(c, l.tlsCfg)
	var err error
	if herr := tc.HandshakeContext(ctx); herr != nil {
		err = reject("TLS handshake: %w", herr)
	} else if id, err = AttestTLS(tc.ConnectionState(), c.RemoteAddr(), &l.policy); err != nil && id.Cert != nil {
		tellRefusal(tc, &wire.Error{Code: wire.CodePermission, Message: "the kernel's policy does not admit this certificate's identity"})
		lingerClose(tc)
	}
	if err != nil {
		closeConn(tc)
		if !errors.Is(err, context.Canceled) {
			Audit(ctx, log, slog.LevelWarn, refusedMsg, EventAttestation, err.Error(), PeerAttrs(id)...)
		}
		return nil, err
	}
	return &Conn{Conn: tc, Peer: id, attested: true}, nil
}

// tellRefusal sends the first frame of a refused connection, ERROR with
// err's code and reason, best effort within 100 ms.
func tellRefusal(c net.Conn, err error) {
	m := errorMsg(err)
	if b, e := wire.AppendFrame(nil, frame.Header{Sequence: 1}, &m); e == nil {
		c.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
		c.Write(b) // the daemon may be gone
	}
}

// lingerClose ends the writing side of tc's socket and reads what the
// peer sent for up to 100 ms before the caller closes it: a TCP socket
// closed with unread bytes (the daemon's HELLO, sent on the heels of its
// TLS handshake) resets the connection, and the reset can destroy the
// ERROR just written before the daemon reads it.
func lingerClose(tc *tls.Conn) {
	c := socketOf(tc)
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
	c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	io.Copy(io.Discard, tc) // until the daemon closes, or the deadline
}

// hostOfString is the host part of a network address: the principal the
// per-uid Limits count a TCP connection under, before TLS says who it is.
func hostOfString(addr string) string {
	if h, _, err := net.SplitHostPort(addr); err == nil {
		return h
	}
	return addr
}
