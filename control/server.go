package control

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"

	"github.com/sypas/go/control/token"
	"github.com/sypas/go/frame"
	"github.com/sypas/go/ring"
	"github.com/sypas/go/wire"
)

// Server is the kernel side: it accepts attested connections on a Listener
// and runs the kernel side of the handshake on each, within its Limits.
type Server struct {
	l   *Listener
	cfg ServerConfig
	adm *admission
}

// NewServer serves sessions on l, which stays owned by the caller. A nil l
// or an invalid cfg gives an error wrapping ErrConfig that names the field.
// NewStreamServer makes one without a Listener.
func NewServer(l *Listener, cfg ServerConfig) (*Server, error) {
	if l == nil {
		return nil, fmt.Errorf("%w: NewServer: Listener is nil", ErrConfig)
	}
	return newServer(l, cfg)
}

// NewStreamServer is a Server without a Listener, for a transport that
// accepts and authenticates connections itself (a gRPC server with mutual
// TLS): it runs only HandshakeConn; Serve, Accept and Handshake fail with
// ErrConfig.
func NewStreamServer(cfg ServerConfig) (*Server, error) { return newServer(nil, cfg) }

func newServer(l *Listener, cfg ServerConfig) (*Server, error) {
	cfg.SessionConfig = cfg.SessionConfig.withDefaults()
	// A default ring never exceeds an explicit MaxRingSize.
	cfg.TxRingSize = cmp.Or(cfg.TxRingSize, min(DefaultRingSize, cfg.MaxRingSize))
	cfg.RxRingSize = cmp.Or(cfg.RxRingSize, min(DefaultRingSize, cfg.MaxRingSize))
	cfg.MaxInFlight = cmp.Or(cfg.MaxInFlight, DefaultMaxInFlight)
	cfg.Rights = cmp.Or(cfg.Rights, tokenDefaultRights)
	cfg.TokenTTL = cmp.Or(cfg.TokenTTL, DefaultTokenTTL)
	cfg.Limits = cfg.Limits.withDefaults(cfg.TokenTTL)
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	return &Server{l: l, cfg: cfg, adm: newAdmission(cfg.Limits)}, nil
}

func (srv *Server) now() time.Time {
	if srv.cfg.Clock != nil {
		return srv.cfg.Clock()
	}
	return time.Now()
}

func (srv *Server) tokenTTL() time.Duration { return srv.cfg.TokenTTL }

// Serve accepts connections until ctx ends or the Listener is closed. Each
// connection is attested and handshaken in its own goroutine, so a slow or
// hostile peer delays nobody else; at most Limits.MaxHandshakes run at
// once (Serve waits for one to end before accepting more), and connections
// beyond the other Limits are refused with ERROR E_RESOURCE. Each session
// is passed to handle in its goroutine and closed when handle returns
// (handle may Shutdown or Close it itself). Refusals are audit records;
// handshakes that fail for other reasons (a daemon gone mid-handshake) are
// logged at Debug level.
//
// When ctx ends or the Listener is closed, Serve stops accepting, cancels
// the handshakes in progress, and returns ctx's (or the Listener's) error
// once every goroutine it started has returned, handlers included: a
// handler owns its session and should return when the session ends or when
// ctx does (Shutdown the session then). Do not call Accept at the same
// time: both set the Listener's deadline.
func (srv *Server) Serve(ctx context.Context, handle func(*Session)) error {
	if handle == nil {
		return fmt.Errorf("%w: Serve: handle is nil", ErrConfig)
	}
	if srv.l == nil {
		return fmt.Errorf("%w: Serve: a Server from NewStreamServer has no Listener", ErrConfig)
	}
	hctx, cancel := context.WithCancel(ctx)
	var conns sync.WaitGroup
	defer func() {
		cancel()
		conns.Wait()
	}()
	dl, _ := ctx.Deadline()
	stop := srv.acceptDeadline(ctx)
	defer stop()
	var pause time.Duration // after a failed accept(2)
	for {
		if !srv.adm.waitRoom(ctx.Done()) {
			return ctx.Err()
		}
		uc, err := srv.l.acceptConn()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if errors.Is(err, os.ErrDeadlineExceeded) && !dl.IsZero() && !time.Now().Before(dl) {
				// ctx's deadline, which the poller may see before ctx
				// reports it: no accept(2) failure.
				<-ctx.Done()
				return ctx.Err()
			}
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("control: serve: %w", err)
			}
			// EMFILE, ENFILE, ECONNABORTED...: the connection waits in
			// the backlog; pause as net/http does, then go on.
			pause = min(max(2*pause, 5*time.Millisecond), time.Second)
			Audit(ctx, srv.cfg.Logger, slog.LevelError, "sypas: accept failed", EventInternal, err.Error())
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(pause):
			}
			continue
		}
		pause = 0
		accepted := time.Now()
		sl, err := srv.admit(uc)
		if err != nil {
			continue // told, recorded, closed
		}
		conns.Add(1)
		go func() {
			defer conns.Done()
			s, err := srv.serveConn(hctx, uc, sl, accepted)
			if err != nil {
				logger(srv.cfg.Logger).LogAttrs(hctx, slog.LevelDebug, "sypas: handshake failed", slog.String(LogKeyReason, err.Error()))
				return
			}
			defer s.Close()
			handle(s)
		}()
	}
}

