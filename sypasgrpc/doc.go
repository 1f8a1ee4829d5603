// Package sypasgrpc carries SYPAS over gRPC, to reach a kernel on another
// host with an engine users already run, monitor and load-balance. It is a
// package of its own so that programs that do not use gRPC do not link it.
//
// The service, sypas.v1.Sypas (sypas.proto, described by hand in Go: no
// protoc step), has three methods (docs/PROTOCOL.md §10):
//
//   - Session, a bidirectional stream that carries one SYPAS session as a
//     byte stream: the control handshake, then the frames inline
//     (docs/PROTOCOL.md §8.6). SYPAS's own Client uses it, through Conn, a
//     net.Conn over the stream, with the raw codec CodecName.
//   - Call, unary, and Subscribe, server-streaming, with
//     google.protobuf.BytesValue messages, for a stock gRPC client: the
//     operation is named by the metadata "sypas-op", the topic by the
//     request's value.
//
// Every method is served through the same sypas.Server: the identity is
// the verified client certificate of mutual TLS, checked against the
// kernel's Policy on every call, and every request goes through the same
// enforcer, rights and audit records as a session on the Unix socket
// (stock calls through a sypas.Caller per certificate).
//
// # Kernel
//
// Register the service on a grpc.Server whose credentials verify client
// certificates, then serve it:
//
//	gs := grpc.NewServer(grpc.Creds(credentials.NewTLS(tlsCfg)))
//	sypasgrpc.Register(gs, srv, sypasgrpc.ServerConfig{Policy: &control.Policy{CertURIs: uris}})
//	go gs.Serve(l)
//
// To stop, Shutdown the sypas.Server first (health turns NOT_SERVING and
// its Watch streams end, sessions drain through GOAWAY, Subscribe streams
// end), then
// GracefulStop the grpc.Server, bounded: a Subscribe client that has
// stopped reading holds its stream's last messages, and GracefulStop,
// until it reads or goes (grpc does not reset a stream the client
// half-closed), so call Stop when the bound passes.
//
// # Daemon
//
// Importing the package registers the "grpc" transport with package
// control: sypas.Dial(ctx, "grpc://host:port", cfg) (or a Fallbacks entry)
// opens a Session stream with cfg.TLS (the kernel's CAs and the daemon's
// certificate) and runs the session on it. To use a grpc.ClientConn of
// your own, OpenSession opens the stream on it as a net.Conn, for
// control.DialConn.
package sypasgrpc
