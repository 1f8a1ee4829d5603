package sypasgrpc

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/sypas/go/control"
	"github.com/sypas/go/sypas"
)

// Metadata keys (docs/PROTOCOL.md §10.3).
const (
	// MetaOp is the request metadata of Call that names the operation.
	MetaOp = "sypas-op"
	// MetaCode is the trailer metadata of a refused or failed Call or
	// Subscribe: the SYPAS error code's name (E_PERMISSION...), finer than
	// the gRPC status code it maps to.
	MetaCode = "sypas-code"
)

// ServerConfig configures Register.
type ServerConfig struct {
	// Policy admits client certificates by their URI SANs or subject
	// (control.Policy's CertURIs and CertSubjects): the only way in. Its
	// Unix rules do not apply. Required.
	Policy *control.Policy
	// Logger receives the audit record of each refused certificate (the
	// sypas.Server's refusals go to its own Logger). Nil: slog.Default().
	Logger *slog.Logger
	// Pending bounds the events waiting to be sent on one Subscribe
	// stream; beyond it they are dropped, counted in the Server's
	// Stats. Zero: sypas.DefaultPending.
	Pending int
}

// MaxCallers bounds the identities whose token the service keeps: one
// more evicts one (its next call mints a new token).
const MaxCallers = 4096

// Service serves sypas.v1.Sypas for a sypas.Server. It is made by
// Register.
type Service struct {
	srv    *sypas.Server
	cfg    ServerConfig
	log    *slog.Logger
	health *healthServer

	mu      sync.RWMutex
	callers map[[32]byte]*sypas.Caller // by certificate digest
}

// Register registers on gs, for srv: the sypas.v1.Sypas service, gRPC
// health checking (grpc.health.v1.Health: "" and ServiceName SERVING,
// NOT_SERVING once srv's Shutdown or Close begins, when Watch streams end
// with Unavailable) and server reflection
// (v1 and v1alpha), so that grpcurl can list, describe and call it; a
// health or reflection service gs already has is left as it is (the
// program's own health service then says when sypas.v1.Sypas serves). gs
// must use TLS credentials that require and verify a client certificate
// (credentials.NewTLS with tls.RequireAndVerifyClientCert and TLS 1.3):
// every method of sypas.v1.Sypas refuses a peer without one that
// cfg.Policy admits (PermissionDenied, audited); health and reflection
// answer any peer the handshake lets in (docs/SECURITY.md §14).
func Register(gs *grpc.Server, srv *sypas.Server, cfg ServerConfig) (*Service, error) {
	if gs == nil || srv == nil {
		return nil, fmt.Errorf("%w: sypasgrpc.Register: nil grpc.Server or sypas.Server", control.ErrConfig)
	}
	if cfg.Policy == nil || len(cfg.Policy.CertURIs)+len(cfg.Policy.CertSubjects) == 0 {
		return nil, fmt.Errorf("%w: sypasgrpc.ServerConfig.Policy admits no certificate (CertURIs, CertSubjects)", control.ErrConfig)
	}
	if cfg.Pending < 0 {
		return nil, fmt.Errorf("%w: sypasgrpc.ServerConfig.Pending %d is negative", control.ErrConfig, cfg.Pending)
	}
	// grpc exits the process (log.Fatal) on a service registered twice:
	// what gs already serves is looked at first.
	have := gs.GetServiceInfo()
	if _, dup := have[ServiceName]; dup {
		return nil, fmt.Errorf("%w: sypasgrpc.Register: %s is already registered on this grpc.Server", control.ErrConfig, ServiceName)
	}
	s := &Service{srv: srv, cfg: cfg, log: cfg.Logger, callers: make(map[[32]byte]*sypas.Caller)}
	if s.log == nil {
		s.log = slog.Default()
	}
	gs.RegisterService(&serviceDesc, s)
	if _, own := have[healthpb.Health_ServiceDesc.ServiceName]; !own {
		s.health = newHealthServer(srv.Stopping())
		healthpb.RegisterHealthServer(gs, s.health)
	}
	_, v1 := have[reflectionV1]
	_, v1alpha := have[reflectionV1Alpha]
	if !v1 && !v1alpha {
		reflection.Register(gs)
	}
	return s, nil
}

// The services of gRPC server reflection, which Register leaves to the
// program when it registered either.
const (
	reflectionV1      = "grpc.reflection.v1.ServerReflection"
	reflectionV1Alpha = "grpc.reflection.v1alpha.ServerReflection"
)

