package bench

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"log/slog"
	"net"
	"os"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/sypas/go/control"
	"github.com/sypas/go/internal/testtls"
	"github.com/sypas/go/sypas"
	"github.com/sypas/go/sypasgrpc"
)

// BenchmarkGRPC: a Call's round trip over gRPC with mutual TLS 1.3 on
// loopback, to a kernel in another process, at 64 B and 4 KiB: our Client
// on the Session stream (grpc://, frames inline on the stream, the raw
// codec), beside, in the same run and against the same process and
// grpc.Server, grpc-go's own unary call of a BytesValue echo (the target of
// issue 11: sypas-grpc within 1.2× grpc-unary), and the service's unary
// Call method as a stock client calls it (sypas-grpc-call: grpc-unary plus
// the certificate's attestation and the enforcer). grpc-bidi is the floor
// of a transport on one stream: one BytesValue message each way on a
// grpc-go bidirectional stream that stays open, echoed by the server.
func BenchmarkGRPC(b *testing.B) {
	for _, size := range []int{64, 4096} {
		sz := sizeName(size)
		b.Run("sypas-grpc/"+sz, func(b *testing.B) { benchGRPCRTT(b, size, grpcSession) })
		b.Run("grpc-unary/"+sz, func(b *testing.B) { benchGRPCRTT(b, size, grpcUnary) })
		b.Run("sypas-grpc-call/"+sz, func(b *testing.B) { benchGRPCRTT(b, size, grpcStockCall) })
		b.Run("grpc-bidi/"+sz, func(b *testing.B) { benchGRPCRTT(b, size, grpcBidi) })
	}
}

// BenchmarkGRPCInFlight: calls/s and the p50/p99 of one call with 1 and
// 64 goroutines calling at once, 64-byte bodies, the three clients of
// BenchmarkGRPC, each on one connection.
func BenchmarkGRPCInFlight(b *testing.B) {
	for _, n := range []int{1, 64} {
		for _, kind := range []grpcKind{grpcSession, grpcUnary, grpcStockCall} {
			b.Run(fmt.Sprintf("%s/%d", kind, n), func(b *testing.B) {
				call := grpcCaller(b, startGRPCKernel(b), kind)
				runInFlight(b, n, func(int) func(seq uint64) error { return call(msgSize) })
			})
		}
	}
}

type grpcKind string

const (
	grpcSession   grpcKind = "sypas-grpc"
	grpcUnary     grpcKind = "grpc-unary"
	grpcStockCall grpcKind = "sypas-grpc-call"
	grpcBidi      grpcKind = "grpc-bidi"
)

func benchGRPCRTT(b *testing.B, size int, kind grpcKind) {
	call := grpcCaller(b, startGRPCKernel(b), kind)(size)
	b.SetBytes(int64(2 * size))
	timeRoundTrips(b, false, func(seq uint64) {
		if err := call(seq); err != nil {
			b.Fatal(err)
		}
	})
}

// grpcCaller returns, for a body size, a maker of one caller's call
// function: each echoes a body carrying seq and checks the reply.
func grpcCaller(b *testing.B, k grpcKernel, kind grpcKind) func(size int) func(seq uint64) error {
	ctx := context.Background()
	if kind == grpcSession {
		dctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		defer cancel()
		cfg := sypas.ClientConfig{DialConfig: control.DialConfig{TLS: k.tls}}
		cfg.Logger = slog.New(slog.DiscardHandler)
		c, err := sypas.Dial(dctx, "grpc://"+k.addr, cfg)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { c.Close() })
		return func(size int) func(uint64) error { return echoCall(c, "echo", size) }
	}
	cc, err := grpc.NewClient(k.addr, grpc.WithTransportCredentials(credentials.NewTLS(k.tls)))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cc.Close() })
	if kind == grpcBidi {
		st, err := cc.NewStream(ctx, &echoService.Streams[0], "/bench.Echo/Stream")
		if err != nil {
			b.Fatal(err)
		}
		return func(size int) func(uint64) error {
			in, out := &wrapperspb.BytesValue{Value: make([]byte, size)}, new(wrapperspb.BytesValue)
			return func(seq uint64) error {
				binary.LittleEndian.PutUint64(in.Value, seq)
				err := st.SendMsg(in)
				if err == nil {
					err = st.RecvMsg(out)
				}
				return checkEcho(seq, out.GetValue(), size, err)
			}
		}
	}
	method, cctx := "/bench.Echo/Echo", ctx
	if kind == grpcStockCall {
		method, cctx = sypasgrpc.FullCall, metadata.AppendToOutgoingContext(ctx, sypasgrpc.MetaOp, "echo")
	}
	return func(size int) func(uint64) error {
		in, out := &wrapperspb.BytesValue{Value: make([]byte, size)}, new(wrapperspb.BytesValue)
		return func(seq uint64) error {
			binary.LittleEndian.PutUint64(in.Value, seq)
			err := cc.Invoke(cctx, method, in, out)
			return checkEcho(seq, out.GetValue(), size, err)
		}
	}
}

