package sypasgrpc

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/sypas/go/control"
	"github.com/sypas/go/internal/testtls"
	"github.com/sypas/go/sypas"
)

// dialKernel is a sypas.Client of k over grpc://.
func dialKernel(t testing.TB, k *TestKernel, tc *tls.Config) (*sypas.Client, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := sypas.Dial(ctx, "grpc://"+k.Addr, sypas.ClientConfig{DialConfig: control.DialConfig{
		TLS: tc, SessionConfig: control.SessionConfig{Logger: slog.New(slog.DiscardHandler)},
		Backoff: control.Backoff{Base: 10 * time.Millisecond, Max: 50 * time.Millisecond},
	}})
	if err == nil {
		t.Cleanup(func() { c.Close() })
	}
	return c, err
}

// connected is a TestKernel, our Client connected to it over grpc://, and
// a context for the test's calls (10 s).
func connected(t *testing.T) (*TestKernel, *sypas.Client, context.Context) {
	t.Helper()
	k := StartTestKernel(t)
	c, err := dialKernel(t, k, k.Daemon)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return k, c, ctx
}

// The conformance suite over gRPC: calls, concurrent callers, errors and
// their codes, subscriptions, through our own Client on the Session
// stream.
func TestSessionConformance(t *testing.T) {
	k, c, ctx := connected(t)

	tr, err := c.Transport()
	require.NoError(t, err)
	assert.Equal(t, Network, tr.Name, "frames inline on the Session stream")
	assert.Equal(t, "grpc://"+k.Addr, tr.Address)
	assert.Contains(t, tr.Reason, "grpc")

	got, err := c.Call(ctx, "echo", []byte("hi"))
	require.NoError(t, err)
	assert.Equal(t, "hi", string(got))
	got, err = c.Call(ctx, "who", nil)
	require.NoError(t, err)
	assert.Equal(t, "CN=daemon", string(got), "the session's peer is the certificate")
	h, err := c.Health(ctx)
	require.NoError(t, err)
	assert.Equal(t, "SERVING", h)

	t.Run("concurrent", func(t *testing.T) {
		var wg sync.WaitGroup
		for g := range 16 {
			wg.Go(func() {
				for i := range 50 {
					want := fmt.Sprintf("%d/%d", g, i)
					got, err := c.Call(ctx, "echo", []byte(want))
					if !assert.NoError(t, err) || !assert.Equal(t, want, string(got)) {
						return
					}
				}
			})
		}
		wg.Wait()
	})

	t.Run("errors", func(t *testing.T) {
		_, err := c.Call(ctx, "nope", nil)
		assert.ErrorIs(t, err, sypas.ErrNotFound)
		_, err = c.Call(ctx, "admin", nil)
		assert.ErrorIs(t, err, sypas.ErrPermission)
		_, err = c.Call(ctx, "fail", nil)
		assert.ErrorIs(t, err, sypas.ErrNotFound)
		assert.Contains(t, err.Error(), "no such key")
		_, err = c.Call(ctx, "echo", make([]byte, 1<<20))
		assert.ErrorIs(t, err, sypas.ErrTooLarge)
		assert.NotNil(t, k.Log.Await(map[string]string{"msg": "sypas: refused", "op": "admin", "code": "E_PERMISSION", "cert_uri": "spiffe://sypas.test/daemon"}, 5*time.Second))
	})

	t.Run("subscribe", func(t *testing.T) {
		sub, err := c.Subscribe(ctx, "ticks", sypas.SubscribeOptions{})
		require.NoError(t, err)
		defer sub.Unsubscribe(ctx)
		for _, b := range []string{"a", "b", "c"} {
			require.NoError(t, k.Srv.Publish(ctx, "ticks", []byte(b)))
		}
		for _, want := range []string{"a", "b", "c"} {
			select {
			case ev := <-sub.Events():
				assert.Equal(t, want, string(ev.Body))
			case <-ctx.Done():
				t.Fatal("no event")
			}
		}
	})
}

// A revoked token ends the session (E_AUTH); the Client reconnects with a
// new attestation and token, and calls go on.
func TestSessionRevokedToken(t *testing.T) {
	k, c, ctx := connected(t)
	ti, err := c.Token()
	require.NoError(t, err)
	k.Rev.Revoke(ti.ID, ti.Expiry)
	require.Eventually(t, func() bool {
		t2, err := c.Token()
		return err == nil && t2.ID != ti.ID
	}, 5*time.Second, 5*time.Millisecond, "the Client reconnected with a new token")
	got, err := c.Call(ctx, "echo", []byte("again"))
	require.NoError(t, err)
	assert.Equal(t, "again", string(got))
	assert.NotNil(t, k.Log.Await(map[string]string{"event": "revocation"}, 5*time.Second))
}

// Refusals of the Session stream: a certificate the Policy does not
// admit, and none, are refused by the kernel (E_PERMISSION, audited); one
// from another CA fails the TLS handshake.
func TestSessionRefused(t *testing.T) {
	k := StartTestKernel(t)
	dial := func(tc *tls.Config) error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		cfg := control.DialConfig{TLS: tc}
		cfg.Logger = slog.New(slog.DiscardHandler)
		s, err := control.Dial(ctx, "grpc://"+k.Addr, cfg)
		if err == nil {
			s.Close()
		}
		return err
	}
	err := dial(k.Intruder)
	assert.ErrorIs(t, err, sypas.ErrPermission)
	assert.NotNil(t, k.Log.Await(map[string]string{"event": "attestation", "cert_uri": IntruderURI}, 5*time.Second))
	assert.ErrorIs(t, dial(k.NoCert), sypas.ErrPermission)
	err = dial(k.OtherCA)
	assert.Error(t, err)
	assert.NotErrorIs(t, err, sypas.ErrPermission, "refused by TLS, before the service")
	assert.Zero(t, k.Srv.Stats().Sessions)
	require.NoError(t, dial(k.Daemon))
}

