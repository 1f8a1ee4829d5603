package sypasgrpc

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	rpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/descriptorpb"
)

// TestReflection is what `grpcurl list` and `grpcurl describe
// sypas.v1.Sypas` do, through the reflection client API: the services are
// listed, and the service's file comes back with its dependency, enough to
// build the descriptor (and so to call it) with nothing else.
func TestReflection(t *testing.T) {
	k := StartTestKernel(t)
	cc, err := grpc.NewClient(k.Addr, grpc.WithTransportCredentials(credentials.NewTLS(k.Daemon)))
	require.NoError(t, err)
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := rpb.NewServerReflectionClient(cc).ServerReflectionInfo(ctx)
	require.NoError(t, err)

	require.NoError(t, st.Send(&rpb.ServerReflectionRequest{MessageRequest: &rpb.ServerReflectionRequest_ListServices{}}))
	r, err := st.Recv()
	require.NoError(t, err)
	var names []string
	for _, s := range r.GetListServicesResponse().GetService() {
		names = append(names, s.GetName())
	}
	assert.ElementsMatch(t, []string{ServiceName, "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}, names)

	require.NoError(t, st.Send(&rpb.ServerReflectionRequest{MessageRequest: &rpb.ServerReflectionRequest_FileContainingSymbol{FileContainingSymbol: ServiceName}}))
	r, err = st.Recv()
	require.NoError(t, err)
	var set descriptorpb.FileDescriptorSet
	for _, b := range r.GetFileDescriptorResponse().GetFileDescriptorProto() {
		fdp := new(descriptorpb.FileDescriptorProto)
		require.NoError(t, proto.Unmarshal(b, fdp))
		set.File = append([]*descriptorpb.FileDescriptorProto{fdp}, set.File...) // dependencies come after
	}
	files, err := protodesc.NewFiles(&set)
	require.NoError(t, err, "the answer holds the file and its dependencies")
	d, err := files.FindDescriptorByName(ServiceName)
	require.NoError(t, err)
	svc := d.(protoreflect.ServiceDescriptor)
	assert.Equal(t, 3, svc.Methods().Len())
	for _, m := range []struct {
		name           protoreflect.Name
		client, server bool
	}{{MethodSession, true, true}, {MethodCall, false, false}, {MethodSubscribe, false, true}} {
		md := svc.Methods().ByName(m.name)
		require.NotNil(t, md, m.name)
		assert.Equal(t, m.client, md.IsStreamingClient(), m.name)
		assert.Equal(t, m.server, md.IsStreamingServer(), m.name)
		assert.Equal(t, "google.protobuf.BytesValue", string(md.Input().FullName()))
		assert.Equal(t, "google.protobuf.BytesValue", string(md.Output().FullName()))
	}
}
