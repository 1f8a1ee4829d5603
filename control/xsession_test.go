package control

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/control/token"
	"github.com/sypas/go/ring"
	"github.com/sypas/go/wire"
)

// sessionHelper plays a session peer in another process (TestHelperProcess,
// SYPAS_HELPER=session-<mode>).
func sessionHelper(mode, sock string) int {
	ctx := context.Background()
	fail := func(err error) int { fmt.Println("ERR", err); return 1 }
	switch mode {
	case "daemon": // happy path: ping over the ring, echo the reply and token
		s, err := Dial(ctx, sock, DialConfig{SessionConfig: SessionConfig{Name: "helper"}})
		if err != nil {
			return fail(err)
		}
		if _, err := s.Producer().Write([]byte("ping from daemon")); err != nil {
			return fail(err)
		}
		s.Consumer().SetDeadline(time.Now().Add(10 * time.Second))
		buf := make([]byte, 128)
		n, err := s.Consumer().ReadInto(buf)
		if err != nil {
			return fail(err)
		}
		fmt.Printf("GOT %s\nTOKEN %x\n", buf[:n], s.Token().ID)
		<-s.GoAway()
		if err := s.Shutdown(ctx); err != nil {
			return fail(err)
		}
		fmt.Println("BYE", errors.Is(s.Err(), ErrSessionClosed))
	case "daemon-idle": // dial, then wait to be killed
		s, err := Dial(ctx, sock, DialConfig{})
		if err != nil {
			return fail(err)
		}
		fmt.Println("READY")
		<-s.Done()
	case "daemon-leak": // a child keeps the socket open after we die
		s, err := Dial(ctx, sock, DialConfig{})
		if err != nil {
			return fail(err)
		}
		f, err := s.conn.(*net.UnixConn).File()
		if err != nil {
			return fail(err)
		}
		child := exec.Command("sleep", "60")
		child.ExtraFiles = []*os.File{f}
		if err := child.Start(); err != nil {
			return fail(err)
		}
		fmt.Println("CHILD", child.Process.Pid)
		fmt.Println("READY")
		<-s.Done()
	case "daemon-misbehave": // every way to exhaust a kernel at once
		return misbehave(sock)
	case "daemon-half-hello": // die mid-handshake
		c, err := net.Dial("unix", sock)
		if err != nil {
			return fail(err)
		}
		c.Write([]byte("SYPS\x01\x20"))
		fmt.Println("READY")
		time.Sleep(time.Hour)
	case "kernel", "kernel-hang":
		l, err := Listen(sock, Config{})
		if err != nil {
			return fail(err)
		}
		listened := monoNow() // when Listen returned, for TestClientDialsWhenKernelListens
		keys := token.NewKeyring()
		keys.Rotate()
		srv, err := NewServer(l, ServerConfig{Keys: keys})
		if err != nil {
			return fail(err)
		}
		fmt.Println("LISTENING", int64(listened))
		if mode == "kernel-hang" { // accept, read HELLO, never answer
			c, err := l.Accept()
			if err != nil {
				return fail(err)
			}
			io.ReadAtLeast(c, make([]byte, 64), 1)
			fmt.Println("READY")
			time.Sleep(time.Hour)
		}
		s, err := srv.Accept(ctx)
		if err != nil {
			return fail(err)
		}
		fmt.Println("READY")
		<-s.Done()
	case "close-kernel", "close-daemon":
		return closePeerHelper(mode, sock)
	default:
		return fail(fmt.Errorf("unknown mode %q", mode))
	}
	return 0
}

type helperProc struct {
	cmd   *exec.Cmd
	lines chan string
}

func sessionHelperProc(t testing.TB, mode, sock string) *helperProc {
	t.Helper()
	return startHelper(t, helperCmd(t, os.Args[0], "session-"+mode, sock))
}

// startHelper starts cmd (from helperCmd) and collects its output lines.
func startHelper(t testing.TB, cmd *exec.Cmd) *helperProc {
	t.Helper()
	out, err := cmd.StdoutPipe()
	require.NoError(t, err)
	cmd.Stderr = os.Stderr
	require.NoError(t, cmd.Start())
	h := &helperProc{cmd: cmd, lines: make(chan string, 16)}
	go func() {
		defer close(h.lines)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			h.lines <- sc.Text()
		}
	}()
	return h
}

// expect waits for the helper to print a line starting with prefix.
func (h *helperProc) expect(t testing.TB, prefix string) string {
	t.Helper()
	timeout := time.After(20 * time.Second)
	for {
		select {
		case l, ok := <-h.lines:
			require.True(t, ok, "helper exited before printing %q", prefix)
			if strings.HasPrefix(l, prefix) {
				return l
			}
			require.False(t, strings.HasPrefix(l, "ERR"), "helper: %s", l)
		case <-timeout:
			t.Fatalf("helper did not print %q", prefix)
		}
	}
}

