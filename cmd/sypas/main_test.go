package main

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The tests run the command as a user would: this test binary re-executes
// itself as "sypas ARGS..." (mainEnv set), and so do the processes the
// demo starts, which inherit the variable.
const mainEnv = "SYPAS_TEST_RUN_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(mainEnv) == "1" {
		main()
	}
	os.Exit(m.Run())
}

// result is how a command ended.
type result struct {
	stdout, stderr string
	code           int
}

// sypasCmd is "sypas args..." as a process of its own, killed at the end
// of the test if still running.
func sypasCmd(t *testing.T, args ...string) *exec.Cmd {
	cmd := exec.Command(os.Args[0], args...)
	// A race-enabled child sleeps 1 s at exit unless told otherwise.
	cmd.Env = append(os.Environ(), mainEnv+"=1", "GORACE=atexit_sleep_ms=0")
	t.Cleanup(func() {
		if cmd.Process != nil && cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	return cmd
}

// runSypas runs "sypas args..." to its end (a minute at most) with stdin.
func runSypas(t *testing.T, stdin string, args ...string) result {
	t.Helper()
	cmd := sypasCmd(t, args...)
	var out, errOut bytes.Buffer
	cmd.Stdin, cmd.Stdout, cmd.Stderr = strings.NewReader(stdin), &out, &errOut
	require.NoError(t, cmd.Start())
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var err error
	select {
	case err = <-done:
	case <-time.After(time.Minute):
		cmd.Process.Kill()
		<-done
		t.Fatalf("sypas %v did not end within a minute; stdout:\n%s\nstderr:\n%s", args, out.String(), errOut.String())
	}
	r := result{stdout: out.String(), stderr: errOut.String()}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		r.code = ee.ExitCode()
	} else {
		require.NoError(t, err)
	}
	return r
}

// lockedBuffer collects a process's output while the test reads it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

func TestServeAndCall(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "k.sock")
	serve, log := startServe(t, "-socket", sock, "-tick", "20ms")

	call := func(stdin string, args ...string) result {
		return runSypas(t, stdin, append([]string{"call", "-socket", sock}, args...)...)
	}
	ok := func(r result, stdout string) {
		t.Helper()
		assert.Equal(t, 0, r.code, "stderr: %s", r.stderr)
		assert.Equal(t, stdout, r.stdout)
	}
	refused := func(r result, code string) {
		t.Helper()
		assert.Equal(t, exitError, r.code)
		assert.Empty(t, r.stdout)
		assert.Contains(t, r.stderr, code)
	}
	ok(call("", "echo", "hello"), "hello\n")
	ok(call("from stdin\n", "echo", "-"), "from stdin\n")
	ok(call("", "kv.put", "colour=blue"), "")
	ok(call("", "kv.get", "colour"), "blue\n")
	refused(call("", "kv.get", "size"), `E_NOT_FOUND: no key "size"`)
	refused(call("", "kv.put", "novalue"), "E_PROTO")
	refused(call("", "nope"), "E_NOT_FOUND")
	refused(call("", "kv.reset"), "E_PERMISSION")
	assert.Contains(t, log.String(), `msg="sypas: refused" event=permission`, "the refusal is audited")

	w := runSypas(t, "", "watch", "-socket", sock, "-n", "2", "ticks")
	assert.Equal(t, 0, w.code, "stderr: %s", w.stderr)
	assert.Equal(t, 2, strings.Count(w.stdout, " ticks tick "), "stdout: %s", w.stdout)

	stopServe(t, serve, log)
	assert.Contains(t, log.String(), `msg="sypas: stopped"`)
}

func TestCallWithoutKernel(t *testing.T) {
	start := time.Now()
	r := runSypas(t, "", "call", "-socket", filepath.Join(t.TempDir(), "none.sock"), "echo")
	assert.Equal(t, exitError, r.code)
	assert.Contains(t, r.stderr, "no kernel at")
	assert.Less(t, time.Since(start), 30*time.Second, "fails without waiting for a reconnect")
}

func TestUsage(t *testing.T) {
	var out, errOut bytes.Buffer
	for _, args := range [][]string{nil, {"bogus"}, {"call"}, {"call", "a", "b", "c"}, {"serve", "extra"}, {"call", "-nosuchflag", "x"}} {
		errOut.Reset()
		assert.Equal(t, exitUsage, run(args, nil, &out, &errOut), "%q", args)
		assert.Contains(t, errOut.String(), "usage", "%q", args)
	}
	assert.Equal(t, exitOK, run([]string{"call", "-h"}, nil, &out, &errOut))
	assert.Empty(t, out.String())
}

func TestDemo(t *testing.T) {
	r := runSypas(t, "", "demo", "-duration", "50ms", "-in-flight", "8")
	require.Equal(t, 0, r.code, "stdout:\n%s\nstderr:\n%s", r.stdout, r.stderr)
	for _, want := range []string{
		"as the kernel attested it (op whoami):\n            uid=",
		"rights request|subscribe|publish",
		`call kv.get colour`, `→ "blue"`,
		"refused: E_PERMISSION",
		`msg="sypas: refused" event=permission`,
		"event kv     colour=blue",
		"event ticks  tick",
		"0 events dropped",
		"machine: ",
		"sypas Call", "Unix socket", "8 in flight", "sypas advantage",
		"kernel    stopped: ok=",
	} {
		assert.Contains(t, r.stdout, want)
	}
	// Whatever else a loaded machine makes the processes log, nothing failed.
	assert.NotContains(t, r.stderr, "level=ERROR")
	assert.NotContains(t, r.stderr, "panic")
	for _, l := range strings.Split(r.stdout, "\n") {
		assert.LessOrEqual(t, len([]rune(l)), 110, "a short line: %q", l)
	}
}

func TestWrapRecord(t *testing.T) {
	rec := `time=x level=WARN msg="sypas: refused" reason="a b \" c" peer=1`
	assert.Equal(t, []string{`time=x level=WARN`, `msg="sypas: refused"`, `reason="a b \" c"`, `peer=1`}, wrapRecord(rec, 20))
	assert.Equal(t, []string{rec}, wrapRecord(rec, 200))
	assert.Equal(t, "level=WARN peer=1", attrs(rec, "peer", "level"), "in the record's order")
}

// startServe starts "sypas serve args..." and waits until it serves; its
// log is the buffer.
func startServe(t *testing.T, args ...string) (*exec.Cmd, *lockedBuffer) {
	t.Helper()
	serve := sypasCmd(t, append([]string{"serve"}, args...)...)
	log := new(lockedBuffer)
	serve.Stderr = log
	require.NoError(t, serve.Start())
	require.Eventually(t, func() bool { return strings.Contains(log.String(), `msg="sypas: serving"`) },
		30*time.Second, 10*time.Millisecond, "serve did not start: %s", log.String())
	return serve, log
}

// stopServe sends SIGTERM to a "sypas serve" process, which must exit
// cleanly within a minute.
func stopServe(t *testing.T, serve *exec.Cmd, log *lockedBuffer) {
	t.Helper()
	require.NoError(t, serve.Process.Signal(syscall.SIGTERM))
	done := make(chan error, 1)
	go func() { done <- serve.Wait() }()
	select {
	case err := <-done:
		assert.NoError(t, err, "serve exits cleanly on SIGTERM: %s", log.String())
	case <-time.After(time.Minute):
		t.Fatal("serve did not stop on SIGTERM")
	}
}