// Accept waits for a connection, attests it against the Listener's Policy
// before a byte is read, and runs the handshake on it. Attestation and
// handshake together are bounded by ctx and HandshakeTimeout, counted from
// accept(2). A refused or failed peer gives an error (ErrPeerRejected,
// ErrHandshake, wire.ErrResource for a limit) and leaves the Server
// usable: accept again. One connection holds up the next Accept for at
// most HandshakeTimeout; Serve overlaps them. The session holds its share
// of the Limits until it is closed. Accept is not for concurrent use (it
// sets the Listener's deadline from ctx).
func (srv *Server) Accept(ctx context.Context) (*Session, error) {
	if srv.l == nil {
		return nil, fmt.Errorf("%w: Accept: a Server from NewStreamServer has no Listener", ErrConfig)
	}
	stop := srv.acceptDeadline(ctx)
	uc, err := srv.l.acceptConn()
	if !stop() && err != nil {
		return nil, fmt.Errorf("control: accept: %w (%w)", ctx.Err(), err)
	}
	if err != nil {
		return nil, fmt.Errorf("control: accept: %w", err)
	}
	accepted := time.Now()
	sl, err := srv.admit(uc)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrHandshake, err)
	}
	return srv.serveConn(ctx, uc, sl, accepted)
}

// acceptDeadline applies ctx to the Listener's accept: its deadline, and
// cancellation through an expired deadline. stop reports false if ctx
// ended; it returns only once that expired deadline is set, so that it
// cannot land after the next Serve or Accept set its own (a later Serve
// then never accepted: its deadline stayed in the past), and clears the
// Listener's deadline.
func (srv *Server) acceptDeadline(ctx context.Context) (stop func() bool) {
	dl, _ := ctx.Deadline()
	srv.l.SetDeadline(dl)
	set := make(chan struct{})
	stopFn := context.AfterFunc(ctx, func() {
		defer close(set)
		srv.l.SetDeadline(time.Unix(1, 0))
	})
	return func() bool {
		ok := stopFn()
		if !ok {
			<-set
		}
		// No deadline left behind: a later Listener.Accept must not fail
		// on ctx's.
		srv.l.SetDeadline(time.Time{})
		return ok
	}
}

// serveConn attests and handshakes the accepted connection uc, which it
// owns with its slot, under ctx and HandshakeTimeout from accepted.
func (srv *Server) serveConn(ctx context.Context, uc net.Conn, sl *slot, accepted time.Time) (*Session, error) {
	ctx, cancel := context.WithDeadline(ctx, accepted.Add(srv.cfg.HandshakeTimeout))
	defer cancel()
	c, err := srv.l.attest(ctx, uc, srv.cfg.Logger)
	if err != nil {
		sl.release()
		return nil, err
	}
	return srv.handshake(ctx, c, sl)
}

