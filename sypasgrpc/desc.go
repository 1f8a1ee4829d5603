package sypasgrpc

import (
	"fmt"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// Names of the service and its methods, as on the wire (docs/PROTOCOL.md
// §10.1): a method's full name is "/" + ServiceName + "/" + its name.
const (
	ServiceName     = "sypas.v1.Sypas"
	ProtoFile       = "sypasgrpc/sypas.proto" // its path in the repository
	MethodSession   = "Session"
	MethodCall      = "Call"
	MethodSubscribe = "Subscribe"

	// FullSession, FullCall and FullSubscribe are the methods' paths.
	FullSession   = "/" + ServiceName + "/" + MethodSession
	FullCall      = "/" + ServiceName + "/" + MethodCall
	FullSubscribe = "/" + ServiceName + "/" + MethodSubscribe
)

// fileDescriptorProto describes sypas.proto in Go, so that the build needs
// no protoc: TestProtoFileMatchesDescriptor holds the two together.
func fileDescriptorProto() *descriptorpb.FileDescriptorProto {
	const bv = ".google.protobuf.BytesValue"
	method := func(name string, clientStream, serverStream bool) *descriptorpb.MethodDescriptorProto {
		m := &descriptorpb.MethodDescriptorProto{
			Name: proto.String(name), InputType: proto.String(bv), OutputType: proto.String(bv),
		}
		if clientStream {
			m.ClientStreaming = proto.Bool(true)
		}
		if serverStream {
			m.ServerStreaming = proto.Bool(true)
		}
		return m
	}
	return &descriptorpb.FileDescriptorProto{
		Name:       proto.String(ProtoFile),
		Package:    proto.String("sypas.v1"),
		Dependency: []string{wrapperspb.File_google_protobuf_wrappers_proto.Path()},
		Syntax:     proto.String("proto3"),
		Options:    &descriptorpb.FileOptions{GoPackage: proto.String("github.com/sypas/go/sypasgrpc")},
		Service: []*descriptorpb.ServiceDescriptorProto{{
			Name: proto.String("Sypas"),
			Method: []*descriptorpb.MethodDescriptorProto{
				method(MethodSession, true, true),
				method(MethodCall, false, false),
				method(MethodSubscribe, false, true),
			},
		}},
	}
}

// fileDescriptor is sypas.proto, registered in protoregistry.GlobalFiles
// (where server reflection looks) when the package is loaded.
var fileDescriptor = mustRegister()

func mustRegister() protoreflect.FileDescriptor {
	fd, err := protodesc.NewFile(fileDescriptorProto(), protoregistry.GlobalFiles)
	if err != nil {
		panic(fmt.Sprintf("sypasgrpc: the service descriptor does not build: %v", err))
	}
	if err := protoregistry.GlobalFiles.RegisterFile(fd); err != nil {
		panic(fmt.Sprintf("sypasgrpc: registering %s: %v", ProtoFile, err))
	}
	return fd
}

// FileDescriptor returns the service's file descriptor (sypas.proto), as
// server reflection describes it.
func FileDescriptor() protoreflect.FileDescriptor { return fileDescriptor }
