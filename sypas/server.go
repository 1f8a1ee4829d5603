package sypas

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sypas/go/control"
	"github.com/sypas/go/control/token"
	"github.com/sypas/go/wire"
)

// Rights are what a session's token grants, and what an operation needs
// (control/token): RightRequest, RightSubscribe, RightPublish, RightBulk,
// RightAdmin.
type Rights = token.Rights

// The rights an operation may need.
const (
	RightRequest   = token.RightRequest
	RightSubscribe = token.RightSubscribe
	RightPublish   = token.RightPublish
	RightBulk      = token.RightBulk
	RightAdmin     = token.RightAdmin
)

// Handler serves one operation. ctx ends when the request's deadline
// (the caller's timeout) passes, when the session ends or when the server
// is closed. The returned body is copied into the reply before Handler's
// caller returns, so it may be the handler's own reusable memory.
//
// An error that is an *Error (or wraps one) is answered with its Code and
// Message; one that wraps context.DeadlineExceeded or context.Canceled (the
// handler gave up with its ctx) as E_TIMEOUT or E_UNAVAILABLE; any other
// error as E_INTERNAL. Only an *Error's text reaches the caller; the
// server's log sees the others'. A panic is recovered and answered
// E_INTERNAL.
//
// req, its Body and ctx are valid until the handler returns: keep none of
// them (copy the body, and derive a context of your own for work that
// outlives the call).
type Handler func(ctx context.Context, req *Request) ([]byte, error)

// RouteOption changes how an operation is served.
type RouteOption uint8

const (
	// Inline runs the handler on the session's reader goroutine: no
	// hand-off, so the lowest latency, and Request.Body is a view into the
	// shared ring itself. Only for handlers that never block: while one
	// runs, the session reads nothing else, and what the session's reader
	// holds back to publish together after a burst of requests waits for
	// it too: the answers before it, and those of the session's pool
	// handlers and Publish's events written meanwhile.
	Inline RouteOption = 1 << iota
)

// ServerConfig configures a Server. Keys is required; the zero value of
// everything else is a documented default.
type ServerConfig struct {
	// ServerConfig is the control plane's: token keys and lifetime, the
	// rights every session's token grants, limits, ring sizes, heartbeats,
	// and the Logger that receives one audit record per refusal (nil:
	// slog.Default()).
	control.ServerConfig
	// Workers bounds the handlers that run at once for one session (those
	// not registered Inline). Zero means DefaultWorkers.
	Workers int
	// WriteTimeout bounds how long a reply or event waits for room in a
	// daemon's ring before the session is ended as not reading. Zero means
	// DefaultWriteTimeout.
	WriteTimeout time.Duration
	// Topics sets the SlowPolicy of topics by name; a topic not named
	// here is DropNewest.
	Topics map[string]SlowPolicy
	// MaxSubscriptions bounds the subscriptions of one session: one more
	// is refused with E_RESOURCE. Zero means DefaultMaxSubscriptions.
	MaxSubscriptions int
	// AuditGrants is the level of the record written for each request the
	// enforcer admits (event grant, decision grant, with the op, the
	// correlation, the peer and the token id; refusals are always written,
	// at Warn). Nil means slog.LevelDebug: written only by a Logger that
	// enables Debug, and otherwise costing one Enabled check per request.
	AuditGrants slog.Leveler
}

// Defaults of ServerConfig.
const (
	DefaultWorkers          = 8
	DefaultWriteTimeout     = 5 * time.Second
	DefaultMaxSubscriptions = 1024
)

// HealthOp is the operation every Server answers, with no right needed:
// "SERVING", or "NOT_SERVING" once Shutdown has begun. Client.Health calls
// it.
const HealthOp = "sypas.health"

// Server is the kernel side of the bridge: it accepts daemons on a
// control.Listener (a Unix socket, or TCP with TLS: control.ListenTLS) or
// on streams another transport hands it (ServeConn), checks every frame
// they send against their session's token (the enforcer), routes requests
// to handlers, and publishes events to subscribers.
type Server struct {
	cfg ServerConfig
	log *slog.Logger

	routes atomic.Pointer[map[string]*route] // copied on write

	mu     sync.Mutex
	conns  map[*serverConn]struct{}
	stops  []context.CancelFunc // one per Serve call: ends its accept loop
	base   context.Context      // every session's context derives from it
	cancel context.CancelFunc   // Close's: cancels every session and handler
	// quit is closed, under mu, when Shutdown or Close begins (stopped):
	// Health answers NOT_SERVING, nothing new is served, Callers' feeds end.
	quit chan struct{}
	// active counts what Shutdown and Close wait for: Serve's and
	// ServeConn's calls and Callers' requests; Add under mu while not
	// stopped (enter).
	active sync.WaitGroup

	stats  serverStats
	topics topics

	inlineLogged atomic.Bool // the fallback to inline is logged once

	streamsOnce sync.Once
	streams     *control.Server // ServeConn's
	streamsErr  error
}