// grpcKernel is the address of a gRPC kernel process and the daemon's TLS
// configuration for it.
type grpcKernel struct {
	addr string
	tls  *tls.Config
}

func init() { peers["grpc-kernel"] = grpcKernelPeer }

// startGRPCKernel starts grpcKernelPeer in another process, on a loopback
// listener made here (fd 3), with the run's CA (benchCA) handed over in its
// environment (never on disk).
func startGRPCKernel(b *testing.B) grpcKernel {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	f, err := l.(*net.TCPListener).File()
	if err != nil {
		b.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close() // f is a dup: the socket goes on listening for the peer
	startPeer(b, "grpc-kernel", false, []*os.File{f}, benchCAVar(b))
	f.Close()
	tc := benchDaemonTLS(b)
	tc.MinVersion = tls.VersionTLS13
	return grpcKernel{addr: addr, tls: tc}
}

// grpcKernelPeer serves, on the listener of fd 3 with mutual TLS 1.3, a
// sypas kernel's gRPC service ("echo", Inline) and a plain grpc-go echo
// of BytesValue (bench.Echo/Echo), until killed.
func grpcKernelPeer() error {
	ca, err := testtls.ParseCA(os.Getenv(benchCAEnv))
	if err != nil {
		return err
	}
	tc, err := ca.ServerConfig()
	if err != nil {
		return err
	}
	tc.ClientAuth, tc.MinVersion = tls.RequireAndVerifyClientCert, tls.VersionTLS13
	l, err := net.FileListener(os.NewFile(3, "listener"))
	if err != nil {
		return err
	}
	cfg := sypas.ServerConfig{}
	cfg.Keys = benchKeys()
	cfg.Logger = slog.New(slog.DiscardHandler)
	srv, err := sypas.NewServer(cfg)
	if err != nil {
		return err
	}
	srv.Handle("echo", sypas.RightRequest, func(_ context.Context, r *sypas.Request) ([]byte, error) { return r.Body, nil }, sypas.Inline)
	gs := grpc.NewServer(grpc.Creds(credentials.NewTLS(tc)))
	if _, err := sypasgrpc.Register(gs, srv, sypasgrpc.ServerConfig{
		Policy: &control.Policy{CertURIs: []string{testtls.DaemonURI}}, Logger: cfg.Logger,
	}); err != nil {
		return err
	}
	gs.RegisterService(&echoService, nil)
	return gs.Serve(l)
}

// echoService is a plain grpc-go echo of BytesValue, unary (the baseline)
// and on a bidirectional stream (one message back for each).
var echoService = grpc.ServiceDesc{
	ServiceName: "bench.Echo",
	HandlerType: (*any)(nil),
	Methods: []grpc.MethodDesc{{MethodName: "Echo", Handler: func(_ any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
		in := new(wrapperspb.BytesValue)
		if err := dec(in); err != nil {
			return nil, err
		}
		return in, nil
	}}},
	Streams: []grpc.StreamDesc{{StreamName: "Stream", ServerStreams: true, ClientStreams: true, Handler: func(_ any, ss grpc.ServerStream) error {
		m := new(wrapperspb.BytesValue)
		for {
			if err := ss.RecvMsg(m); err != nil {
				return nil
			}
			if err := ss.SendMsg(m); err != nil {
				return err
			}
		}
	}}},
}
