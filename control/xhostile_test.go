package control

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/frame"
	"github.com/sypas/go/wire"
)

// The hostile-peer tables again, across real processes: the test binary
// re-executes itself through TestHelperProcess (SYPAS_HELPER=hostile-...)
// to play the hostile daemon (against this process's Server) or the
// daemon facing a hostile kernel (this process's fakeKernel).

// hostileDaemonCase is one hostile daemon. Parent and child both build the
// table: the child sends send (with a memfd if fds) and expects code, the
// parent's Accept expects target.
type hostileDaemonCase struct {
	send    []byte
	fds     bool      // attach a memfd to send
	require uint64    // the kernel's RequireFeatures
	code    wire.Code // the ERROR the child expects; 0: a hang-up only
	msg     string    // in the ERROR's message
	target  error     // what the parent's Accept reports
}

func hostileDaemonCases(t *testing.T) map[string]hostileDaemonCase {
	hello := encodeMsg(t, 1, &wire.Hello{MinVersion: 1, MaxVersion: 1})
	badMagic := bytes.Clone(hello)
	badMagic[0] ^= 0xFF
	wrongFraming := bytes.Clone(hello)
	wrongFraming[4] = 2
	oversized := bytes.Clone(hello)
	oversized[12], oversized[13], oversized[14] = 0, 0, 0x10 // payload_len 1 MiB, never sent
	malformed := bytes.Clone(hello)
	malformed[frame.HeaderSize+4] = 1 // HELLO reserved bytes
	return map[string]hostileDaemonCase{
		"bad-magic":         {send: badMagic, code: wire.CodeProto, target: frame.ErrBadMagic},
		"framing-version":   {send: wrongFraming, code: wire.CodeVersion, target: frame.ErrVersion},
		"protocol-version":  {send: encodeMsg(t, 1, &wire.Hello{MinVersion: 2, MaxVersion: 3}), code: wire.CodeVersion, msg: "[2, 3]", target: wire.ErrVersion},
		"missing-feature":   {send: hello, require: wire.FeatureBulk, code: wire.CodeProto, msg: "required features", target: wire.ErrProto},
		"truncated-header":  {send: hello[:20], target: ErrPeerGone},
		"truncated-payload": {send: hello[:len(hello)-3], target: ErrPeerGone},
		"oversized":         {send: oversized[:frame.HeaderSize], code: wire.CodeTooLarge, target: frame.ErrTooLarge},
		"malformed-hello":   {send: malformed, code: wire.CodeProto, target: wire.ErrProto},
		"fds-with-hello":    {send: hello, fds: true, code: wire.CodeProto, target: ErrFDPassing},
	}
}

// hostileHelper runs in the child: mode is "hostile-daemon:<case>" or
// "hostile-kernel:<case>". A failed assertion fails TestHelperProcess,
// which exits non-zero with the message on stdout.
func hostileHelper(t *testing.T, mode, sock string) int {
	kind, name, _ := strings.Cut(mode, ":")
	switch kind {
	case "hostile-daemon":
		tc, ok := hostileDaemonCases(t)[name]
		require.True(t, ok, "unknown case %q", name)
		c := rawDial(t, sock)
		if tc.fds {
			require.NoError(t, SendFDs(c, tc.send, memfd(t, "x")))
		} else {
			_, err := c.Write(tc.send)
			require.NoError(t, err)
		}
		if tc.code == 0 {
			require.NoError(t, c.CloseWrite())
			rest, err := io.ReadAll(c)
			require.NoError(t, err, "want a hang-up")
			require.Empty(t, rest, "want a hang-up, no frames")
		} else {
			e := readError(t, c)
			require.Equal(t, tc.code, e.Code, "ERROR %v", e)
			require.Contains(t, e.Message, tc.msg)
		}
		fmt.Println("OK")
		return 0
	case "hostile-kernel":
		// Start the runtime's poller (epoll and its eventfd) before the
		// baseline: Dial would otherwise open them and look like a leak.
		r, w, err := os.Pipe()
		require.NoError(t, err)
		r.Close()
		w.Close()
		base := countFDs(t)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s, err := Dial(ctx, sock, DialConfig{})
		if err == nil {
			s.Close()
			fmt.Fprintln(os.Stderr, "Dial succeeded against a kernel sending", name)
			return 1
		}
		if !assert.ErrorIs(t, err, ErrHandshake) || !assert.ErrorIs(t, err, wire.ErrProto) {
			return 1
		}
		if n := countFDs(t); n != base {
			fmt.Fprintf(os.Stderr, "fds leaked: %d open before Dial, %d after (%v)\n", base, n, err)
			return 1
		}
		fmt.Println("REFUSED", err)
		return 0
	}
	fmt.Fprintln(os.Stderr, "unknown hostile mode", mode)
	return 2
}

// waitHelper waits for a hostile helper and fails with all it printed if
// it did not exit 0.
func waitHelper(t *testing.T, cmd *exec.Cmd) string {
	t.Helper()
	err := cmd.Wait()
	out := cmd.Stdout.(*bytes.Buffer).String()
	require.NoError(t, err, "helper stdout: %s\nstderr: %s", out, cmd.Stderr)
	return out
}

// (a) A hostile daemon in another process against a real Server: bad
// magic, framing and protocol version, missing required feature, truncated
// frames then EOF, an oversized length, a malformed HELLO and a memfd on
// HELLO. The child sees the ERROR (or the hang-up); the parent's Accept
// reports the violation and its fd count is back to its baseline.
func TestCrossProcessHostileDaemon(t *testing.T) {
	exe, _ := testExe(t)
	for name, tc := range hostileDaemonCases(t) {
		t.Run(name, func(t *testing.T) {
			var cfg ServerConfig
			if tc.require != 0 {
				cfg.Features, cfg.RequireFeatures = wire.FeatureTokenRefresh|tc.require, tc.require
			}
			ts := startServer(t, "", cfg)
			base := countFDs(t)
			cmd := helper(t, exe, "hostile-daemon:"+name, ts.path, nil)
			err := ts.acceptErr(t)
			assert.ErrorIs(t, err, ErrHandshake)
			assert.ErrorIs(t, err, tc.target)
			if tc.code != 0 {
				assert.Equal(t, tc.code, wire.CodeOf(err), "kernel: %v", err)
			}
			assert.Contains(t, waitHelper(t, cmd), "OK")
			assert.Equal(t, base, countFDs(t), "kernel fds leaked")
		})
	}
}

// (b) A hostile kernel against control.Dial in another process: REGIONS
// with too few, too many or unsealed fds (and the rest of
// TestDialRefusesBadFDs' modes). The child's Dial must fail with
// ErrHandshake + E_PROTO and its /proc/self/fd must be back to where it
// was; otherwise it exits non-zero.
func TestCrossProcessHostileKernel(t *testing.T) {
	exe, _ := testExe(t)
	for _, mode := range badFDModes {
		t.Run(mode, func(t *testing.T) {
			l := listenFor(t, sockPath(t), nil)
			base := countFDs(t)
			cmd := helper(t, exe, "hostile-kernel:"+mode, l.Path(), nil)
			c, err := l.Accept()
			require.NoError(t, err)
			fakeKernel(t, c.Unix(), fakeOpts{fds: mode})
			c.Close()
			assert.Contains(t, waitHelper(t, cmd), "REFUSED")
			assert.Equal(t, base, countFDs(t), "fake kernel fds leaked")
		})
	}
}
