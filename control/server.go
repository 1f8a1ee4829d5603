package control

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/sypas/sypas/control/token"
	"github.com/sypas/sypas/frame"
	"github.com/sypas/sypas/ring"
	"github.com/sypas/sypas/sypas"
)

// Server is the kernel side: it accepts attested connections on a Listener
// and runs the kernel side of the handshake on each.
type Server struct {
	l   *Listener
	cfg ServerConfig
}

// NewServer serves sessions on l, which stays owned by the caller.
func NewServer(l *Listener, cfg ServerConfig) (*Server, error) {
	if cfg.Keys == nil {
		return nil, errors.New("control: ServerConfig.Keys is required")
	}
	if _, ok := cfg.Keys.Current(); !ok {
		return nil, errors.New("control: keyring has no current key")
	}
	cfg.SessionConfig = cfg.SessionConfig.withDefaults()
	cfg.TxRingSize = cmp.Or(cfg.TxRingSize, DefaultRingSize)
	cfg.RxRingSize = cmp.Or(cfg.RxRingSize, DefaultRingSize)
	cfg.MaxInFlight = cmp.Or(cfg.MaxInFlight, DefaultMaxInFlight)
	cfg.Rights = cmp.Or(cfg.Rights, tokenDefaultRights)
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	return &Server{l: l, cfg: cfg}, nil
}

func (srv *Server) now() time.Time {
	if srv.cfg.Clock != nil {
		return srv.cfg.Clock()
	}
	return time.Now()
}

func (srv *Server) tokenTTL() time.Duration {
	if srv.cfg.TokenTTL > 0 {
		return srv.cfg.TokenTTL
	}
	return DefaultTokenTTL
}

// Accept waits for a connection, attests it against the Listener's Policy
// before a byte is read, and runs the handshake on it. Attestation and
// handshake together are bounded by ctx and HandshakeTimeout, counted from
// accept(2). A refused or failed peer gives an error (ErrPeerRejected,
// ErrHandshake) and leaves the Server usable: log it and accept again. One
// connection holds up the next Accept for at most HandshakeTimeout; to
// overlap them, Accept on the Listener and call Handshake in a goroutine.
// Accept is not for concurrent use (it sets the Listener's deadline from
// ctx).
func (srv *Server) Accept(ctx context.Context) (*Session, error) {
	dl, _ := ctx.Deadline()
	srv.l.SetDeadline(dl)
	stop := context.AfterFunc(ctx, func() { srv.l.SetDeadline(time.Unix(1, 0)) })
	uc, err := srv.l.ul.AcceptUnix()
	if !stop() && err != nil {
		return nil, fmt.Errorf("control: accept: %w (%w)", ctx.Err(), err)
	}
	if err != nil {
		return nil, fmt.Errorf("control: accept: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, srv.cfg.HandshakeTimeout)
	defer cancel()
	c, err := srv.l.attest(ctx, uc)
	if err != nil {
		return nil, err
	}
	return srv.handshake(ctx, c)
}

// Handshake runs the kernel side of the handshake on a Conn from
// Listener.Accept, which it owns from then on (closed on failure). Its
// HandshakeTimeout starts now, after attestation. A Conn that did not come
// from a Listener (no pidfd, no attested identity) is refused.
func (srv *Server) Handshake(ctx context.Context, c *Conn) (*Session, error) {
	if c == nil || c.UnixConn == nil || c.pidfd == nil {
		if c != nil && c.UnixConn != nil {
			c.UnixConn.Close()
		}
		return nil, fmt.Errorf("%w: %w: connection was not attested by a Listener", ErrHandshake, ErrPeerRejected)
	}
	ctx, cancel := context.WithTimeout(ctx, srv.cfg.HandshakeTimeout)
	defer cancel()
	return srv.handshake(ctx, c)
}

// handshake runs the kernel handshake under ctx, which already carries its
// deadline.
func (srv *Server) handshake(ctx context.Context, c *Conn) (*Session, error) {
	s := newSession(true, c.UnixConn, srv.cfg.SessionConfig)
	s.ctl, s.peer, s.srv = c, c.Peer, srv
	stop := s.handshakeDeadline(ctx)
	if err := s.serverHandshake(); err != nil {
		return nil, s.endHandshake(ctx, stop, err)
	}
	if err := s.endHandshake(ctx, stop, nil); err != nil {
		return nil, err
	}
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
	var h sypas.Hello
	if err := h.Decode(f.Payload); err != nil {
		return protoErr("HELLO: %v", err)
	}
	lo, hi := max(h.MinVersion, sypas.MinProtocolVersion), min(h.MaxVersion, sypas.ProtocolVersion)
	if lo > hi {
		return &sypas.Error{Code: sypas.CodeVersion, Message: fmt.Sprintf("daemon speaks versions [%d, %d], kernel [%d, %d]",
			h.MinVersion, h.MaxVersion, sypas.MinProtocolVersion, sypas.ProtocolVersion)}
	}
	granted := h.Features & cfg.Features
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
	s.welcome = sypas.Welcome{
		Version: hi, HeartbeatMisses: uint16(cfg.HeartbeatMisses),
		HeartbeatIntervalMs: uint32(max(cfg.HeartbeatInterval/time.Millisecond, 1)),
		Features:            granted, SessionID: randomID(), TxRingSize: tx, RxRingSize: rx,
		MaxPayload: maxPayload, MaxInFlight: inFlight,
	}
	s.cfg.HeartbeatInterval = s.welcome.HeartbeatInterval()
	if err := s.send(&s.welcome, 0, 0, 0); err != nil {
		return err
	}

	s.setState(StateRegions)
	for _, c := range []uint32{tx, rx} {
		r, err := ring.CreateRegion(int(c))
		if err != nil {
			return &sypas.Error{Code: sypas.CodeResource, Message: "create ring", Err: err}
		}
		s.regions = append(s.regions, r)
	}
	if s.cons, err = s.regions[0].NewConsumer(s.cfg.Ring); err != nil {
		return &sypas.Error{Code: sypas.CodeInternal, Err: err}
	}
	if s.prod, err = s.regions[1].NewProducer(s.cfg.Ring); err != nil {
		return &sypas.Error{Code: sypas.CodeInternal, Err: err}
	}
	regions := sypas.Regions{Entries: []sypas.Region{
		{Role: sypas.RoleRingTx, ID: 1, Size: regionSize(tx)},
		{Role: sypas.RoleRingRx, ID: 2, Size: regionSize(rx)},
	}}
	if err := s.sendFDs(&regions, s.regions[0].File(), s.regions[1].File()); err != nil {
		return err
	}

	s.setState(StateToken)
	t, err := s.mint(s.srv.tokenTTL())
	if err != nil {
		return err
	}
	s.setToken(t)
	// TOKEN itself carries cap_ref 0 (§2.1): the daemon learns the id from it.
	return s.sendTokenFirst(t)
}

func (s *Session) sendTokenFirst(t *Token) error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	s.wseq++
	m := sypas.Token{TokenID: t.ID, ExpiryUnix: t.Expiry.UnixNano(), Token: t.Bytes}
	p, err := m.Append(s.wbuf[:0])
	if err != nil {
		return err
	}
	s.wbuf = p
	return writeErr(s.fw.WriteFrame(&frame.Frame{Header: frame.Header{Type: frame.TypeToken, Sequence: s.wseq}, Payload: p}))
}

// tokenDefaultRights is what a token grants when ServerConfig.Rights is zero.
const tokenDefaultRights = token.RightRequest | token.RightSubscribe | token.RightPublish
