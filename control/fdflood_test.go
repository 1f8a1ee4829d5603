package control

import (
	"bytes"
	"context"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/frame"
	"github.com/sypas/go/ring"
	"github.com/sypas/go/wire"
)

// floodFiles returns MaxFDs descriptors of one memfd to attach to every
// message.
func floodFiles(t *testing.T) []*os.File {
	t.Helper()
	f := memfd(t, "flood")
	files := make([]*os.File, MaxFDs)
	for i := range files {
		files[i] = f
	}
	return files
}

// sendFlood writes msg one byte per sendmsg, each carrying files, until the
// receiver hangs up or the message is done, and returns the largest growth
// of this process's descriptor count seen after a send (the receiver is
// in this process).
func sendFlood(t *testing.T, send func(b []byte) error, msg []byte, base int) (peak int) {
	t.Helper()
	for i := range msg {
		err := send(msg[i : i+1])
		peak = max(peak, countFDs(t)-base)
		if err != nil {
			break
		}
	}
	return peak
}

// ringFile is a ring region's memfd, as a kernel passes it.
func ringFile(t *testing.T) *os.File {
	t.Helper()
	rg, err := ring.CreateRegion(fakeCap)
	require.NoError(t, err)
	defer rg.Close()
	f, err := os.OpenFile("/proc/self/fd/"+itoa(int(rg.File().Fd())), os.O_RDWR, 0)
	require.NoError(t, err)
	t.Cleanup(func() { f.Close() })
	return f
}

// A daemon that sends its HELLO one byte per message, each with MaxFDs
// descriptors, made the kernel hold MaxFDs descriptors per byte until the
// frame was complete (17 → 17,312 for one 1 KiB HELLO). The kernel never
// receives descriptors: the first batch ends the handshake, and it never
// holds more than that one batch, for the instant before it closes it.
func TestKernelRefusesFDFlood(t *testing.T) {
	ts := startServer(t, "", ServerConfig{})
	hello := encodeMsg(t, 1, &wire.Hello{MinVersion: 1, MaxVersion: 1, Name: bytes.Repeat([]byte("n"), 200)})
	files := floodFiles(t)
	c := rawDial(t, ts.path)
	base := countFDs(t)
	peak := sendFlood(t, func(b []byte) error { return SendFDs(c, b, files...) }, hello, base)
	t.Logf("descriptor growth peaked at %d (HELLO of %d bytes)", peak, len(hello))
	// recvmsg installs a batch (at most MaxFDs+1: the control buffer's
	// room) before Read can refuse and close it. The count is the whole
	// process's, and the in-process kernel accepts and attests while the
	// flood runs, so its own descriptors for this connection can land in
	// it too: the accepted socket, its pidfd, and the /proc files
	// attestation reads. Before the fix the growth was in the thousands.
	const connFDs = 4
	assert.LessOrEqual(t, peak, MaxFDs+1+connFDs)
	err := ts.acceptErr(t)
	assert.ErrorIs(t, err, ErrHandshake)
	assert.ErrorIs(t, err, ErrFDPassing)
	assert.ErrorIs(t, err, wire.ErrProto)
	require.Eventually(t, func() bool { return countFDs(t) <= base }, 5*time.Second, 10*time.Millisecond, "fds leaked")
}

// The same flood from a kernel, against a daemon: on WELCOME (before
// REGIONS, where one batch may come) the second batch is refused; after
// REGIONS the first one is. The growth stays bounded (before: thousands).
func TestDaemonRefusesFDFlood(t *testing.T) {
	for _, tc := range []struct {
		name    string
		regions bool // send a proper REGIONS first, flood the TOKEN
	}{
		{"welcome", false},
		{"token", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			files := floodFiles(t)
			rings := []*os.File{ringFile(t), ringFile(t)}
			a, b := socketPair(t)
			base := countFDs(t)
			type result struct {
				s   *Session
				err error
			}
			res := make(chan result, 1)
			go func() {
				s, err := dialConn(context.Background(), a, DialConfig{})
				res <- result{s, err}
			}()
			r := frame.NewReader(b, frame.Config{})
			f, err := r.ReadFrame()
			require.NoError(t, err)
			require.Equal(t, frame.TypeHello, f.Type)
			welcome := encodeMsg(t, 1, &wire.Welcome{Version: 1, HeartbeatMisses: 3, HeartbeatIntervalMs: 1000,
				SessionID: 9, TxRingSize: fakeCap, RxRingSize: fakeCap, MaxPayload: 1024, MaxInFlight: 1})
			flood := welcome
			if tc.regions {
				_, err := b.Write(welcome)
				require.NoError(t, err)
				regions := encodeMsg(t, 2, &wire.Regions{Entries: []wire.Region{
					{Role: wire.RoleRingTx, ID: 1, Size: regionSize(fakeCap)},
					{Role: wire.RoleRingRx, ID: 2, Size: regionSize(fakeCap)},
				}})
				require.NoError(t, SendFDs(b, regions, rings...))
				flood = encodeMsg(t, 3, &wire.Token{TokenID: 1, ExpiryUnix: time.Now().Add(time.Hour).UnixNano(), Token: bytes.Repeat([]byte{1}, 200)})
			}
			peak := sendFlood(t, func(p []byte) error { return SendFDs(b, p, files...) }, flood, base)
			t.Logf("descriptor growth peaked at %d", peak)
			got := <-res
			if got.s != nil {
				got.s.Close()
			}
			require.Error(t, got.err)
			assert.ErrorIs(t, got.err, ErrHandshake)
			// At most one pending batch, plus the one recvmsg installs
			// before Read refuses it, plus the two mapped rings.
			assert.LessOrEqual(t, peak, MaxFDs+(MaxFDs+1)+2)
			require.Eventually(t, func() bool { return countFDs(t) <= base }, 5*time.Second, 10*time.Millisecond, "fds leaked")
		})
	}
}
