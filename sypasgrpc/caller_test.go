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
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/sypas/go/control"
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