// serviceDesc is sypas.v1.Sypas as grpc serves it; its methods are those
// of fileDescriptorProto.
var serviceDesc = grpc.ServiceDesc{
	ServiceName: ServiceName,
	HandlerType: (*any)(nil),
	Methods:     []grpc.MethodDesc{{MethodName: MethodCall, Handler: callHandler}},
	Streams: []grpc.StreamDesc{
		{StreamName: MethodSession, Handler: sessionHandler, ServerStreams: true, ClientStreams: true},
		{StreamName: MethodSubscribe, Handler: subscribeHandler, ServerStreams: true},
	},
	Metadata: ProtoFile,
}

// attest is the identity of the peer of ctx: its verified client
// certificate, admitted by the Policy. A refusal is audited and returned
// as PermissionDenied.
func (s *Service) attest(ctx context.Context) (control.PeerIdentity, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return control.PeerIdentity{}, status.Error(codes.Internal, "sypasgrpc: no peer in the call's context")
	}
	ti, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok {
		id := control.PeerIdentity{UID: control.NoUID, GID: control.NoUID, Remote: p.Addr.String()}
		return id, s.refuse(ctx, id, fmt.Errorf("%w: the connection is not TLS (%v)", control.ErrPeerRejected, p.AuthInfo))
	}
	id, err := control.AttestTLS(ti.State, p.Addr, s.cfg.Policy)
	if err != nil {
		grpc.SetTrailer(ctx, metadata.Pairs(MetaCode, sypas.CodePermission.String()))
		return id, s.refuse(ctx, id, err)
	}
	return id, nil
}

// refuse audits the refusal of id for err, and returns it as the status
// of a refusal made here, before any Caller: PermissionDenied.
func (s *Service) refuse(ctx context.Context, id control.PeerIdentity, err error) error {
	control.Audit(ctx, s.log, slog.LevelWarn, "sypas: refused", control.EventAttestation, err.Error(), control.PeerAttrs(id)...)
	return status.Error(grpcCode(sypas.CodePermission), strings.TrimPrefix(err.Error(), "control: "))
}

