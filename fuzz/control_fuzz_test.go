package fuzz

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/sypas/sypas/control"
	"github.com/sypas/sypas/control/token"
	"github.com/sypas/sypas/frame"
	"github.com/sypas/sypas/sypas"
)

// FuzzTokenParse: token.Parse never panics and fails only with ErrMalformed
// (which matches ErrAuth); an accepted token re-encodes to exactly its bytes
// and parses again to an equal Token; Verify on any input never panics and
// never accepts a token the keyring did not sign (only the seeds are).
func FuzzTokenParse(f *testing.F) {
	keys := token.NewKeyring()
	require.NoError(f, keys.Add(1, bytes.Repeat([]byte{0x42}, 32)))
	now := time.Unix(1_700_000_000, 0)
	subj := token.Subject{UID: 1000, GID: 1000, PID: 42}
	full, err := keys.Mint(token.Claims{ID: 7, Subject: subj, Rights: token.RightsAll, Scope: "svc/orders", Expiry: now.Add(time.Hour)})
	require.NoError(f, err)
	narrow, err := token.Attenuate(full, token.RestrictRights(token.RightRequest),
		token.RestrictScope("svc/orders/eu"), token.RestrictExpiry(now.Add(time.Minute)))
	require.NoError(f, err)
	bare, err := keys.Mint(token.Claims{ID: 1, NotBefore: now, Expiry: now.Add(time.Second)})
	require.NoError(f, err)
	signed := map[string]bool{string(full): true, string(narrow): true, string(bare): true}
	for s := range signed {
		f.Add([]byte(s))
	}
	f.Add([]byte{})
	f.Add(full[:token.MinTokenSize-1])

	v := &token.Verifier{Keys: keys, Clock: func() time.Time { return now }}
	f.Fuzz(func(t *testing.T, b []byte) {
		tk, err := token.Parse(b)
		if _, verr := v.Verify(b, subj); verr == nil {
			require.True(t, signed[string(b)], "Verify accepted a token nobody signed")
		} else {
			require.ErrorIs(t, verr, token.ErrAuth)
		}
		if err != nil {
			require.ErrorIs(t, err, token.ErrMalformed)
			require.ErrorIs(t, err, token.ErrAuth)
			return
		}
		out, err := tk.MarshalBinary()
		require.NoError(t, err, "an accepted token must re-encode")
		require.Equal(t, b, out)
		tk2, err := token.Parse(out)
		require.NoError(t, err)
		require.Equal(t, tk, tk2)
	})
}

// FuzzDialHandshake: a kernel that answers HELLO with arbitrary bytes. Dial
// (the control package's frame-by-frame handshake reader and state machine,
// on top of the payload decoders fuzzed in payload_fuzz_test.go) never
// panics or hangs, fails with ErrHandshake (no fds are sent, so REGIONS can
// never succeed), and leaks no descriptor.
func FuzzDialHandshake(f *testing.F) {
	seq := uint64(0)
	enc := func(ms ...sypas.Message) []byte {
		var b []byte
		for _, m := range ms {
			seq++
			var err error
			b, err = sypas.AppendFrame(b, frame.Header{Sequence: seq}, m)
			require.NoError(f, err)
		}
		seq = 0
		return b
	}
	welcome := &sypas.Welcome{Version: 1, HeartbeatMisses: 3, HeartbeatIntervalMs: 1000, Features: sypas.FeatureTokenRefresh,
		SessionID: 5, TxRingSize: 4096, RxRingSize: 4096, MaxPayload: 1024, MaxInFlight: 8}
	regions := &sypas.Regions{Entries: []sypas.Region{{Role: sypas.RoleRingTx, ID: 1, Size: 8192}, {Role: sypas.RoleRingRx, ID: 2, Size: 8192}}}
	tok := &sypas.Token{TokenID: 7, ExpiryUnix: 1, Token: bytes.Repeat([]byte{1}, token.MinTokenSize)}
	f.Add(enc(welcome))
	f.Add(enc(welcome, regions, tok))
	f.Add(enc(welcome, tok))
	f.Add(enc(&sypas.ErrorMsg{Code: sypas.CodeVersion, Message: []byte("no")}))
	f.Add(enc(&sypas.Heartbeat{Nonce: 1}))
	f.Add([]byte("SYPS"))

	path := filepath.Join(f.TempDir(), "k.sock")
	ln, err := net.Listen("unix", path)
	require.NoError(f, err)
	f.Cleanup(func() { ln.Close() })
	inputs := make(chan []byte)
	served := make(chan struct{})
	go func() {
		for in := range inputs {
			c, err := ln.Accept()
			if err != nil {
				close(served)
				return
			}
			c.SetDeadline(time.Now().Add(5 * time.Second))
			c.Write(in)
			c.(*net.UnixConn).CloseWrite()
			var buf [512]byte
			for { // until the daemon hangs up
				if _, err := c.Read(buf[:]); err != nil {
					break
				}
			}
			c.Close()
			served <- struct{}{}
		}
	}()
	f.Cleanup(func() { close(inputs) })

	fds := func(t *testing.T) int {
		ents, err := os.ReadDir("/proc/self/fd")
		require.NoError(t, err)
		return len(ents)
	}
	cfg := control.DialConfig{SessionConfig: control.SessionConfig{HandshakeTimeout: 2 * time.Second}}
	f.Fuzz(func(t *testing.T, in []byte) {
		base := fds(t)
		inputs <- in
		s, err := control.Dial(context.Background(), path, cfg)
		if s != nil {
			s.Close()
			t.Fatal("handshake succeeded without ring fds")
		}
		<-served
		require.ErrorIs(t, err, control.ErrHandshake)
		require.False(t, errors.Is(err, os.ErrDeadlineExceeded), "hung until the deadline: %v", err)
		require.Equal(t, base, fds(t), "fd leak")
	})
}
