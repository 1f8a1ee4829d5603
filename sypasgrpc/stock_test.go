package sypasgrpc_test

// A stock gRPC client: grpc-go and wrapperspb only, no code of this
// project (the kernel it calls is the test's setup, StartTestKernel). The
// method names and metadata are those docs/PROTOCOL.md §10 publishes.

import (
	"context"
	"crypto/tls"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/sypas/go/sypasgrpc" // the test's server setup only
)

func stockClient(t *testing.T, addr string, tc *tls.Config) *grpc.ClientConn {
	t.Helper()
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(tc)))
	require.NoError(t, err)
	t.Cleanup(func() { cc.Close() })
	return cc
}

// call calls op with body the way any gRPC client can.
func call(cc *grpc.ClientConn, op string, body []byte) ([]byte, metadata.MD, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ctx = metadata.AppendToOutgoingContext(ctx, "sypas-op", op)
	var out wrapperspb.BytesValue
	var trailer metadata.MD
	err := cc.Invoke(ctx, "/sypas.v1.Sypas/Call", wrapperspb.Bytes(body), &out, grpc.Trailer(&trailer))
	return out.GetValue(), trailer, err
}

func TestStockClientCalls(t *testing.T) {
	k := sypasgrpc.StartTestKernel(t)
	cc := stockClient(t, k.Addr, k.Daemon)

	got, _, err := call(cc, "echo", []byte("hello"))
	require.NoError(t, err)
	assert.Equal(t, "hello", string(got))
	got, _, err = call(cc, "who", nil)
	require.NoError(t, err)
	assert.Equal(t, "CN=daemon", string(got), "the handler sees the certificate identity")

	for _, c := range []struct {
		op   string
		code codes.Code
		name string
	}{
		{"nope", codes.NotFound, "E_NOT_FOUND"},
		{"admin", codes.PermissionDenied, "E_PERMISSION"},
		{"fail", codes.NotFound, "E_NOT_FOUND"},
	} {
		_, tr, err := call(cc, c.op, nil)
		assert.Equal(t, c.code, status.Code(err), c.op)
		assert.Equal(t, []string{c.name}, tr.Get("sypas-code"), c.op)
	}
	_, _, err = call(cc, "fail", nil)
	assert.Equal(t, "no such key", status.Convert(err).Message(), "a handler's *Error travels with its message")
	assert.NotNil(t, k.Log.Await(map[string]string{"msg": "sypas: refused", "event": "permission", "op": "admin", "code": "E_PERMISSION"}, 5*time.Second),
		"the refusal is audited with the certificate's identity")
}

func TestStockClientSubscribes(t *testing.T) {
	k := sypasgrpc.StartTestKernel(t)
	cc := stockClient(t, k.Addr, k.Daemon)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := cc.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true}, "/sypas.v1.Sypas/Subscribe")
	require.NoError(t, err)
	require.NoError(t, st.SendMsg(wrapperspb.Bytes([]byte("ticks"))))
	require.NoError(t, st.CloseSend())
	_, err = st.Header() // sent once the subscription is registered
	require.NoError(t, err)
	for _, b := range []string{"1", "2", "3"} {
		require.NoError(t, k.Srv.Publish(ctx, "ticks", []byte(b)))
	}
	for _, want := range []string{"1", "2", "3"} {
		var ev wrapperspb.BytesValue
		require.NoError(t, st.RecvMsg(&ev))
		assert.Equal(t, want, string(ev.GetValue()))
	}
	k.Srv.Shutdown(ctx) // ends the stream: Unavailable
	var ev wrapperspb.BytesValue
	assert.Equal(t, codes.Unavailable, status.Code(st.RecvMsg(&ev)))
}

// Refusals: a certificate the Policy does not admit and no certificate
// are refused per call (PermissionDenied, audited); a certificate of
// another CA fails the TLS handshake.
func TestStockClientRefused(t *testing.T) {
	k := sypasgrpc.StartTestKernel(t)
	_, tr, err := call(stockClient(t, k.Addr, k.Intruder), "echo", nil)
	assert.Equal(t, codes.PermissionDenied, status.Code(err))
	assert.Equal(t, []string{"E_PERMISSION"}, tr.Get("sypas-code"))
	assert.NotNil(t, k.Log.Await(map[string]string{"msg": "sypas: refused", "event": "attestation", "cert_uri": sypasgrpc.IntruderURI}, 5*time.Second))

	_, _, err = call(stockClient(t, k.Addr, k.NoCert), "echo", nil)
	assert.Equal(t, codes.PermissionDenied, status.Code(err))

	_, _, err = call(stockClient(t, k.Addr, k.OtherCA), "echo", nil)
	assert.Equal(t, codes.Unavailable, status.Code(err), "the TLS handshake refuses a certificate of another CA: %v", err)

	assert.Zero(t, k.Srv.Stats().OK, "nothing was served")
}

