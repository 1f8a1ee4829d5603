package sypasgrpc

import (
	"context"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// healthServer is grpc-go's health service, whose Watch streams end once
// the kernel has begun to stop: grpc-go's leave them open after
// NOT_SERVING (a client's health checking, grpcurl's Watch), and each held
// the grpc.Server's GracefulStop until its bound.
type healthServer struct {
	*health.Server
	down <-chan struct{} // closed once Shutdown has set NOT_SERVING
}

// newHealthServer is the health service of a kernel that stops when
// stopping closes: "" and ServiceName SERVING, then NOT_SERVING.
func newHealthServer(stopping <-chan struct{}) *healthServer {
	down := make(chan struct{})
	h := &healthServer{Server: health.NewServer(), down: down}
	h.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	h.SetServingStatus(ServiceName, healthpb.HealthCheckResponse_SERVING)
	go func() {
		<-stopping
		h.Shutdown() // NOT_SERVING for every service, and stays so
		close(down)
	}()
	return h
}

// Watch is grpc-go's until the kernel stops; then the stream gets the
// service's last status if it has not yet (NOT_SERVING; nothing for a
// service it does not know) and ends with UNAVAILABLE, as Subscribe does.
func (h *healthServer) Watch(in *healthpb.HealthCheckRequest, ss healthpb.Health_WatchServer) error {
	ctx, cancel := context.WithCancel(ss.Context())
	defer cancel()
	go func() {
		select {
		case <-h.down:
			cancel()
		case <-ctx.Done():
		}
	}()
	w := &watchStream{Health_WatchServer: ss, ctx: ctx, last: -1}
	err := h.Server.Watch(in, w)
	select {
	case <-h.down:
	default:
		return err // the client went, or Send failed
	}
	if ss.Context().Err() != nil {
		return err
	}
	// The inner Watch has returned: this goroutine alone sends now.
	if r, cerr := h.Check(ss.Context(), in); cerr == nil && r.GetStatus() != w.last {
		if err := ss.Send(r); err != nil {
			return err
		}
	}
	return status.Error(codes.Unavailable, "the kernel is shutting down")
}

// watchStream is a Watch stream whose context ends when the kernel stops,
// noting the last status sent.
type watchStream struct {
	healthpb.Health_WatchServer
	ctx  context.Context
	last healthpb.HealthCheckResponse_ServingStatus
}

func (w *watchStream) Context() context.Context { return w.ctx }

func (w *watchStream) Send(r *healthpb.HealthCheckResponse) error {
	if err := w.Health_WatchServer.Send(r); err != nil {
		return err
	}
	w.last = r.GetStatus()
	return nil
}