// caller is the sypas.Caller of the peer of ctx, kept by certificate, and
// the peer itself (its address is this connection's, which the Caller's,
// made for the certificate's first connection, may not be).
func (s *Service) caller(ctx context.Context) (*sypas.Caller, control.PeerIdentity, error) {
	id, err := s.attest(ctx)
	if err != nil {
		return nil, id, err
	}
	s.mu.RLock()
	c := s.callers[id.Cert.SHA256]
	s.mu.RUnlock()
	if c != nil {
		return c, id, nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if c := s.callers[id.Cert.SHA256]; c != nil {
		return c, id, nil
	}
	c, err = s.srv.NewCaller(id)
	if err != nil {
		return nil, id, toStatus(err)
	}
	if len(s.callers) >= MaxCallers {
		for k := range s.callers { // any one: its next call mints anew
			delete(s.callers, k)
			break
		}
	}
	s.callers[id.Cert.SHA256] = c
	return c, id, nil
}

func callHandler(srv any, ctx context.Context, dec func(any) error, icpt grpc.UnaryServerInterceptor) (any, error) {
	in := new(wrapperspb.BytesValue)
	if err := dec(in); err != nil {
		return nil, err
	}
	s := srv.(*Service)
	if icpt == nil {
		return s.call(ctx, in)
	}
	info := &grpc.UnaryServerInfo{Server: srv, FullMethod: FullCall}
	return icpt(ctx, in, info, func(ctx context.Context, req any) (any, error) {
		return s.call(ctx, req.(*wrapperspb.BytesValue))
	})
}

// call serves Call: the op from MetaOp, the body from the request.
func (s *Service) call(ctx context.Context, in *wrapperspb.BytesValue) (*wrapperspb.BytesValue, error) {
	c, id, err := s.caller(ctx)
	if err != nil {
		return nil, err
	}
	var op string
	if md, ok := metadata.FromIncomingContext(ctx); ok {
		if v := md.Get(MetaOp); len(v) == 1 {
			op = v[0]
		}
	}
	reply, err := c.CallFrom(ctx, id, op, in.GetValue())
	if err != nil {
		grpc.SetTrailer(ctx, metadata.Pairs(MetaCode, sypas.CodeOf(err).String()))
		return nil, toStatus(err)
	}
	return wrapperspb.Bytes(reply), nil
}

func subscribeHandler(srv any, ss grpc.ServerStream) error {
	in := new(wrapperspb.BytesValue)
	if err := ss.RecvMsg(in); err != nil {
		return err
	}
	return srv.(*Service).subscribe(string(in.GetValue()), ss)
}

// subscribe serves Subscribe: the response headers go out once the
// subscription is registered (a client may wait for them before it expects
// events), then one message per event until the client cancels or the
// Server stops (Unavailable).
func (s *Service) subscribe(topic string, ss grpc.ServerStream) error {
	ctx := ss.Context()
	c, id, err := s.caller(ctx)
	if err != nil {
		return err
	}
	f, err := c.SubscribeFrom(ctx, id, topic, s.cfg.Pending)
	if err != nil {
		ss.SetTrailer(metadata.Pairs(MetaCode, sypas.CodeOf(err).String()))
		return toStatus(err)
	}
	defer f.Close()
	if err := ss.SendHeader(nil); err != nil {
		return err
	}
	var out wrapperspb.BytesValue
	for {
		select {
		case ev := <-f.C:
			out.Value = ev.Body
			if err := ss.SendMsg(&out); err != nil {
				return err
			}
		case <-f.Done():
			ss.SetTrailer(metadata.Pairs(MetaCode, sypas.CodeUnavailable.String()))
			return status.Error(codes.Unavailable, "the kernel is shutting down")
		case <-ctx.Done():
			return status.FromContextError(ctx.Err()).Err()
		}
	}
}

func sessionHandler(srv any, ss grpc.ServerStream) error {
	s := srv.(*Service)
	id, err := s.attest(ss.Context())
	if err != nil {
		return err
	}
	conn, done := serverConn(ss)
	// The session owns conn: its end (the daemon's GOAWAY, a hang-up, the
	// kernel's Shutdown) closes it. The stream ends when this returns,
	// which is what wakes a Write blocked on flow control: so this returns
	// as soon as conn ends the stream (closed, or a write past its
	// deadline), not when the session has finished with it.
	go func() {
		s.srv.ServeConn(ss.Context(), conn, id)
		conn.Close()
	}()
	select {
	case <-done:
	case <-ss.Context().Done():
	}
	return endStatus(conn)
}

// endStatus is how the server ends a Session stream: OK when its Conn was
// closed, ABORTED when a write broke it (the client takes that as a
// hang-up, not an orderly end).
func endStatus(c *Conn) error {
	if err := c.broken(); err != nil {
		return status.Error(codes.Aborted, err.Error())
	}
	return nil
}

// toStatus is the gRPC status of a SYPAS error (docs/PROTOCOL.md §10.5).
func toStatus(err error) error {
	code := sypas.CodeOf(err) // what the sypas-code trailer says too
	var e *sypas.Error
	if !errors.As(err, &e) {
		return status.Error(grpcCode(code), err.Error())
	}
	msg := e.Message
	if msg == "" {
		msg = e.Code.String()
	}
	return status.Error(grpcCode(code), msg)
}

// codeMap pairs each SYPAS code with the gRPC status code a stock client
// acts on (docs/PROTOCOL.md §10.5). Read left to right it is grpcCode;
// right to left, wireCode, where the first pair of a status wins.
var codeMap = []struct {
	sypas sypas.Code
	grpc  codes.Code
}{
	{sypas.CodeOK, codes.OK},
	{sypas.CodeProto, codes.InvalidArgument},
	{sypas.CodeAuth, codes.Unauthenticated},
	{sypas.CodeResource, codes.ResourceExhausted},
	{sypas.CodeTooLarge, codes.ResourceExhausted},
	{sypas.CodeInternal, codes.Internal},
	{sypas.CodeNotFound, codes.NotFound},
	{sypas.CodeTimeout, codes.DeadlineExceeded},
	{sypas.CodeUnavailable, codes.Unavailable},
	{sypas.CodeClosed, codes.Unavailable},
	{sypas.CodeVersion, codes.FailedPrecondition},
	{sypas.CodePermission, codes.PermissionDenied},
}

// grpcCode is the gRPC status code of a SYPAS code (Internal if unknown).
func grpcCode(c sypas.Code) codes.Code {
	for _, m := range codeMap {
		if m.sypas == c {
			return m.grpc
		}
	}
	return codes.Internal
}

// wireCode is the SYPAS code of a gRPC status code (E_INTERNAL if none).
func wireCode(c codes.Code) sypas.Code {
	for _, m := range codeMap {
		if m.grpc == c {
			return m.sypas
		}
	}
	return sypas.CodeInternal
}
