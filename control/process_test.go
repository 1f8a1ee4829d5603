package control

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// TestHelperProcess is not a test: cross-process tests re-execute the test
// binary into it (GO_WANT_HELPER_PROCESS=1, helperCmd) to play a daemon or a
// kernel: a raw client here, a session peer (SYPAS_HELPER=session-...,
// xsession_test.go) or a hostile one (SYPAS_HELPER=hostile-..., xhostile_test.go).
func TestHelperProcess(t *testing.T) {
	if os.Getenv("GO_WANT_HELPER_PROCESS") != "1" {
		return
	}
	mode, sock := os.Getenv("SYPAS_HELPER"), os.Getenv("SYPAS_SOCK")
	if m, ok := strings.CutPrefix(mode, "session-"); ok {
		os.Exit(sessionHelper(m, sock))
	}
	if strings.HasPrefix(mode, "hostile-") { // needs t for its helpers
		os.Exit(hostileHelper(t, mode, sock))
	}
	os.Exit(helperMain(mode, sock))
}

// helperCmd prepares the test binary exe to run TestHelperProcess in mode,
// and kills it when the test ends if it has not been waited for.
func helperCmd(t testing.TB, exe, mode, sock string) *exec.Cmd {
	cmd := exec.Command(exe, "-test.run=^TestHelperProcess$")
	cmd.Env = append(os.Environ(), "GO_WANT_HELPER_PROCESS=1", "GORACE=atexit_sleep_ms=0", "SYPAS_HELPER="+mode, "SYPAS_SOCK="+sock)
	t.Cleanup(func() {
		if cmd.Process != nil && cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	return cmd
}

func helperMain(mode, sock string) int {
	if mode == "exit" {
		return 0
	}
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		if errors.Is(err, syscall.EACCES) {
			fmt.Println("EACCES")
		} else {
			fmt.Println("DIAL", err)
		}
		return 0
	}
	if mode == "connect-exit" {
		return 0 // exit with the connection still queued on the server
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	switch mode {
	case "connect":
		b := make([]byte, 2)
		if _, err := io.ReadFull(c, b); err == nil && string(b) == "ok" {
			fmt.Println("ACCEPTED")
		} else {
			fmt.Println("CLOSED")
		}
	case "recvfd":
		fmt.Println("SERVER", CheckServer(c))
		buf := make([]byte, 8)
		n, files, err := RecvFDs(c, buf, 1)
		if err != nil {
			fmt.Println("RECV", err)
			return 1
		}
		defer files[0].Close()
		seals, _ := unix.FcntlInt(files[0].Fd(), unix.F_GET_SEALS, 0)
		content, _ := io.ReadAll(io.NewSectionReader(files[0], 0, 1<<20))
		fmt.Printf("PAYLOAD %s\nSEALS %#x\nGOT %s\n", buf[:n], seals, content)
	default:
		fmt.Println("unknown mode", mode)
		return 2
	}
	return 0
}

// helper starts the test binary exe as a helper in mode. cred, if set,
// runs it under another uid/gid.
func helper(t *testing.T, exe, mode, sock string, cred *syscall.Credential) *exec.Cmd {
	t.Helper()
	cmd := helperCmd(t, exe, mode, sock)
	cmd.Stdout = new(bytes.Buffer)
	cmd.Stderr = new(bytes.Buffer)
	if cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
		cmd.Dir = filepath.Dir(exe)
	}
	require.NoError(t, cmd.Start())
	return cmd
}

func output(t *testing.T, cmd *exec.Cmd) string {
	t.Helper()
	err := cmd.Wait()
	require.NoError(t, err, "helper stderr: %s", cmd.Stderr)
	return cmd.Stdout.(*bytes.Buffer).String()
}

func listenFor(t *testing.T, path string, p *Policy) *Listener {
	t.Helper()
	l, err := Listen(path, Config{Policy: p})
	require.NoError(t, err)
	t.Cleanup(func() { l.Close() })
	require.NoError(t, l.SetDeadline(time.Now().Add(20*time.Second)))
	return l
}

// (a) A same-uid daemon is accepted and attested as itself.
func TestCrossProcessSameUID(t *testing.T) {
	exe, sum := testExe(t)
	path := sockPath(t)
	l := listenFor(t, path, nil)
	cmd := helper(t, os.Args[0], "connect", path, nil)
	c, err := l.Accept()
	require.NoError(t, err)
	defer c.Close()
	assert.Equal(t, cmd.Process.Pid, c.Peer.PID)
	assert.Equal(t, exe, c.Peer.Exe)
	assert.Equal(t, sum, c.Peer.ExeSHA256)
	assert.Equal(t, uint32(os.Geteuid()), c.Peer.UID)
	assert.Equal(t, uint32(os.Getegid()), c.Peer.GID)
	_, err = c.Write([]byte("ok"))
	require.NoError(t, err)
	assert.Equal(t, "ACCEPTED\n", output(t, cmd))
	// The pidfd reports the peer's death without any heartbeat.
	waitExited(t, c.PidFD())
}

// worldDir is a 0755 directory holding a 0755 copy of the test binary, so
// that an unprivileged helper can run it and reach a socket inside.
func worldDir(t *testing.T) (dir, exe string) {
	dir, err := os.MkdirTemp("", "sypas-xproc-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	require.NoError(t, os.Chmod(dir, 0o755))
	src, err := os.ReadFile(os.Args[0])
	require.NoError(t, err)
	exe = filepath.Join(dir, "helper.test")
	require.NoError(t, os.WriteFile(exe, src, 0o755))
	require.NoError(t, os.Chmod(exe, 0o755))
	return dir, exe
}

var nobody = &syscall.Credential{Uid: 65534, Gid: 65534}

// (b) Another local user: the 0600 socket stops it at connect(2); with the
// mode relaxed for the test, the default policy refuses its uid; an
// explicit policy naming it lets it in.
func TestCrossProcessOtherUID(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run a helper as nobody")
	}
	dir, exe := worldDir(t)

	t.Run("socket mode blocks connect", func(t *testing.T) {
		path := filepath.Join(dir, "mode.sock")
		l := listenFor(t, path, nil)
		cmd := helper(t, exe, "connect", path, nobody)
		assert.Equal(t, "EACCES\n", output(t, cmd))
		require.NoError(t, l.SetDeadline(time.Now().Add(50*time.Millisecond)))
		_, err := l.Accept()
		assert.ErrorIs(t, err, os.ErrDeadlineExceeded, "nothing reached the server")
	})
	t.Run("default policy refuses uid", func(t *testing.T) {
		path := filepath.Join(dir, "policy.sock")
		l := listenFor(t, path, nil)
		require.NoError(t, os.Chmod(path, 0o666)) // relaxed for this test only
		cmd := helper(t, exe, "connect", path, nobody)
		_, err := l.Accept()
		require.ErrorIs(t, err, ErrPeerRejected)
		assert.Contains(t, err.Error(), "uid 65534")
		assert.Equal(t, "CLOSED\n", output(t, cmd))
	})
	t.Run("explicit policy admits it", func(t *testing.T) {
		path := filepath.Join(dir, "admit.sock")
		l := listenFor(t, path, &Policy{UIDs: []uint32{65534}, GIDs: []uint32{65534}})
		require.NoError(t, os.Chmod(path, 0o666))
		cmd := helper(t, exe, "connect", path, nobody)
		c, err := l.Accept()
		require.NoError(t, err)
		defer c.Close()
		assert.Equal(t, uint32(65534), c.Peer.UID)
		assert.Equal(t, uint32(65534), c.Peer.GID)
		assert.Equal(t, exe, c.Peer.Exe)
		_, err = c.Write([]byte("ok"))
		require.NoError(t, err)
		assert.Equal(t, "ACCEPTED\n", output(t, cmd))
	})
}

// (c) The executable digest allowlist admits the test binary and refuses
// any other digest.
func TestCrossProcessExeDigest(t *testing.T) {
	_, sum := testExe(t)
	other := sum
	other[0] ^= 1
	for _, tc := range []struct {
		name string
		sums [][32]byte
		ok   bool
	}{{"allowed", [][32]byte{sum}, true}, {"other digest", [][32]byte{other}, false}} {
		t.Run(tc.name, func(t *testing.T) {
			path := sockPath(t)
			l := listenFor(t, path, &Policy{ExeSHA256: tc.sums})
			cmd := helper(t, os.Args[0], "connect", path, nil)
			c, err := l.Accept()
			if !tc.ok {
				require.ErrorIs(t, err, ErrPeerRejected)
				assert.Contains(t, err.Error(), "digest")
				assert.Equal(t, "CLOSED\n", output(t, cmd))
				return
			}
			require.NoError(t, err)
			defer c.Close()
			assert.Equal(t, sum, c.Peer.ExeSHA256)
			_, err = c.Write([]byte("ok"))
			require.NoError(t, err)
			assert.Equal(t, "ACCEPTED\n", output(t, cmd))
		})
	}
}

// (d) A sealed memfd crosses the process boundary; the child reads what
// the parent wrote and sees the seals.
func TestCrossProcessMemfd(t *testing.T) {
	path := sockPath(t)
	l := listenFor(t, path, nil)
	cmd := helper(t, os.Args[0], "recvfd", path, nil)
	c, err := l.Accept()
	require.NoError(t, err)
	defer c.Close()

	f := memfd(t, "hello from the kernel")
	seals := unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_SEAL
	_, err = unix.FcntlInt(f.Fd(), unix.F_ADD_SEALS, seals)
	require.NoError(t, err)
	require.NoError(t, SendFDs(c.Unix(), []byte("R"), f))

	out := output(t, cmd)
	assert.Equal(t, fmt.Sprintf("SERVER <nil>\nPAYLOAD R\nSEALS %#x\nGOT hello from the kernel\n", seals), out)
}

// A peer that exits before attestation finishes is refused, whether it is a
// zombie or already reaped (its pid free for reuse), with either pidfd
// source.
func TestAttestRejectsExitedPeer(t *testing.T) {
	for _, force := range []bool{false, true} {
		for _, reap := range []bool{false, true} {
			name := fmt.Sprintf("pidfd_open=%v/reaped=%v", force, reap)
			t.Run(name, func(t *testing.T) {
				path := sockPath(t)
				l := listenFor(t, path, nil)
				l.hooks.forcePidfdOpen = force
				cmd := helper(t, os.Args[0], "connect-exit", path, nil)
				fd, err := unix.PidfdOpen(cmd.Process.Pid, 0)
				require.NoError(t, err)
				watch := os.NewFile(uintptr(fd), "pidfd")
				defer watch.Close()
				waitExited(t, watch)
				if reap {
					require.NoError(t, cmd.Wait())
				}
				_, err = l.Accept()
				require.ErrorIs(t, err, ErrPeerRejected)
				t.Log(strings.TrimPrefix(err.Error(), ErrPeerRejected.Error()))
			})
		}
	}
}

// The pid-recycling defence itself: the peer dies after its /proc entries
// were read but before the final pidfd check. Those reads may now describe
// a process that reused the pid, so the peer must be refused.
func TestAttestLivenessCheckComesLast(t *testing.T) {
	for _, reap := range []bool{false, true} {
		t.Run(fmt.Sprintf("reaped=%v", reap), func(t *testing.T) {
			path := sockPath(t)
			l := listenFor(t, path, nil)
			cmd := helper(t, os.Args[0], "connect", path, nil)
			fd, err := unix.PidfdOpen(cmd.Process.Pid, 0)
			require.NoError(t, err)
			watch := os.NewFile(uintptr(fd), "pidfd")
			defer watch.Close()
			called := false
			l.hooks.beforeLiveness = func() {
				called = true
				require.NoError(t, cmd.Process.Kill())
				waitExited(t, watch)
				if reap {
					cmd.Wait()
				}
			}
			_, err = l.Accept()
			require.True(t, called)
			require.ErrorIs(t, err, ErrPeerRejected)
			assert.Contains(t, err.Error(), "peer exited during attestation")
		})
	}
}