// admit takes the Limits' slots for an accepted connection, knowing its
// owner from SO_PEERCRED before any attestation work. A refused peer is
// told with ERROR E_RESOURCE (if the Policy admits its uid at all: nothing
// is sent to others), recorded and closed. A TCP connection is counted
// under its remote host (TLS has not said who it is yet) and refused
// without a word: it cannot be spoken to before TLS.
func (srv *Server) admit(c net.Conn) (*slot, error) {
	var peer PeerIdentity
	if uc, ok := c.(*net.UnixConn); !ok {
		peer = netPeer(c.RemoteAddr())
	} else {
		cred, err := peerCred(uc)
		if err != nil {
			uc.Close()
			Audit(context.Background(), srv.cfg.Logger, slog.LevelWarn, refusedMsg, EventAttestation, err.Error())
			return nil, err
		}
		peer = PeerIdentity{UID: cred.Uid, GID: cred.Gid, PID: int(cred.Pid)}
	}
	sl, err := srv.adm.admit(principalOf(peer))
	if err != nil {
		srv.refuse(c, peer, err)
		return nil, err
	}
	return sl, nil
}

// refuse tells a connection refused by a limit why, records it and closes
// it. Only a peer the Policy admits is told: a Unix peer of an admitted
// uid, a network peer attested already (HandshakeConn, or a Conn from
// ListenTLS's Accept).
func (srv *Server) refuse(c net.Conn, peer PeerIdentity, err error) {
	tell := peer.Cert != nil
	if peer.Local() && srv.l != nil {
		tell = srv.l.policy.allowsUID(peer.UID)
	}
	if tell {
		tellRefusal(c, err)
	}
	closeConn(c)
	Audit(context.Background(), srv.cfg.Logger, slog.LevelWarn, refusedMsg, EventLimit, err.Error(), append(PeerAttrs(peer), errAttrs(err)...)...)
}

// Handshake runs the kernel side of the handshake on a Conn from
// Listener.Accept, which it owns from then on (closed on failure). Its
// HandshakeTimeout starts now, after attestation. A Conn that did not come
// from a Listener (no pidfd, no attested identity) is refused, and so is
// one beyond the Limits (ERROR E_RESOURCE to the daemon, an error matching
// wire.ErrResource here). The session holds its share of the Limits until
// it is closed.
func (srv *Server) Handshake(ctx context.Context, c *Conn) (*Session, error) {
	if c == nil || c.Conn == nil || !c.attested || (c.Peer.Local() && c.pidfd == nil) {
		if c != nil && c.Conn != nil {
			closeConn(c.Conn)
		}
		return nil, fmt.Errorf("%w: %w: connection was not attested by a Listener", ErrHandshake, ErrPeerRejected)
	}
	sl, err := srv.adm.admit(principalOf(c.Peer))
	if err != nil {
		if c.pidfd != nil {
			c.pidfd.Close()
		}
		srv.refuse(c.Conn, c.Peer, err)
		return nil, fmt.Errorf("%w: %w", ErrHandshake, err)
	}
	ctx, cancel := context.WithTimeout(ctx, srv.cfg.HandshakeTimeout)
	defer cancel()
	return srv.handshake(ctx, c, sl)
}

// HandshakeConn runs the kernel side of the handshake on conn, a reliable
// byte stream that the caller accepted and whose peer it has already
// authenticated as peer: a network peer (peer.Remote or peer.Cert set,
// UID NoUID), such as AttestTLS returns for a gRPC stream with mutual TLS.
// A local identity (a uid) is refused: only a Listener attests those. The
// session's data plane is inline on conn (no REGIONS: §8.6, §9), its
// token is bound to peer (PeerIdentity.Subject), and its refusals and
// audit records name peer. conn is owned from then on (closed on
// failure); its deadlines must work as net.Conn's do, since the session
// bounds every read and write with them. The handshake is bounded by ctx
// and HandshakeTimeout, and counted in the Limits under peer's remote
// host; the session holds its share until it is closed.
func (srv *Server) HandshakeConn(ctx context.Context, conn net.Conn, peer PeerIdentity) (*Session, error) {
	if conn == nil {
		return nil, fmt.Errorf("%w: HandshakeConn: conn is nil", ErrConfig)
	}
	if peer.UID != NoUID || peer.GID != NoUID { // a local peer has a uid
		closeConn(conn)
		return nil, fmt.Errorf("%w: %w: HandshakeConn takes a network peer (UID NoUID, Remote or Cert set); a local one is attested by a Listener", ErrHandshake, ErrPeerRejected)
	}
	if _, unix := conn.(*net.UnixConn); unix {
		closeConn(conn)
		return nil, fmt.Errorf("%w: %w: HandshakeConn on a Unix socket: attest it with a Listener", ErrHandshake, ErrPeerRejected)
	}
	return srv.Handshake(ctx, &Conn{Conn: conn, Peer: peer, attested: true})
}