type route struct {
	op     string
	rights Rights
	h      Handler
	inline bool
}

// NewServer checks cfg and returns a Server with no operation but
// HealthOp. Register operations with Handle, then Serve.
func NewServer(cfg ServerConfig) (*Server, error) {
	if cfg.Workers < 0 || cfg.WriteTimeout < 0 || cfg.MaxSubscriptions < 0 {
		return nil, fmt.Errorf("%w: ServerConfig.Workers %d, WriteTimeout %v and MaxSubscriptions %d must not be negative",
			control.ErrConfig, cfg.Workers, cfg.WriteTimeout, cfg.MaxSubscriptions)
	}
	cfg.Workers = cmp.Or(cfg.Workers, DefaultWorkers)
	cfg.MaxSubscriptions = cmp.Or(cfg.MaxSubscriptions, DefaultMaxSubscriptions)
	cfg.WriteTimeout = cmp.Or(cfg.WriteTimeout, DefaultWriteTimeout)
	if cfg.Keys == nil {
		return nil, fmt.Errorf("%w: ServerConfig.Keys is required", control.ErrConfig)
	}
	if cfg.AuditGrants == nil {
		cfg.AuditGrants = slog.LevelDebug
	}
	cfg.Features = cmp.Or(cfg.Features, control.DefaultFeatures) | wire.FeatureSubscribe | wire.FeatureInline | wire.FeatureBulk
	cfg.Topics = maps.Clone(cfg.Topics) // Publish reads it: the caller may go on changing theirs
	s := &Server{cfg: cfg, log: cfg.Logger, conns: make(map[*serverConn]struct{}), quit: make(chan struct{})}
	s.base, s.cancel = context.WithCancel(context.Background())
	if s.log == nil {
		s.log = slog.Default()
	}
	s.topics.init()
	m := map[string]*route{}
	s.routes.Store(&m)
	s.Handle(HealthOp, 0, s.health, Inline)
	return s, nil
}

