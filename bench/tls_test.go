package bench

import (
	"context"
	"crypto/tls"
	"log/slog"
	"net"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/sypas/go/control"
	"github.com/sypas/go/futex"
	"github.com/sypas/go/internal/testtls"
	"github.com/sypas/go/sypas"
)

// BenchmarkCallTCP: a Call over TCP loopback with TLS 1.3 and client
// certificates (docs/PROTOCOL.md §9), its body echoed by an Inline
// handler of a kernel in another process, beside, in the same run and at
// the same size: the same Call on plain TCP loopback (what TLS costs),
// a raw request/response through net.TCPConn on both sides (go-tcp: the
// floor of any transport on TCP loopback in Go), inline on the Unix
// socket, and on the rings. Unpinned (a socket's reader
// sleeps in the kernel between frames), except the rings, pinned as their
// busy-polling is deployed. The TLS material is made for the run.
func BenchmarkCallTCP(b *testing.B) {
	for _, size := range []int{64, 4096} {
		sz := sizeName(size)
		b.Run("tcp-tls/"+sz, func(b *testing.B) { benchCallNet(b, size, true) })
		b.Run("tcp-plain/"+sz, func(b *testing.B) { benchCallNet(b, size, false) })
		b.Run("go-tcp/"+sz, func(b *testing.B) { benchGoTCPRTT(b, size) })
		b.Run("inline/"+sz, func(b *testing.B) { benchCall(b, futex.Config{}, false, size, callInline) })
		b.Run("ring/"+sz, func(b *testing.B) { benchCall(b, futex.Config{}, shouldPin(true), size, callInto) })
	}
}

// benchTLS is the run's CA, in PEM for the kernel processes too.
var benchTLS struct {
	ca  *testtls.CA
	pem string
}

func benchCA(b *testing.B) *testtls.CA {
	if benchTLS.ca == nil {
		ca, err := testtls.NewCA("sypas bench CA")
		if err != nil {
			b.Fatal(err)
		}
		p, err := ca.PEM()
		if err != nil {
			b.Fatal(err)
		}
		benchTLS.ca, benchTLS.pem = ca, p
	}
	return benchTLS.ca
}

// startNetKernel runs the benchmarks' kernel in a helper process on a
// loopback TCP port, with TLS (the run's CA) or in plaintext, and returns
// its address.
func startNetKernel(b *testing.B, withTLS bool) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	env := []string{"SYPAS_SOCK=tcp://" + addr, "SYPAS_POLICY=0"}
	if withTLS {
		env = append(env, benchCAVar(b))
	}
	startPeer(b, "sypas-kernel", false, nil, env...)
	return "tcp://" + addr
}

const benchCAEnv = "SYPAS_BENCH_TLS_CA"

// benchCAVar is the environment variable that hands the run's CA to a
// kernel process.
func benchCAVar(b *testing.B) string {
	benchCA(b)
	return benchCAEnv + "=" + benchTLS.pem
}

// benchDaemonTLS is a daemon's TLS configuration: a client certificate of
// the run's CA with the URI the kernels' Policy admits.
func benchDaemonTLS(b *testing.B) *tls.Config {
	cert, err := benchCA(b).Client("bench", testtls.DaemonURI)
	if err != nil {
		b.Fatal(err)
	}
	return benchTLS.ca.ClientConfig(cert)
}

// listenKernel listens where the benchmarks' kernel serves: a socket
// path, or tcp:// with TLS when the parent passed its CA, else plaintext.
func listenKernel(addr string) (*control.Listener, error) {
	network, where, err := control.ParseAddress(addr)
	if err != nil || network == control.NetworkUnix {
		return control.Listen(where, control.Config{})
	}
	p := os.Getenv(benchCAEnv)
	if p == "" {
		return control.ListenTLS(where, nil, control.Config{InsecurePlaintextLoopback: true})
	}
	ca, err := testtls.ParseCA(p)
	if err != nil {
		return nil, err
	}
	sc, err := ca.ServerConfig()
	if err != nil {
		return nil, err
	}
	return control.ListenTLS(where, sc, control.Config{Policy: &control.Policy{CertURIs: []string{testtls.DaemonURI}}})
}

// dialNetKernel dials a kernel of startNetKernel, waiting for it to
// listen.
func dialNetKernel(b *testing.B, addr string, withTLS bool) *sypas.Client {
	cfg := sypas.ClientConfig{}
	cfg.Logger = slog.New(slog.DiscardHandler)
	if withTLS {
		cfg.TLS = benchDaemonTLS(b)
	} else {
		cfg.InsecurePlaintextLoopback = true
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := sypas.Dial(ctx, addr, cfg)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	want := sypas.TransportTCP
	if withTLS {
		want = sypas.TransportTLS
	}
	if info, err := c.Transport(); err != nil || info.Name != want {
		b.Fatalf("transport %+v, %v", info, err)
	}
	return c
}

func benchCallNet(b *testing.B, size int, withTLS bool) {
	c := dialNetKernel(b, startNetKernel(b, withTLS), withTLS)
	timeCalls(b, c, false, 2*size, echoCall(c, "echo", size))
}

// benchCallsInFlightNet is benchCallsInFlight over TCP loopback, with TLS
// or in plaintext.
func benchCallsInFlightNet(b *testing.B, callers int, withTLS bool) {
	callsInFlight(b, dialNetKernel(b, startNetKernel(b, withTLS), withTLS), callers)
}

// benchGoTCPRTT is benchGoUnixRTT on a TCP loopback connection (Go's
// default TCP_NODELAY on both ends): the peer echoes through net.Conn.
func benchGoTCPRTT(b *testing.B, size int) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	theirs, err := l.Accept()
	if err != nil {
		b.Fatal(err)
	}
	f, err := theirs.(*net.TCPConn).File()
	theirs.Close()
	if err != nil {
		b.Fatal(err)
	}
	cmd := startPeer(b, "go-echo", false, []*os.File{f}, "SIZE="+strconv.Itoa(size))
	f.Close()
	goRTT(b, c, size)
	c.(*net.TCPConn).CloseWrite()
	waitPeer(b, cmd)
}