// kill SIGKILLs the helper and returns when it was sent.
func (h *helperProc) kill(t testing.TB) time.Time {
	t.Helper()
	at := time.Now()
	require.NoError(t, h.cmd.Process.Kill())
	return at
}

// Happy path across processes: a daemon in another process dials, both
// rings carry a message, the daemon holds the token the kernel minted for
// its attested pid, and a kernel-initiated Shutdown ends both cleanly.
func TestCrossProcessSession(t *testing.T) {
	base := countFDs(t)
	ts := startServer(t, "", ServerConfig{})
	h := sessionHelperProc(t, "daemon", ts.path)
	k := ts.session(t)
	assert.Equal(t, h.cmd.Process.Pid, k.Peer().PID)
	assert.EqualValues(t, h.cmd.Process.Pid, k.Capability().Subject.PID)
	assert.Equal(t, "ping from daemon", readRecord(t, k.Consumer()))
	_, err := k.Producer().Write([]byte("pong from kernel"))
	require.NoError(t, err)
	assert.Equal(t, "GOT pong from kernel", h.expect(t, "GOT"))
	assert.Equal(t, fmt.Sprintf("TOKEN %x", k.Token().ID), h.expect(t, "TOKEN"))
	require.NoError(t, k.Shutdown(context.Background()))
	assert.Equal(t, "BYE true", h.expect(t, "BYE"))
	require.NoError(t, h.cmd.Wait())
	assert.ErrorIs(t, k.Err(), ErrSessionClosed)
	ts.Close()
	assert.Equal(t, base, countFDs(t))
}

// A daemon that leaves (exits) after both GOAWAYs ended the session in
// order: the kernel's session records ErrSessionClosed, not a peer death,
// whether it notices the hang-up or the process's exit first (§6.8).
func TestCrossProcessExitAfterGoAwayIsOrderly(t *testing.T) {
	ts := startServer(t, "", ServerConfig{})
	h := sessionHelperProc(t, "daemon", ts.path)
	k := ts.session(t)
	defer k.Close()
	assert.Equal(t, "ping from daemon", readRecord(t, k.Consumer()))
	_, err := k.Producer().Write([]byte("pong from kernel"))
	require.NoError(t, err)
	h.expect(t, "GOT")
	require.NoError(t, k.Drain(context.Background())) // not Close: the daemon ends it
	require.NoError(t, h.cmd.Wait())
	select {
	case <-k.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the session did not end when the daemon exited")
	}
	assert.ErrorIs(t, k.Err(), ErrSessionClosed)
	assert.NotErrorIs(t, k.Err(), ErrPeerGone)
}

// waitWoken blocks a ring waiter of s in a goroutine and returns a channel
// that yields when, and with what, it was woken.
func waitWoken(s *Session) <-chan wake {
	ch := make(chan wake, 1)
	parked := make(chan struct{})
	go func() {
		s.Consumer().SetDeadline(time.Now().Add(30 * time.Second))
		close(parked)
		_, err := s.Consumer().Next()
		ch <- wake{time.Now(), err}
	}()
	<-parked
	time.Sleep(50 * time.Millisecond) // let it park on the futex
	return ch
}

type wake struct {
	at  time.Time
	err error
}

// peerDeath SIGKILLs the helper and checks that the survivor's blocked ring
// waiter is woken with ErrPeerGone; it returns kill-to-wake latency.
func peerDeath(t *testing.T, h *helperProc, s *Session) time.Duration {
	t.Helper()
	woken := waitWoken(s)
	killed := h.kill(t)
	var w wake
	select {
	case w = <-woken:
	case <-time.After(5 * time.Second):
		t.Fatal("ring waiter not woken after the peer was killed")
	}
	h.cmd.Wait()
	lat := w.at.Sub(killed)
	assert.ErrorIs(t, w.err, ErrPeerGone)
	assert.ErrorIs(t, s.Err(), ErrPeerGone)
	assert.Less(t, lat, 2*time.Second)
	_, err := s.Producer().Write([]byte("x"))
	assert.ErrorIs(t, err, ErrPeerGone, "a producer waiting for room (the ring is full) is interrupted too")
	return lat
}

