package control

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/frame"
	"github.com/sypas/go/wire"
)

// misbehave plays a daemon that tries every way this package knows to
// exhaust a kernel, all at once and without pause, in a helper process
// (SYPAS_HELPER=session-daemon-misbehave): it holds connections open
// without sending a byte, opens sessions in a loop and never closes them,
// floods TOKEN_REFRESH on them, then floods heartbeats. It prints one
// "REFUSED <field>" line the first time each limit stops it, then READY
// once all four have, and goes on until killed.
func misbehave(sock string) int {
	var (
		mu      sync.Mutex
		seen    = map[string]bool{}
		printed atomic.Bool
	)
	want := []string{"MaxHandshakesPerUID", "MaxSessionsPerUID", "MaxRefreshes", "MaxControlFrames"}
	refused := func(err error) {
		var e *wire.Error
		if !errors.As(err, &e) || e.Code != wire.CodeResource {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		for _, f := range want {
			if !seen[f] && strings.Contains(e.Message, "("+f+")") {
				seen[f] = true
				fmt.Println("REFUSED", f)
			}
		}
		if len(seen) == len(want) && printed.CompareAndSwap(false, true) {
			fmt.Println("READY")
		}
	}

	// Silent connections: six at once, one more than MaxHandshakesPerUID
	// (5), so at least one is refused; three of them then go on holding
	// one each: when the kernel gives its verdict (an ERROR, or the hang-up
	// at the handshake timeout) they connect again at once.
	silent := func() {
		c, err := net.Dial("unix", sock)
		if err != nil {
			return
		}
		defer c.Close()
		r := frame.NewReader(c, frame.Config{})
		if f, err := r.ReadFrame(); err == nil && f.Type == frame.TypeError {
			var m wire.ErrorMsg
			if m.Decode(f.Payload) == nil {
				refused(m.Err())
			}
		}
	}
	for i := range 6 {
		go func() {
			for silent(); i < 3; silent() {
			}
		}()
	}
	// Sessions in a loop, never closed: two idle ones kept, the others
	// flood TOKEN_REFRESH (each waiting for its answer, as the current
	// token changes) or heartbeats until the kernel ends them.
	idle := 0
	for i := 0; ; i++ {
		s, err := Dial(context.Background(), sock, DialConfig{})
		if err != nil {
			refused(err)
			continue
		}
		switch {
		case i%3 == 0 && idle < 2:
			idle++
		case i%3 == 2:
			go func() {
				for n := uint64(0); trySendRaw(s, &wire.Heartbeat{Nonce: n}, 0) == nil; n++ {
				}
				<-s.Done()
				refused(s.Err())
			}()
		default:
			go func() {
				for s.Err() == nil && trySendRaw(s, &wire.TokenRefresh{TokenID: s.Token().ID}, s.corr.Add(1)) == nil {
					select {
					case <-s.tokenUp:
					case <-s.Done():
					}
				}
				refused(s.Err())
			}()
		}
	}
}

// One misbehaving daemon (another uid, in another process) cannot stop the
// kernel from serving the others: while it holds silent connections, opens
// sessions in a loop, floods TOKEN_REFRESH and heartbeats, each of its
// attempts is refused by a per-uid limit with E_RESOURCE, the kernel's
// descriptors stay bounded, and well-behaved daemons keep completing
// handshakes and exchanging on their rings. Before Serve and the limits,
// one silent connection held Server.Accept for the whole handshake
// timeout, and the session loop took descriptors until EMFILE.
func TestMisbehavingDaemonDoesNotStarveOthers(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run the misbehaving daemon as nobody")
	}
	dir, exe := worldDir(t)
	path := filepath.Join(dir, "k.sock")
	base := countFDs(t)
	lim := Limits{MaxSessionsPerUID: 7, MaxHandshakesPerUID: 5, MaxRefreshes: 3, RefreshInterval: time.Hour}
	sv := startServe(t, path, Config{Policy: &Policy{UIDs: []uint32{uint32(os.Geteuid()), nobody.Uid}}},
		ServerConfig{Limits: lim, SessionConfig: SessionConfig{HandshakeTimeout: time.Second}}, nil)
	require.NoError(t, os.Chmod(path, 0o666)) // for nobody; the Policy still decides

	cmd := helperCmd(t, exe, "session-daemon-misbehave", path)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: nobody}
	cmd.Dir = dir
	h := startHelper(t, cmd)
	h.expect(t, "READY")

	// The kernel's descriptors while it is under attack: the helper's
	// sessions, handshakes included, hold at most 7 × 5.
	var maxFDs atomic.Int64
	stopSampling := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			maxFDs.Store(max(maxFDs.Load(), int64(countFDs(t))))
			select {
			case <-stopSampling:
				return
			case <-time.After(time.Millisecond):
			}
		}
	}()

	// A handshake takes milliseconds; 3 s is a hundred times that, and less
	// than the 4 s that the helper's four silent connections held a serial
	// Accept.
	good := DialConfig{SessionConfig: SessionConfig{HandshakeTimeout: 3 * time.Second}}
	long := dialT(t, path, good)
	start := time.Now()
	for i := range 20 {
		d, err := Dial(context.Background(), path, good)
		require.NoError(t, err, "daemon %d refused while another misbehaves", i)
		exchange(t, d, "ping "+strconv.Itoa(i))
		exchange(t, long, "long "+strconv.Itoa(i))
		require.NoError(t, d.Close())
	}
	t.Logf("20 handshakes and 40 ring round trips in %v with a misbehaving daemon alongside; kernel fds %d at start, at most %d during", time.Since(start), base, maxFDs.Load())
	close(stopSampling)
	<-sampled

	h.kill(t)
	h.cmd.Wait()
	require.NoError(t, long.Close())
	// Well within 100 above the start (the test's own daemons hold up to
	// 16); without the limits the helper's sessions took more.
	assert.Less(t, maxFDs.Load(), int64(base+100), "kernel descriptors bounded: %d at start, at most %d", base, maxFDs.Load())

	byField := map[string]int{}
	for _, r := range sv.sink.records() {
		if r[LogKeyEvent] != EventLimit {
			continue
		}
		assert.Equal(t, strconv.Itoa(int(nobody.Uid)), r[LogKeyPeerUID], "only the misbehaving uid is limited: %v", r)
		byField[r[LogKeyLimit]]++
	}
	t.Logf("limit refusals by field: %v", byField)
	for _, f := range []string{"MaxHandshakesPerUID", "MaxSessionsPerUID", "MaxRefreshes", "MaxControlFrames"} {
		assert.Positive(t, byField[f], f)
	}
}
