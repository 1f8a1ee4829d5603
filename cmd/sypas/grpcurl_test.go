package main

import (
	"bytes"
	"encoding/base64"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// grpcurlEnv names the grpcurl binary TestGRPCurl runs; unset, it looks
// for grpcurl on PATH. "make grpcurl-check" builds a pinned version and
// sets it.
const grpcurlEnv = "GRPCURL"

// findGRPCurl is the grpcurl to run, or a skip: CI has none, and nothing
// may depend on a tool installed by hand. A $GRPCURL that is not there
// fails: whoever set it meant the test to run.
func findGRPCurl(t *testing.T) string {
	t.Helper()
	if p := os.Getenv(grpcurlEnv); p != "" {
		p, err := exec.LookPath(p)
		require.NoError(t, err, "$%s", grpcurlEnv)
		return p
	}
	p, err := exec.LookPath("grpcurl")
	if err != nil {
		t.Skipf("grpcurl not found: set $%s or put it on PATH (make grpcurl-check builds a pinned one)", grpcurlEnv)
	}
	return p
}

// TestGRPCurl is issue 11's check with the real tool: "sypas serve -grpc"
// is listed, described and called by grpcurl with mutual TLS and no
// .proto at hand (server reflection), health-checked, and subscribed to.
// The body of a Call is a google.protobuf.BytesValue, whose JSON form is
// the bare base64 string (not {"value": ...}); -format text takes it as
// text. docs/PROTOCOL.md §10.7 records a run.
func TestGRPCurl(t *testing.T) {
	bin := findGRPCurl(t)
	dir := t.TempDir()
	p := newPKI(t, dir)
	addr := freeAddr(t)
	serve, log := startServe(t, append([]string{"-socket", filepath.Join(dir, "k.sock"), "-grpc", addr, "-tick", "20ms"}, p.serverFlags()...)...)

	// grpcurl runs grpcurl with cert and key and returns its stdout,
	// stderr and exit status; every run is bounded (a later -max-time in
	// args wins).
	grpcurl := func(cert, key string, args ...string) (stdout, stderr string, code int) {
		t.Helper()
		cmd := exec.Command(bin, append([]string{"-cacert", p.ca, "-cert", cert, "-key", key, "-max-time", "10"}, args...)...)
		var out, errOut bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errOut
		err := cmd.Run()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			code = ee.ExitCode()
		} else {
			require.NoError(t, err)
		}
		return out.String(), errOut.String(), code
	}
	ok := func(args ...string) string {
		t.Helper()
		out, errOut, code := grpcurl(p.daemonCert, p.daemonKey, args...)
		require.Equal(t, 0, code, "grpcurl %q: %s", args, errOut)
		return out
	}
	b64 := func(s string) string { return `"` + base64.StdEncoding.EncodeToString([]byte(s)) + `"` }

	assert.Equal(t, "grpc.health.v1.Health\ngrpc.reflection.v1.ServerReflection\ngrpc.reflection.v1alpha.ServerReflection\nsypas.v1.Sypas\n",
		ok(addr, "list"))
	assert.Equal(t, "sypas.v1.Sypas.Call\nsypas.v1.Sypas.Session\nsypas.v1.Sypas.Subscribe\n", ok(addr, "list", "sypas.v1.Sypas"))
	d := ok(addr, "describe", "sypas.v1.Sypas")
	for _, m := range []string{
		"rpc Call ( .google.protobuf.BytesValue ) returns ( .google.protobuf.BytesValue );",
		"rpc Session ( stream .google.protobuf.BytesValue ) returns ( stream .google.protobuf.BytesValue );",
		"rpc Subscribe ( .google.protobuf.BytesValue ) returns ( stream .google.protobuf.BytesValue );",
	} {
		assert.Contains(t, d, m)
	}
	assert.Contains(t, ok(addr, "describe", "sypas.v1.Sypas.Call"), "sypas.v1.Sypas.Call is a method:")
	// The dependency came with the service's file.
	assert.Contains(t, ok(addr, "describe", "google.protobuf.BytesValue"), "bytes value = 1;")

	assert.Equal(t, b64("hello grpcurl")+"\n", ok("-H", "sypas-op: echo", "-d", b64("hello grpcurl"), addr, "sypas.v1.Sypas/Call"))
	assert.Equal(t, "value: \"hello text\"\n", ok("-format", "text", "-H", "sypas-op: echo", "-d", `value: "hello text"`, addr, "sypas.v1.Sypas/Call"))
	assert.Contains(t, ok(addr, "grpc.health.v1.Health/Check"), `"status": "SERVING"`)
	assert.Contains(t, ok("-d", `{"service":"sypas.v1.Sypas"}`, addr, "grpc.health.v1.Health/Check"), `"status": "SERVING"`)

	// Refused by the enforcer: the status, and the trailer with the code.
	out, errOut, code := grpcurl(p.daemonCert, p.daemonKey, "-v", "-H", "sypas-op: kv.reset", addr, "sypas.v1.Sypas/Call")
	assert.NotEqual(t, 0, code)
	assert.Contains(t, errOut, "Code: PermissionDenied")
	assert.Contains(t, out, "sypas-code: E_PERMISSION")
	// A certificate the Policy does not admit: refused, audited.
	_, errOut, code = grpcurl(p.strangerCert, p.strangerKey, "-H", "sypas-op: echo", addr, "sypas.v1.Sypas/Call")
	assert.NotEqual(t, 0, code)
	assert.Contains(t, errOut, "certificate identity not allowed")
	assert.Contains(t, log.String(), `msg="sypas: refused" event=attestation`)

	// Subscribe streams until -max-time ends it (DeadlineExceeded).
	out, errOut, code = grpcurl(p.daemonCert, p.daemonKey, "-max-time", "1", "-d", b64("ticks"), addr, "sypas.v1.Sypas/Subscribe")
	assert.NotEqual(t, 0, code)
	assert.Contains(t, errOut, "DeadlineExceeded")
	events := strings.Fields(out)
	require.GreaterOrEqual(t, len(events), 2, "ticks every 20 ms for a second: %s", out)
	for _, e := range events {
		body, err := base64.StdEncoding.DecodeString(strings.Trim(e, `"`))
		require.NoError(t, err, e)
		assert.True(t, strings.HasPrefix(string(body), "tick "), "%q", body)
	}

	// A health Watch open when the kernel stops: NOT_SERVING, then the
	// stream ends, and serve exits (stopServe) without waiting for it.
	watch := exec.Command(bin, "-cacert", p.ca, "-cert", p.daemonCert, "-key", p.daemonKey, "-max-time", "30",
		"-d", `{"service":"sypas.v1.Sypas"}`, addr, "grpc.health.v1.Health/Watch")
	var watchOut, watchErr lockedBuffer
	watch.Stdout, watch.Stderr = &watchOut, &watchErr
	require.NoError(t, watch.Start())
	t.Cleanup(func() {
		if watch.ProcessState == nil {
			watch.Process.Kill()
			watch.Wait()
		}
	})
	require.Eventually(t, func() bool { return strings.Contains(watchOut.String(), `"SERVING"`) },
		10*time.Second, 10*time.Millisecond, "watch: %s", watchErr.String())
	stopServe(t, serve, log)
	assert.Error(t, watch.Wait())
	assert.Contains(t, watchOut.String(), `"NOT_SERVING"`)
	assert.Contains(t, watchErr.String(), "Code: Unavailable")
	assert.Contains(t, watchErr.String(), "the kernel is shutting down")
}