// SIGKILL of the daemon mid-operation: the kernel's ring waiter is woken
// with ErrPeerGone at once (socket hang-up or pidfd), no fd is leaked.
// Latency is logged: go test -race -v -run 'TestPeerDeath' ./control/
func TestPeerDeathKernelSurvives(t *testing.T) {
	base := countFDs(t)
	ts := startServer(t, "", ServerConfig{SessionConfig: SessionConfig{TxRingSize: 4096, RxRingSize: 4096}})
	var lats []time.Duration
	for range 5 {
		h := sessionHelperProc(t, "daemon-idle", ts.path)
		k := ts.session(t)
		h.expect(t, "READY")
		fillRing(t, k.Producer())
		lats = append(lats, peerDeath(t, h, k))
		require.NoError(t, k.Close())
	}
	t.Logf("daemon SIGKILL → kernel ring waiter woken: %v", lats)
	ts.Close()
	assert.Equal(t, base, countFDs(t))
}

// The daemon dies but a child it forked keeps its socket open, so no EOF
// comes: the kernel notices through the pidfd alone.
func TestPeerDeathSeenThroughPidfd(t *testing.T) {
	ts := startServer(t, "", ServerConfig{})
	h := sessionHelperProc(t, "daemon-leak", ts.path)
	k := ts.session(t)
	var child int
	_, err := fmt.Sscanf(h.expect(t, "CHILD"), "CHILD %d", &child)
	require.NoError(t, err)
	defer syscall.Kill(child, syscall.SIGKILL)
	h.expect(t, "READY")
	fillRing(t, k.Producer())
	lat := peerDeath(t, h, k)
	assert.Contains(t, k.Err().Error(), "exited", "seen by the pidfd, not the socket")
	t.Logf("daemon SIGKILL (socket kept open by a child) → kernel ring waiter woken: %v", lat)
}

// SIGKILL of the kernel mid-operation: the daemon's ring waiter is woken
// with ErrPeerGone at once.
func TestPeerDeathDaemonSurvives(t *testing.T) {
	base := countFDs(t)
	var lats []time.Duration
	for range 5 {
		path := sockPath(t)
		h := sessionHelperProc(t, "kernel", path)
		h.expect(t, "LISTENING")
		d, err := Dial(context.Background(), path, DialConfig{SessionConfig: SessionConfig{TxRingSize: 4096, RxRingSize: 4096}})
		require.NoError(t, err)
		h.expect(t, "READY")
		fillRing(t, d.Producer())
		lats = append(lats, peerDeath(t, h, d))
		require.NoError(t, d.Close())
	}
	t.Logf("kernel SIGKILL → daemon ring waiter woken: %v", lats)
	assert.Equal(t, base, countFDs(t))
}

// fillRing fills p so that the next Write waits for room, which the peer's
// death must interrupt.
func fillRing(t *testing.T, p *ring.Producer) {
	t.Helper()
	rec := make([]byte, 1000)
	p.SetDeadline(time.Now().Add(time.Millisecond))
	for {
		if _, err := p.Write(rec); err != nil {
			require.ErrorIs(t, err, os.ErrDeadlineExceeded)
			break
		}
	}
	p.SetDeadline(time.Now().Add(30 * time.Second))
}

// SIGKILL mid-handshake, either side: the survivor fails promptly with
// ErrPeerGone (not at the 5 s handshake deadline) and leaks nothing.
func TestKillMidHandshake(t *testing.T) {
	t.Run("daemon-dies", func(t *testing.T) {
		base := countFDs(t)
		path := sockPath(t)
		l := listenFor(t, path, nil)
		srv, err := NewServer(l, ServerConfig{Keys: testKeys(t)})
		require.NoError(t, err)
		h := sessionHelperProc(t, "daemon-half-hello", path)
		h.expect(t, "READY")
		c, err := l.Accept() // attested, then the handshake waits for the rest of HELLO
		require.NoError(t, err)
		errc := make(chan error, 1)
		go func() {
			s, err := srv.Handshake(context.Background(), c)
			if s != nil {
				s.Close()
			}
			errc <- err
		}()
		time.Sleep(20 * time.Millisecond)
		killed := h.kill(t)
		err = <-errc
		t.Logf("kernel handshake failed %v after the kill: %v", time.Since(killed), err)
		assert.ErrorIs(t, err, ErrHandshake)
		assert.ErrorIs(t, err, ErrPeerGone)
		assert.Less(t, time.Since(killed), 2*time.Second)
		h.cmd.Wait()
		l.Close()
		assert.Equal(t, base, countFDs(t))
	})
	t.Run("kernel-dies", func(t *testing.T) {
		base := countFDs(t)
		path := sockPath(t)
		h := sessionHelperProc(t, "kernel-hang", path)
		h.expect(t, "LISTENING")
		errc := make(chan error, 1)
		go func() {
			s, err := Dial(context.Background(), path, DialConfig{})
			if s != nil {
				s.Close()
			}
			errc <- err
		}()
		h.expect(t, "READY") // it has our HELLO
		killed := h.kill(t)
		err := <-errc
		t.Logf("daemon handshake failed %v after the kill: %v", time.Since(killed), err)
		assert.ErrorIs(t, err, ErrHandshake)
		assert.ErrorIs(t, err, ErrPeerGone)
		assert.Less(t, time.Since(killed), 2*time.Second)
		h.cmd.Wait()
		assert.Equal(t, base, countFDs(t))
	})
}