// The kernel killed (the gRPC server stopped at once) and restarted on
// the same address: the Client reconnects by itself.
func TestSessionKernelRestarted(t *testing.T) {
	k, c, ctx := connected(t)
	_, err := c.Call(ctx, "echo", nil)
	require.NoError(t, err)
	k.restart(t)
	got, err := c.Call(ctx, "echo", []byte("back"), sypas.WaitForReady, sypas.Idempotent)
	require.NoError(t, err)
	assert.Equal(t, "back", string(got))
}

// The kernel's Shutdown drains a session on a gRPC stream as on a Unix
// socket (GOAWAY both ways, then the session closes) and returns once it
// has ended; the grpc.Server's GracefulStop then has nothing to wait for.
func TestSessionShutdown(t *testing.T) {
	k, c, ctx := connected(t)
	_, err := c.Call(ctx, "echo", nil)
	require.NoError(t, err)
	require.Equal(t, int64(1), k.Srv.Stats().Sessions)
	require.NoError(t, k.Srv.Shutdown(ctx), "drained before ctx ended")
	assert.Zero(t, k.Srv.Stats().Sessions)
	stopped := make(chan struct{})
	go func() { k.GS.GracefulStop(); close(stopped) }()
	select {
	case <-stopped: // no Session handler was left running
	case <-ctx.Done():
		t.Fatal("GracefulStop waited for a handler after Shutdown")
	}
}

// A peer admitted by its certificate that sends garbage on the Session
// stream: the kernel's handshake refuses it and ends the stream; the
// kernel goes on serving.
func TestSessionHostileBytes(t *testing.T) {
	k := StartTestKernel(t)
	cc, err := grpc.NewClient(k.Addr, grpc.WithTransportCredentials(credentials.NewTLS(k.Daemon)))
	require.NoError(t, err)
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := cc.NewStream(ctx, &sessionDesc, FullSession)
	require.NoError(t, err)
	require.NoError(t, st.SendMsg(wrapperspb.Bytes(bytes.Repeat([]byte{0xff}, 4096))))
	for {
		var m wrapperspb.BytesValue
		if err := st.RecvMsg(&m); err != nil {
			break // the kernel ended the stream
		}
	}
	assert.Zero(t, k.Srv.Stats().Sessions)
	c, err := dialKernel(t, k, k.Daemon)
	require.NoError(t, err)
	_, err = c.Call(ctx, "echo", nil)
	assert.NoError(t, err)
}

// grpc:// as a fallback: with nothing listening at the preferred Unix
// socket, the Client takes the gRPC kernel and says why.
func TestSessionAsFallback(t *testing.T) {
	k := StartTestKernel(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	cfg := sypas.ClientConfig{DialConfig: control.DialConfig{TLS: k.Daemon, Fallbacks: []string{"grpc://" + k.Addr}}}
	cfg.Logger = slog.New(slog.DiscardHandler)
	c, err := sypas.Dial(ctx, "unix://"+filepath.Join(t.TempDir(), "none.sock"), cfg)
	require.NoError(t, err)
	defer c.Close()
	tr, err := c.Transport()
	require.NoError(t, err)
	assert.Equal(t, Network, tr.Name)
	assert.Equal(t, "grpc://"+k.Addr, tr.Address)
	assert.NotEmpty(t, tr.Fallback, "why the Unix socket was passed over")
	_, err = c.Call(ctx, "echo", nil)
	assert.NoError(t, err)
}

// A TLS failure with a kernel that answered on grpc:// (its certificate
// from a CA the daemon does not trust, or the daemon's refused by the
// kernel's TLS) is a handshake failure, as on tcp://: Dial does not pass
// it over for a fallback (a man in the middle must not silently send the
// daemon elsewhere), and the error says TLS.
func TestSessionTLSFailureNotAFallback(t *testing.T) {
	k := StartTestKernel(t)
	other, err := testtls.NewCA("not the kernel's CA")
	require.NoError(t, err)
	untrusted := k.Daemon.Clone()
	untrusted.RootCAs = other.Pool
	for name, tc := range map[string]*tls.Config{"kernel not trusted": untrusted, "daemon's CA refused": k.OtherCA} {
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			none := filepath.Join(t.TempDir(), "none.sock")
			cfg := control.DialConfig{TLS: tc, Fallbacks: []string{none}}
			cfg.Logger = slog.New(slog.DiscardHandler)
			_, err := control.Dial(ctx, "grpc://"+k.Addr, cfg)
			require.Error(t, err)
			assert.False(t, control.Unreachable(err), "%v", err)
			assert.ErrorIs(t, err, control.ErrHandshake)
			assert.Contains(t, err.Error(), "TLS")
			assert.NotContains(t, err.Error(), none, "the fallback was tried")
		})
	}
}
