package control

import (
	"bytes"
	"context"
	"net"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/sypas/go/control/token"
	"github.com/sypas/go/frame"
	"github.com/sypas/go/ring"
	"github.com/sypas/go/wire"
)

type fakeOpts struct {
	interval, misses int    // WELCOME heartbeat; 0: 1000 ms × 3
	fds              string // how REGIONS goes wrong; "" sends it right
	silent           bool   // after TOKEN, read and never answer
	// header, if set, edits the header of each handshake frame sent.
	header   func(t frame.Type, h *frame.Header)
	badToken bool // TOKEN's token_id disagrees with its token
	// grant: features WELCOME grants among those HELLO offers (an older
	// kernel granting BULK without bulk regions, say).
	grant uint64
}

const fakeCap = 4096

// badFDModes are the fakeOpts.fds values that a daemon must refuse.
var badFDModes = []string{"missing", "extra", "unsealed", "wrong-size", "same-memfd", "none", "on-welcome", "wrong-roles", "bulk-entry"}

// fakeKernel plays the kernel on conn with the wrong descriptors (or
// silence) that opts ask for. It closes everything it created before
// returning.
func fakeKernel(t *testing.T, conn *net.UnixConn, o fakeOpts) {
	defer conn.Close()
	r := frame.NewReader(conn, frame.Config{})
	f, err := r.ReadFrame()
	if err != nil || f.Type != frame.TypeHello {
		t.Errorf("fake kernel: want HELLO, got %v %v", f, err)
		return
	}
	var hello wire.Hello
	if err := hello.Decode(f.Payload); err != nil {
		t.Errorf("fake kernel: HELLO: %v", err)
		return
	}
	if o.interval == 0 {
		o.interval, o.misses = 1000, 3
	}
	seq := uint64(0)
	hdr := func(t frame.Type) frame.Header {
		seq++
		h := frame.Header{Sequence: seq}
		if o.header != nil {
			o.header(t, &h)
		}
		return h
	}
	w := wire.Welcome{Version: 1, HeartbeatMisses: uint16(o.misses), HeartbeatIntervalMs: uint32(o.interval),
		SessionID: 9, TxRingSize: fakeCap, RxRingSize: fakeCap, MaxPayload: 1024, MaxInFlight: 1,
		Features: hello.Features & o.grant}
	wb, _ := wire.AppendFrame(nil, hdr(frame.TypeWelcome), &w)

	var files []*os.File
	mk := func(capacity int) *os.File {
		rg, err := ring.CreateRegion(capacity)
		require.NoError(t, err)
		f, err := os.OpenFile("/proc/self/fd/"+itoa(int(rg.File().Fd())), os.O_RDWR, 0)
		require.NoError(t, err)
		rg.Close()
		files = append(files, f)
		return f
	}
	defer func() { closeFiles(files) }()
	unsealed := func() *os.File {
		fd, err := unix.MemfdCreate("unsealed", unix.MFD_CLOEXEC)
		require.NoError(t, err)
		f := os.NewFile(uintptr(fd), "unsealed")
		require.NoError(t, f.Truncate(int64(ring.RegionSize(fakeCap))))
		files = append(files, f)
		return f
	}
	entries := []wire.Region{
		{Role: wire.RoleRingTx, ID: 1, Size: regionSize(fakeCap)},
		{Role: wire.RoleRingRx, ID: 2, Size: regionSize(fakeCap)},
	}
	send := []*os.File{mk(fakeCap), mk(fakeCap)}
	switch o.fds {
	case "missing":
		send = send[:1]
	case "extra":
		send = append(send, mk(fakeCap))
	case "unsealed":
		send[1] = unsealed()
	case "wrong-size":
		send[0] = mk(2 * fakeCap)
	case "same-memfd": // both rings over one memory: each end would corrupt the other
		send[1] = send[0]
	case "wrong-roles":
		entries[0].Role, entries[1].Role = wire.RoleRingRx, wire.RoleRingTx
	case "bulk-entry":
		entries = append(entries, wire.Region{Role: wire.RoleBulk, ID: 3, Size: 4096})
		send = append(send, mk(fakeCap))
	}
	rb, err := wire.AppendFrame(nil, hdr(frame.TypeRegions), &wire.Regions{Entries: entries})
	require.NoError(t, err)
	switch o.fds {
	case "none":
		_, err = conn.Write(append(wb, rb...))
	case "on-welcome":
		err = SendFDs(conn, wb, send...)
		if err == nil {
			_, err = conn.Write(rb)
		}
	default:
		if _, err = conn.Write(wb); err == nil {
			err = SendFDs(conn, rb, send...)
		}
	}
	if err != nil {
		return
	}
	keys := token.NewKeyring()
	keys.Add(1, bytes.Repeat([]byte{1}, 32))
	exp := time.Now().Add(time.Hour)
	tok, _ := keys.Mint(token.Claims{Expiry: exp})
	tp, _ := token.Parse(tok)
	if o.badToken {
		tp.ID++
	}
	tb, _ := wire.AppendFrame(nil, hdr(frame.TypeToken), &wire.Token{TokenID: tp.ID, ExpiryUnix: tp.Expiry, Token: tok})
	if _, err := conn.Write(tb); err != nil {
		return
	}
	// Drain (heartbeats, ERROR) until the daemon hangs up; never answer.
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		if _, err := r.ReadFrame(); err != nil {
			return
		}
	}
}

