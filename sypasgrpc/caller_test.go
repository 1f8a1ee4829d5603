package sypasgrpc

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/sypas/go/control"
	"github.com/sypas/go/internal/testtls"
)

// Two connections with the same certificate share its token (one Caller),
// but each call's audit record names its own connection's address.
func TestCallAuditsEachConnection(t *testing.T) {
	k := StartTestKernel(t)
	for i := range 2 {
		var local string
		cc, err := grpc.NewClient(k.Addr, grpc.WithTransportCredentials(credentials.NewTLS(k.Daemon)),
			grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
				c, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
				if err == nil {
					local = c.LocalAddr().String()
				}
				return c, err
			}))
		require.NoError(t, err)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		ctx = metadata.AppendToOutgoingContext(ctx, MetaOp, "admin")
		err = cc.Invoke(ctx, FullCall, wrapperspb.Bytes(nil), new(wrapperspb.BytesValue))
		cancel()
		cc.Close()
		require.Equal(t, codes.PermissionDenied, status.Code(err), "%v", err)
		assert.NotNil(t, k.Log.Await(map[string]string{"event": "permission", control.LogKeyPeerAddr: local}, 5*time.Second),
			"connection %d (%s): no refusal record with its address", i, local)
	}
}

// Register on a grpc.Server that already has its own health and
// reflection services leaves them alone (grpc exits the process on a
// service registered twice), and a second Register is refused.
func TestRegisterBesideOwnHealthAndReflection(t *testing.T) {
	k := StartTestKernel(t) // for a sypas.Server
	gs := grpc.NewServer()
	own := health.NewServer()
	healthpb.RegisterHealthServer(gs, own)
	reflection.RegisterV1(gs)
	policy := &control.Policy{CertURIs: []string{testtls.DaemonURI}}
	_, err := Register(gs, k.Srv, ServerConfig{Policy: policy})
	require.NoError(t, err)
	assert.Contains(t, gs.GetServiceInfo(), ServiceName)
	_, err = Register(gs, k.Srv, ServerConfig{Policy: policy})
	assert.ErrorIs(t, err, control.ErrConfig)
}
