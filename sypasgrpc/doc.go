// Package sypasgrpc carries SYPAS over gRPC, to reach a kernel on another
// host with an engine users already run, monitor and load-balance. It is a
// package of its own so that programs that do not use gRPC do not link it.
//
// The service, sypas.v1.Sypas (sypas.proto, described by hand in Go: no
// protoc step), has three methods (docs/PROTOCOL.md §11):
//
//   - Session, a bidirectional stream that carries one SYPAS session as a
//     byte stream: the control handshake, then the frames inline
//     (docs/PROTOCOL.md §8.6). SYPAS's own Client uses it, through Conn, a
//     net.Conn over the stream, with the raw codec CodecName.
//   - Call, unary, and Subscribe, server-streaming, with
//     google.protobuf.BytesValue messages, for a stock gRPC client.
//
// Every method is served through the same sypas.Server: the identity is
// the verified client certificate of mutual TLS, checked against the
// kernel's Policy, and every request goes through the same enforcer,
// rights and audit records as a session on the Unix socket.
package sypasgrpc