func TestStockClientHealth(t *testing.T) {
	k := sypasgrpc.StartTestKernel(t)
	h := healthpb.NewHealthClient(stockClient(t, k.Addr, k.Daemon))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, svc := range []string{"", "sypas.v1.Sypas"} {
		r, err := h.Check(ctx, &healthpb.HealthCheckRequest{Service: svc})
		require.NoError(t, err)
		assert.Equal(t, healthpb.HealthCheckResponse_SERVING, r.GetStatus(), svc)
	}
	require.NoError(t, k.Srv.Shutdown(ctx))
	require.Eventually(t, func() bool {
		r, err := h.Check(ctx, &healthpb.HealthCheckRequest{Service: "sypas.v1.Sypas"})
		return err == nil && r.GetStatus() == healthpb.HealthCheckResponse_NOT_SERVING
	}, 5*time.Second, time.Millisecond, "NOT_SERVING once the kernel shuts down")
}

// A Watch of grpc.health.v1.Health open when the kernel shuts down gets
// NOT_SERVING and then ends (UNAVAILABLE), as a Subscribe stream does, so
// that it does not hold the grpc.Server's GracefulStop until its bound
// (grpc-go's own health service leaves Watch streams open); so does a
// Watch of a service the kernel does not know, and one begun after.
func TestStockClientHealthWatchEndsOnShutdown(t *testing.T) {
	k := sypasgrpc.StartTestKernel(t)
	h := healthpb.NewHealthClient(stockClient(t, k.Addr, k.Daemon))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	watch := func(svc string, want healthpb.HealthCheckResponse_ServingStatus) healthpb.Health_WatchClient {
		t.Helper()
		w, err := h.Watch(ctx, &healthpb.HealthCheckRequest{Service: svc})
		require.NoError(t, err)
		r, err := w.Recv()
		require.NoError(t, err)
		require.Equal(t, want, r.GetStatus(), "%q", svc)
		return w
	}
	ended := func(w healthpb.Health_WatchClient, svc string) {
		t.Helper()
		_, err := w.Recv()
		assert.Equal(t, codes.Unavailable, status.Code(err), "%q: %v", svc, err)
	}
	served := watch("sypas.v1.Sypas", healthpb.HealthCheckResponse_SERVING)
	unknown := watch("nope", healthpb.HealthCheckResponse_SERVICE_UNKNOWN)

	require.NoError(t, k.Srv.Shutdown(ctx))
	r, err := served.Recv()
	require.NoError(t, err)
	assert.Equal(t, healthpb.HealthCheckResponse_NOT_SERVING, r.GetStatus())
	ended(served, "sypas.v1.Sypas")
	ended(unknown, "nope")
	ended(watch("", healthpb.HealthCheckResponse_NOT_SERVING), "")

	stopped := make(chan struct{})
	go func() { k.GS.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-ctx.Done():
		t.Fatal("GracefulStop waited for a Watch after Shutdown")
	}
}

// Health answers every peer the TLS handshake lets in, the Policy guarding
// sypas.v1.Sypas alone (docs/SECURITY.md §14): a certificate the Policy
// does not admit and, with tls.VerifyClientCertIfGiven (StartTestKernel's),
// no certificate at all.
func TestStockClientHealthWithoutAdmission(t *testing.T) {
	k := sypasgrpc.StartTestKernel(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for name, tc := range map[string]*tls.Config{"intruder": k.Intruder, "no certificate": k.NoCert} {
		r, err := healthpb.NewHealthClient(stockClient(t, k.Addr, tc)).Check(ctx, &healthpb.HealthCheckRequest{Service: "sypas.v1.Sypas"})
		require.NoError(t, err, name)
		assert.Equal(t, healthpb.HealthCheckResponse_SERVING, r.GetStatus(), name)
	}
}