// Reconnect after the kernel restarts, in another process: the Client
// redials with backoff and gets a fresh handshake, rings and token.
func TestClientReconnectAfterKernelRestart(t *testing.T) {
	path := sockPath(t)
	h := sessionHelperProc(t, "kernel", path)
	h.expect(t, "LISTENING")
	c := newClient(path, DialConfig{Backoff: Backoff{Base: 20 * time.Millisecond, Max: 200 * time.Millisecond}}, func() float64 { return 0.5 })
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	s1, err := c.Session(ctx)
	require.NoError(t, err)
	h.expect(t, "READY")
	tok1, id1 := s1.Token().ID, s1.Params().SessionID

	h.kill(t)
	h.cmd.Wait()
	<-s1.Done()
	assert.ErrorIs(t, s1.Err(), ErrPeerGone)
	require.NoError(t, s1.Close())
	time.Sleep(100 * time.Millisecond) // a few failed redials (no listener)

	h2 := sessionHelperProc(t, "kernel", path) // removes the stale socket
	h2.expect(t, "LISTENING")
	s2, err := c.Session(ctx)
	require.NoError(t, err)
	h2.expect(t, "READY")
	assert.NotEqual(t, tok1, s2.Token().ID, "fresh token")
	assert.NotEqual(t, id1, s2.Params().SessionID, "fresh session")
	_, err = s2.Producer().Write([]byte("after restart"))
	assert.NoError(t, err)
	require.NoError(t, c.Close())
	assert.ErrorIs(t, s2.Err(), ErrSessionClosed)
	_, err = c.Session(ctx)
	assert.ErrorIs(t, err, ErrClientClosed)
}

// The same in one process: the server is closed and listens again on the
// same path.
func TestClientReconnectInProcess(t *testing.T) {
	keys := testKeys(t)
	path := sockPath(t)
	ts := startServer(t, path, ServerConfig{Keys: keys})
	c := NewClient(path, DialConfig{Backoff: Backoff{Base: 10 * time.Millisecond, Max: 50 * time.Millisecond}})
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	s1, err := c.Session(ctx)
	require.NoError(t, err)
	k1 := ts.session(t)
	ts.Close()
	require.NoError(t, k1.Close())
	<-s1.Done()
	assert.ErrorIs(t, s1.Err(), ErrPeerGone)
	s1.Close()

	// While nobody listens, Session reports the dial error when ctx ends.
	short, cancelShort := context.WithTimeout(ctx, 50*time.Millisecond)
	_, err = c.Session(short)
	cancelShort()
	assert.ErrorIs(t, err, context.DeadlineExceeded)

	ts2 := startServer(t, path, ServerConfig{Keys: keys})
	s2, err := c.Session(ctx)
	require.NoError(t, err)
	k2 := ts2.session(t)
	assert.NotEqual(t, s1.Token().ID, s2.Token().ID)
	assert.Equal(t, k2.Token().ID, s2.Token().ID)
	_, err = s2.Producer().Write([]byte("again"))
	require.NoError(t, err)
	assert.Equal(t, "again", readRecord(t, k2.Consumer()))
	var se *wire.Error
	assert.False(t, errors.As(s2.Err(), &se))
}

// A session the Client established but nobody asked for is closed by the
// Client when it dies: nothing leaks.
func TestClientClosesUnclaimedSession(t *testing.T) {
	base := countFDs(t)
	ts := startServer(t, "", ServerConfig{})
	c := NewClient(ts.path, DialConfig{Backoff: Backoff{Base: 10 * time.Millisecond}})
	k := ts.session(t)
	require.NoError(t, k.Close()) // the daemon side dies unclaimed
	k2 := ts.session(t)           // and the Client redials (after Base: it died young)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := c.Session(ctx)
	require.NoError(t, err)
	assert.Equal(t, k2.Token().ID, s.Token().ID)
	require.NoError(t, c.Close())
	require.NoError(t, c.Close(), "idempotent")
	assert.ErrorIs(t, s.Err(), ErrSessionClosed)
	<-k2.Done()
	k2.Close()
	ts.Close()
	assert.Equal(t, base, countFDs(t))
}