// handshake runs the kernel handshake under ctx, which already carries its
// deadline. The session owns sl from here: Close releases it.
func (srv *Server) handshake(ctx context.Context, c *Conn, sl *slot) (*Session, error) {
	s := newSession(true, c.Conn, srv.cfg.SessionConfig)
	s.ctl, s.peer, s.srv, s.slot = c, c.Peer, srv, sl
	lim := &srv.cfg.Limits
	s.frames = newBucket(lim.MaxControlFrames, srv.cfg.HeartbeatInterval)
	s.refreshes = newBucket(lim.MaxRefreshes, lim.RefreshInterval)
	stop := s.handshakeDeadline(ctx)
	if err := s.serverHandshake(); err != nil {
		return nil, s.endHandshake(ctx, stop, err)
	}
	if err := s.endHandshake(ctx, stop, nil); err != nil {
		return nil, err
	}
	sl.handshakeDone()
	return s, nil
}

func (s *Session) serverHandshake() error {
	cfg := &s.srv.cfg
	s.setState(StateAttest) // done by Listener.Accept
	s.setState(StateHandshake)
	f, _, err := s.readFrame()
	if err != nil {
		return err
	}
	var h wire.Hello
	if err := h.Decode(f.Payload); err != nil {
		return protoErr("HELLO: %v", err)
	}
	lo, hi := max(h.MinVersion, wire.MinProtocolVersion), min(h.MaxVersion, wire.ProtocolVersion)
	if lo > hi {
		return &wire.Error{Code: wire.CodeVersion, Message: fmt.Sprintf("daemon speaks versions [%d, %d], kernel [%d, %d]",
			h.MinVersion, h.MaxVersion, wire.MinProtocolVersion, wire.ProtocolVersion)}
	}
	if h.Features&wire.FeatureInlineOnly != 0 && h.Features&wire.FeatureInline == 0 {
		return protoErr("HELLO asks for INLINE_ONLY without offering INLINE")
	}
	supported := cfg.Features
	if cfg.NoSharedMemory || s.fdr.c == nil { // a stream other than a Unix socket is inline (§9)
		supported |= wire.FeatureInline
	}
	granted := h.Features & supported &^ wire.FeatureInlineOnly
	if !h.HasBulkSize {
		// A daemon that predates bulk regions (it sends no bulk_size)
		// may offer the BULK bit, which then meant no regions (§6.4).
		granted &^= wire.FeatureBulk
	}
	if miss := cfg.RequireFeatures &^ granted; miss != 0 {
		return protoErr("daemon lacks required features %#x", miss)
	}
	grant := func(asked, def uint32) uint32 {
		if asked == 0 {
			asked = def
		}
		return min(asked, cfg.MaxRingSize)
	}
	tx, rx := grant(h.TxRingSize, cfg.TxRingSize), grant(h.RxRingSize, cfg.RxRingSize)
	maxPayload := cfg.MaxPayload
	if h.MaxPayload != 0 {
		maxPayload = min(maxPayload, h.MaxPayload)
	}
	maxPayload = min(maxPayload, uint32(ring.MaxRecord(int(min(tx, rx)))-frame.MaxHeaderLen))
	inFlight := cfg.MaxInFlight
	if h.MaxInFlight != 0 {
		inFlight = min(inFlight, h.MaxInFlight)
	}
	s.welcome = wire.Welcome{
		Version: hi, HeartbeatMisses: uint16(cfg.HeartbeatMisses),
		HeartbeatIntervalMs: uint32(max(cfg.HeartbeatInterval/time.Millisecond, 1)),
		Features:            granted, SessionID: randomID(), TxRingSize: tx, RxRingSize: rx,
		MaxPayload: maxPayload, MaxInFlight: inFlight,
	}
	s.cfg.HeartbeatInterval = s.welcome.HeartbeatInterval()
	// The rings come first, so that a failure to make them can still turn
	// into inline in WELCOME (§8.6).
	reason, err := s.chooseDataPlane(&h, granted)
	if err != nil {
		return err
	}
	if reason != "" {
		s.welcome.Features |= wire.FeatureInline
		s.welcome.Features &^= wire.FeatureBulk // bulk regions need the rings (§6.4)
		s.inline = newInline(s, tx, reason)
	} else {
		s.welcome.Features &^= wire.FeatureInline
	}
	if s.bulkGranted() {
		if err := s.createBulk(s.grantBulk(&h), KernelBulkID); err != nil {
			return err
		}
	}
	if err := s.send(&s.welcome, 0, 0, 0); err != nil {
		return err
	}

	s.setState(StateRegions)
	if s.inline == nil {
		if s.cons, err = s.regions[0].NewConsumer(s.cfg.Ring); err != nil {
			return &wire.Error{Code: wire.CodeInternal, Message: "attach the RING_TX consumer", Err: err}
		}
		if s.prod, err = s.regions[1].NewProducer(s.cfg.Ring); err != nil {
			return &wire.Error{Code: wire.CodeInternal, Message: "attach the RING_RX producer", Err: err}
		}
		regions := wire.Regions{Entries: []wire.Region{
			{Role: wire.RoleRingTx, ID: 1, Size: regionSize(tx)},
			{Role: wire.RoleRingRx, ID: 2, Size: regionSize(rx)},
		}}
		files := []*os.File{s.regions[0].File(), s.regions[1].File()}
		if s.bulk != nil {
			regions.Entries = append(regions.Entries, s.bulkEntry())
			files = append(files, s.bulk.File())
			s.fdr.fds = true // the daemon answers with its own bulk region (§6.5)
		}
		if err := s.sendFDs(&regions, files...); err != nil {
			return err
		}
		if s.bulk != nil {
			if err := s.readPeerBulk(files...); err != nil {
				return err
			}
		}
	}

	s.setState(StateToken)
	t, err := s.mint(s.srv.tokenTTL())
	if err != nil {
		return err
	}
	// TOKEN itself carries cap_ref 0 (§6.1): the daemon learns the id from
	// it. The token is the session's only once sent, so an ERROR for a
	// failed send carries cap_ref 0 too.
	if err := s.sendToken(t, 0); err != nil { // before setToken: cap_ref 0, the handshake's deadline
		return err
	}
	s.setToken(t)
	return nil
}

