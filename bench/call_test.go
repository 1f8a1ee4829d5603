package bench

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/sypas/go/control"
	"github.com/sypas/go/control/token"
	"github.com/sypas/go/futex"
	"github.com/sypas/go/internal/affinity"
	"github.com/sypas/go/ring"
	"github.com/sypas/go/sypas"
)

// BenchmarkCall: a Call of the bridge, body echoed by a kernel in another
// process (an Inline handler), in each idle mode. Run it beside
// BenchmarkRoundTrip: the ring's own round trip and the raw ping-pongs are
// its baselines.
func BenchmarkCall(b *testing.B) {
	for _, m := range []struct {
		name   string
		policy futex.Policy
	}{{"spin", futex.PolicySpin}, {"park", futex.PolicyPark}, {"default", futex.PolicyAuto}} {
		for _, size := range []int{64, 4096} {
			b.Run(fmt.Sprintf("%s/%s", m.name, sizeName(size)), func(b *testing.B) {
				benchCall(b, futex.Config{Policy: m.policy}, size, shouldPin(m.policy != futex.PolicyPark))
			})
		}
	}
}

func init() { peers["sypas-kernel"] = sypasKernel }

// benchKeys signs the tokens of the benchmarks' kernels: the same fixed
// test key in both processes.
func benchKeys() *token.Keyring {
	k := token.NewKeyring()
	k.Add(1, bytes.Repeat([]byte{7}, 32))
	return k
}

// startKernel runs a sypas kernel in a helper process with idle policy
// idle and returns its socket path.
func startKernel(b *testing.B, idle futex.Config, pinned bool) string {
	path := filepath.Join(b.TempDir(), "k.sock")
	startPeer(b, "sypas-kernel", pinned, nil, "SYPAS_SOCK="+path, fmt.Sprintf("SYPAS_POLICY=%d", idle.Policy))
	return path
}

func dialKernel(b *testing.B, path string, idle futex.Config) *sypas.Client {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cfg := sypas.ClientConfig{}
	cfg.Ring = ring.Config{Idle: idle}
	cfg.Logger = slog.New(slog.DiscardHandler)
	c, err := sypas.Dial(ctx, path, cfg)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	return c
}

func benchCall(b *testing.B, idle futex.Config, size int, pinned bool) {
	path := startKernel(b, idle, pinned)
	c := dialKernel(b, path, idle)
	msg := make([]byte, size)
	buf := make([]byte, 0, size)
	ctx := context.Background()
	b.SetBytes(int64(2 * size))
	timeRoundTrips(b, pinned, func(uint64) {
		out, err := c.CallInto(ctx, "echo", msg, buf[:0])
		if err != nil || len(out) != size {
			b.Fatalf("call: %d bytes, %v", len(out), err)
		}
	})
}

// sypasKernel serves "echo" (Inline) on SYPAS_SOCK until killed.
func sypasKernel() error {
	if os.Getenv("SYPAS_PEER_PIN") == "1" {
		// The work runs on the session's goroutines: pin every thread.
		if err := affinity.PinProcess(1); err != nil {
			return err
		}
	}
	cfg := sypas.ServerConfig{}
	cfg.Keys = benchKeys()
	cfg.Logger = slog.New(slog.DiscardHandler)
	cfg.Ring = ring.Config{Idle: futex.Config{Policy: futex.Policy(envInt("SYPAS_POLICY"))}}
	srv, err := sypas.NewServer(cfg)
	if err != nil {
		return err
	}
	srv.Handle("echo", sypas.RightRequest, func(_ context.Context, r *sypas.Request) ([]byte, error) { return r.Body, nil }, sypas.Inline)
	l, err := control.Listen(os.Getenv("SYPAS_SOCK"), control.Config{})
	if err != nil {
		return err
	}
	return srv.Serve(l)
}

func sizeName(n int) string {
	if n >= 1024 {
		return fmt.Sprintf("%dKiB", n/1024)
	}
	return fmt.Sprintf("%dB", n)
}