func itoa(n int) string { return string(appendInt(nil, n)) }

func appendInt(b []byte, n int) []byte {
	if n >= 10 {
		b = appendInt(b, n/10)
	}
	return append(b, byte('0'+n%10))
}

// A kernel that passes the wrong descriptors is refused, and every
// descriptor the daemon received is closed: /proc/self/fd is back to where
// it was.
func TestDialRefusesBadFDs(t *testing.T) {
	for _, mode := range badFDModes {
		t.Run(mode, func(t *testing.T) {
			base := countFDs(t)
			fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			require.NoError(t, err)
			a, b := fileConn(t, fds[0]), fileConn(t, fds[1])
			done := make(chan struct{})
			go func() { defer close(done); fakeKernel(t, b, fakeOpts{fds: mode}) }()
			s, err := dialConn(context.Background(), a, DialConfig{})
			if s != nil {
				s.Close()
			}
			require.ErrorIs(t, err, ErrHandshake)
			assert.ErrorIs(t, err, wire.ErrProto)
			if mode == "same-memfd" {
				assert.ErrorContains(t, err, "RING_TX and RING_RX are the same memfd")
			}
			t.Log(err)
			<-done
			assert.Equal(t, base, countFDs(t), "fds leaked")
		})
	}
	t.Run("control", func(t *testing.T) { // the fake kernel itself is right
		base := countFDs(t)
		a, b := socketPair(t)
		done := make(chan struct{})
		go func() { defer close(done); fakeKernel(t, b, fakeOpts{}) }()
		s, err := dialConn(context.Background(), a, DialConfig{})
		require.NoError(t, err)
		assert.EqualValues(t, fakeCap, s.Producer().Capacity())
		require.NoError(t, s.Close())
		<-done
		assert.Equal(t, base, countFDs(t))
	})
}

// A kernel's WELCOME sets both sides' heartbeat timers. One that asks for
// 1 h × 65,535 misses (the largest values the wire allows) would make the
// daemon wait years to notice a silent kernel; the daemon refuses a
// WELCOME whose interval × misses exceeds its MaxHeartbeatTimeout.
func TestDialCapsKernelHeartbeat(t *testing.T) {
	for _, tc := range []struct {
		name             string
		interval, misses int
		max              time.Duration
		ok               bool
	}{
		{"hour-times-65535", maxHeartbeatMs, 0xFFFF, 0, false},
		{"just-above-default", 20_001, 3, 0, false},
		{"at-default", 20_000, 3, 0, true},
		{"own-limit", 2_000, 3, 5 * time.Second, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := dialFake(t, fakeOpts{interval: tc.interval, misses: tc.misses}, DialConfig{MaxHeartbeatTimeout: tc.max})
			if tc.ok {
				assert.NoError(t, err)
			} else {
				require.ErrorIs(t, err, ErrHandshake)
				assert.ErrorIs(t, err, wire.ErrProto)
				assert.ErrorContains(t, err, "above the daemon's limit")
			}
		})
	}
}

// dialFake runs Dial's handshake against fakeKernel with o and returns its
// error once both ends are closed.
func dialFake(t *testing.T, o fakeOpts, cfg DialConfig) error {
	t.Helper()
	a, b := socketPair(t)
	done := make(chan struct{})
	go func() { defer close(done); fakeKernel(t, b, o) }()
	s, err := dialConn(context.Background(), a, cfg)
	if s != nil {
		s.Close()
	}
	a.Close()
	<-done
	return err
}

func fileConn(t *testing.T, fd int) *net.UnixConn {
	f := os.NewFile(uintptr(fd), "socketpair")
	defer f.Close()
	c, err := net.FileConn(f)
	require.NoError(t, err)
	return c.(*net.UnixConn)
}

// Before TOKEN no frame may carry a cap_ref or a correlation (§6.1): a
// daemon refuses a WELCOME, REGIONS or first TOKEN with either, with
// E_PROTO. Before, it accepted them.
func TestDialRefusesCapRefBeforeToken(t *testing.T) {
	for _, typ := range []frame.Type{frame.TypeWelcome, frame.TypeRegions, frame.TypeToken} {
		for _, field := range []string{"cap_ref", "correlation"} {
			t.Run(typ.String()+"/"+field, func(t *testing.T) {
				base := countFDs(t)
				edit := func(got frame.Type, h *frame.Header) {
					if got != typ {
						return
					}
					if field == "cap_ref" {
						h.CapRef = 0x5eed
					} else {
						h.Correlation = 1
					}
				}
				err := dialFake(t, fakeOpts{header: edit}, DialConfig{})
				require.ErrorIs(t, err, ErrHandshake)
				assert.ErrorIs(t, err, wire.ErrProto)
				assert.ErrorContains(t, err, "before TOKEN")
				assert.Equal(t, base, countFDs(t), "fds leaked")
			})
		}
	}
}