// chooseDataPlane decides where the session's data plane goes (§8.6): ""
// for the rings, which it creates, or why it goes inline. Inline is
// chosen when the daemon asks for it (INLINE_ONLY), when the kernel's
// configuration turns shared memory off, or when the rings cannot be made
// and the daemon offered INLINE; a daemon that needs inline from a kernel
// that cannot, or that cannot take it from a kernel that needs it, is
// refused.
func (s *Session) chooseDataPlane(h *wire.Hello, granted uint64) (string, error) {
	can := granted&wire.FeatureInline != 0
	var reason string
	switch {
	case s.fdr.c == nil:
		reason = "the connection is " + networkOf(s.conn) + ", not a Unix socket: no shared memory across it"
	case h.Features&wire.FeatureInlineOnly != 0:
		reason = "the daemon maps no shared memory"
	case s.srv.cfg.NoSharedMemory:
		reason = "the kernel's configuration turns shared memory off"
	}
	if reason != "" {
		if !can {
			return "", &wire.Error{Code: wire.CodeUnavailable, Message: reason + ", and the other side does not carry the data plane inline"}
		}
		return reason, nil
	}
	for _, c := range []uint32{s.welcome.TxRingSize, s.welcome.RxRingSize} {
		r, err := ring.CreateRegion(int(c))
		if err != nil {
			for _, r := range s.regions {
				r.Close()
			}
			s.regions = nil
			if can {
				return "creating the rings failed: " + err.Error(), nil
			}
			return "", &wire.Error{Code: wire.CodeResource, Message: "create ring", Err: err}
		}
		s.regions = append(s.regions, r)
	}
	return "", nil
}

// tokenDefaultRights is what a token grants when ServerConfig.Rights is zero.
const tokenDefaultRights = token.RightRequest | token.RightSubscribe | token.RightPublish | token.RightBulk