// Handle registers h for op, which callers must have rights for (all the
// bits; 0 means any session). It panics on an empty or over-long op, a nil
// handler or an op registered twice, as http.ServeMux does: these are
// mistakes in the program, not in its input. Handle may be called while
// the server runs.
func (s *Server) Handle(op string, rights Rights, h Handler, opts ...RouteOption) {
	if op == "" || len(op) > wire.MaxNameLen || h == nil {
		panic(fmt.Sprintf("sypas: Handle(%q): op must be 1..%d bytes and the handler non-nil", op, wire.MaxNameLen))
	}
	r := &route{op: op, rights: rights, h: h}
	for _, o := range opts {
		r.inline = r.inline || o&Inline != 0
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	old := *s.routes.Load()
	if _, dup := old[op]; dup {
		panic(fmt.Sprintf("sypas: Handle(%q): registered twice", op))
	}
	m := make(map[string]*route, len(old)+1)
	for k, v := range old {
		m[k] = v
	}
	m[op] = r
	s.routes.Store(&m)
}

func (s *Server) health(context.Context, *Request) ([]byte, error) {
	if s.stopped() {
		return notServing, nil
	}
	return serving, nil
}

var serving, notServing = []byte("SERVING"), []byte("NOT_SERVING")

// Serve accepts daemons on l until Shutdown or Close, each session served
// in its own goroutines; a slow or hostile handshake delays nobody else.
// It returns nil after Shutdown or Close, or the listener's error. l stays
// the caller's to close. One Server may serve several listeners at once,
// one Serve call (and goroutine) each: a Unix socket for the daemons of its
// host and a TLS one (control.ListenTLS) for others, with one router,
// one set of topics and one Stats; ServerConfig.Limits apply to each
// listener on its own.
func (s *Server) Serve(l *control.Listener) error {
	cs, err := control.NewServer(l, s.cfg.ServerConfig)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if !s.enter(cancel) {
		return fmt.Errorf("%w: Serve: the server was shut down", ErrClosed)
	}
	defer s.active.Done()
	err = cs.Serve(ctx, s.serveSession)
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

// ServeConn serves one daemon on conn, a stream that a transport with its
// own listener accepted and authenticated as peer: a gRPC stream adapted
// to a net.Conn, with peer from control.AttestTLS. It runs the kernel
// handshake (control.Server.HandshakeConn: inline, the token bound to
// peer, the Limits counted under peer's host), then serves the session as
// Serve serves each of its own, enforcer and audit included, until it
// ends, and closes it. conn is owned from the call on. It returns nil
// once a session that was established has ended, else why the handshake
// failed, or an error matching ErrClosed after Shutdown or Close. ctx
// bounds the handshake only; Shutdown and Close end the session, and wait
// for ServeConn to return.
func (s *Server) ServeConn(ctx context.Context, conn net.Conn, peer control.PeerIdentity) error {
	cs, err := s.streamServer()
	if err != nil {
		conn.Close()
		return err
	}
	if !s.enter(nil) { // Shutdown and Close wait for it, as for Serve's sessions
		conn.Close()
		return fmt.Errorf("%w: ServeConn: the server was shut down", ErrClosed)
	}
	defer s.active.Done()
	hctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(s.base, cancel) // Close stops the handshake
	defer stop()
	sess, err := cs.HandshakeConn(hctx, conn, peer)
	if err != nil {
		return err
	}
	defer sess.Close()
	s.serveSession(sess)
	return nil
}

// enter counts a Serve or ServeConn call, or a Caller's request, among
// those Shutdown and Close wait for (active): false once they began (the
// request is refused, E_UNAVAILABLE). stop, if not nil, ends a Serve's
// accept loop when they begin. The caller calls s.active.Done when it
// ends.
func (s *Server) enter(stop context.CancelFunc) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped() {
		return false
	}
	if stop != nil {
		s.stops = append(s.stops, stop)
	}
	s.active.Add(1)
	return true
}

// stopped reports whether Shutdown or Close began. It takes no lock.
func (s *Server) stopped() bool {
	select {
	case <-s.quit:
		return true
	default:
		return false
	}
}

// beginStop marks the server stopped (once: quit) and returns the accept
// loops to stop and the sessions to end.
func (s *Server) beginStop() ([]context.CancelFunc, []*serverConn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.stopped() {
		close(s.quit)
	}
	return s.stops, slices.Collect(maps.Keys(s.conns))
}

// streamServer is the control-plane server of ServeConn, made at its
// first call.
func (s *Server) streamServer() (*control.Server, error) {
	s.streamsOnce.Do(func() { s.streams, s.streamsErr = control.NewStreamServer(s.cfg.ServerConfig) })
	return s.streams, s.streamsErr
}

// Stopping is closed when Shutdown or Close begins: a transport that
// serves the Server its own way (package sypasgrpc's health service, its
// Subscribe streams) stops then.
func (s *Server) Stopping() <-chan struct{} { return s.quit }

// serveSession runs one daemon's session until it ends (control closes
// it when this returns).
func (s *Server) serveSession(sess *control.Session) {
	c := newServerConn(s, sess)
	s.mu.Lock()
	if s.stopped() {
		s.mu.Unlock()
		sess.Shutdown(context.Background())
		return
	}
	s.conns[c] = struct{}{}
	s.mu.Unlock()
	s.stats.sessions.Add(1)
	defer func() {
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
		s.stats.sessions.Add(-1)
		s.topics.dropConn(c)
	}()
	c.run()
}

// Shutdown stops the server in order: Health answers NOT_SERVING, no new
// daemon is accepted, and each session gets GOAWAY (docs/PROTOCOL.md
// §6.8): its daemon starts no new call, and once the calls it has in
// flight are answered it sends GOAWAY back and the session closes; then
// Serve returns, and Shutdown once ServeConn's sessions and the Callers'
// requests running have ended too (a Caller's new request is refused,
// E_UNAVAILABLE). A
// daemon that does not answer GOAWAY is closed after
// DrainTimeout. When ctx ends first, Shutdown closes what is left (Close)
// and returns ctx's error.
func (s *Server) Shutdown(ctx context.Context) error {
	stops, conns := s.beginStop()
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.sess.Drain(ctx)
			c.closeSession()
		}()
	}
	wg.Wait()
	for _, stop := range stops {
		stop()
	}
	ended := make(chan struct{})
	go func() { s.active.Wait(); close(ended) }()
	select {
	case <-ended:
	case <-ctx.Done():
		s.Close()
		return ctx.Err()
	}
	return ctx.Err()
}

// Close stops the server at once: every session ends, handlers' contexts
// are cancelled, and Serve (and Close, and each ServeConn) returns once the
// handlers running, a Caller's included, have returned (a handler that ignores its context
// delays it). It is idempotent.
func (s *Server) Close() error {
	stops, conns := s.beginStop()
	s.cancel()
	for _, c := range conns {
		c.closeSession()
	}
	for _, stop := range stops {
		stop()
	}
	s.active.Wait()
	return nil
}
