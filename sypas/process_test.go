package sypas

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/sypas/go/control/token"
	"github.com/sypas/go/internal/testtls"
)

// Cross-process tests re-execute the test binary into TestBridgeHelper
// (SYPAS_BRIDGE_HELPER=kernel) to run a kernel in a process of its own:
// killing it is then a real peer death, and its rings really are shared
// between two address spaces.

const helperEnv = "SYPAS_BRIDGE_HELPER"

// TestBridgeHelper is not a test: it is the helper process's main.
func TestBridgeHelper(t *testing.T) {
	var err error
	switch os.Getenv(helperEnv) {
	case "":
		return
	case "kernel":
		// The parent holds our stdin: when it goes away, so do we.
		go func() {
			io.Copy(io.Discard, os.Stdin)
			os.Exit(3)
		}()
		err = helperKernel(os.Getenv("SYPAS_SOCK"))
	case "subscriber":
		err = helperSubscriber(os.Getenv("SYPAS_SOCK"), os.Getenv("SYPAS_TOPIC"))
	default:
		err = fmt.Errorf("unknown helper %q", os.Getenv(helperEnv))
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

// keyring is the token key both processes use.
func keyring() *token.Keyring {
	k := token.NewKeyring()
	if err := k.Add(1, bytes.Repeat([]byte{7}, 32)); err != nil {
		panic(err)
	}
	return k
}

// helperProc is a kernel running in a helper process.
type helperProc struct {
	cmd   *exec.Cmd
	path  string
	stdin io.WriteCloser
	out   *syncBuffer
}

// startHelperKernel runs a kernel serving at path in a new process (env:
// extra SYPAS_K_* settings, see helperKernel). It is killed with the test.
func startHelperKernel(t testing.TB, path string, env ...string) *helperProc {
	t.Helper()
	return startHelper(t, "kernel", path, env...)
}

// startHelper runs the helper named kind (TestBridgeHelper) for the
// kernel at path; it is killed with the test.
func startHelper(t testing.TB, kind, path string, env ...string) *helperProc {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestBridgeHelper$", "-test.count=1")
	cmd.Env = append(os.Environ(), append([]string{helperEnv + "=" + kind, "SYPAS_SOCK=" + path, "GORACE=atexit_sleep_ms=0"}, env...)...)
	if isTCP(path) {
		cmd.Env = append(cmd.Env, tlsCAEnv+"="+testCAPEM(t))
	}
	out := new(syncBuffer)
	cmd.Stdout, cmd.Stderr = out, out
	stdin, err := cmd.StdinPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	h := &helperProc{cmd: cmd, path: path, stdin: stdin, out: out}
	t.Cleanup(func() {
		h.kill()
		if t.Failed() {
			t.Logf("helper %s output:\n%s", kind, out.String())
		}
	})
	return h
}

// kill ends the kernel with SIGKILL (no goodbye of any kind) and reaps it.
func (h *helperProc) kill() {
	if h.cmd.ProcessState != nil {
		return
	}
	h.cmd.Process.Kill()
	h.cmd.Wait()
	h.stdin.Close()
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// sockPath is a fresh address for a kernel: a socket path, or with
// SYPAS_TRANSPORT=tls (TestTLSConformance) tcp:// on a free loopback port.
func sockPath(t testing.TB) string {
	if forceTLS.Load() {
		return freeTCPAddr(t)
	}
	return filepath.Join(t.TempDir(), "k.sock")
}

// ---------------------------------------------------------------- the kernel

// helperKernel serves the test operations at sock until killed. Settings
// come from the environment: SYPAS_K_INFLIGHT (max_in_flight),
// SYPAS_K_RXRING (the daemon's receiving ring), SYPAS_K_TAG (put in every
// event body, to tell kernels apart), SYPAS_K_LOG (log to stderr).
func helperKernel(sock string) error {
	cfg := ServerConfig{Topics: map[string]SlowPolicy{"block": Block}}
	cfg.Keys = keyring()
	cfg.Logger = slog.New(slog.DiscardHandler)
	if os.Getenv("SYPAS_K_LOG") != "" { // its refusals and failures, shown when a test fails
		cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	if n, _ := strconv.Atoi(os.Getenv("SYPAS_K_INFLIGHT")); n > 0 {
		cfg.MaxInFlight = uint32(n)
	}
	srv, err := NewServer(cfg)
	if err != nil {
		return err
	}
	k := &testKernel{srv: srv, tag: os.Getenv("SYPAS_K_TAG"), seen: map[uint32]*seenSet{}}
	k.register(srv)
	l, err := listenAt(sock)
	if err != nil {
		return err
	}
	return srv.Serve(l)
}

// testKernel holds the operations of the helper kernel: checksummed echo
// that records what it saw (chk, chk.pool, chk.slow), calls that hang until
// their context ends (hang), publishing (publish), and reports (report,
// stats, hanging).
type testKernel struct {
	srv     *Server
	tag     string
	mu      sync.Mutex
	seen    map[uint32]*seenSet
	hanging atomic.Int64
}

// seenSet is the sequence numbers of one caller the kernel served.
type seenSet struct {
	bits []uint64
	dups uint32
	bad  uint32 // bodies that failed their checksum
}

func (k *testKernel) register(s *Server) {
	s.Handle("chk", RightRequest, k.check, Inline)
	s.Handle("chk.pool", RightRequest, k.check)
	s.Handle("chk.slow", RightRequest, func(ctx context.Context, r *Request) ([]byte, error) {
		b, err := k.check(ctx, r)
		time.Sleep(time.Duration(1+len(r.Body)%8) * time.Millisecond) // the caller gave up: a late reply
		return b, err
	})
	s.Handle("hang", RightRequest, func(ctx context.Context, r *Request) ([]byte, error) {
		k.hanging.Add(1)
		defer k.hanging.Add(-1)
		<-ctx.Done()
		return nil, ctx.Err()
	})
	s.Handle("hanging", RightRequest, func(context.Context, *Request) ([]byte, error) {
		return strconv.AppendInt(nil, k.hanging.Load(), 10), nil
	}, Inline)
	s.Handle("report", RightRequest, k.report)
	s.Handle("stats", RightRequest, func(context.Context, *Request) ([]byte, error) {
		return json.Marshal(k.srv.Stats())
	})
	s.Handle("publish", RightRequest, k.publish)
	s.Handle("procstat", RightRequest, func(context.Context, *Request) ([]byte, error) {
		st := readProcStat()
		st.Sessions = k.srv.Stats().Sessions
		return json.Marshal(st)
	})
}

// procStat is what a process holds: descriptors, and mappings of bulk
// memfds.
type procStat struct {
	FDs, BulkMaps int
	Sessions      int64
	Links         []string // what each descriptor is, for a failure's message
}

func readProcStat() procStat {
	var st procStat
	if ents, err := os.ReadDir("/proc/self/fd"); err == nil {
		st.FDs = len(ents)
		for _, e := range ents {
			l, _ := os.Readlink("/proc/self/fd/" + e.Name())
			st.Links = append(st.Links, e.Name()+"="+l)
		}
	}
	if b, err := os.ReadFile("/proc/self/maps"); err == nil {
		st.BulkMaps = strings.Count(string(b), "memfd:sypas-bulk")
	}
	return st
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// A checked body: caller id (4 bytes), sequence (8), CRC32C of everything
// else (4), then filler.
const chkHeader = 16

func makeBody(dst []byte, caller uint32, seq uint64, size int, fill byte) []byte {
	size = max(size, chkHeader)
	b := append(dst[:0], make([]byte, size)...)
	binary.LittleEndian.PutUint32(b, caller)
	binary.LittleEndian.PutUint64(b[4:], seq)
	for i := chkHeader; i < size; i++ {
		b[i] = fill + byte(i)
	}
	binary.LittleEndian.PutUint32(b[12:], bodySum(b))
	return b
}

func bodySum(b []byte) uint32 {
	return crc32.Update(crc32.Checksum(b[:12], castagnoli), castagnoli, b[chkHeader:])
}

// parseBody checks b's checksum and returns its caller and sequence.
func parseBody(b []byte) (caller uint32, seq uint64, ok bool) {
	if len(b) < chkHeader || binary.LittleEndian.Uint32(b[12:]) != bodySum(b) {
		return 0, 0, false
	}
	return binary.LittleEndian.Uint32(b), binary.LittleEndian.Uint64(b[4:]), true
}

// check verifies the body, records its sequence and echoes it.
func (k *testKernel) check(_ context.Context, r *Request) ([]byte, error) {
	body := bytes.Clone(r.Body) // an Inline body is shared memory: copy, then check
	caller, seq, ok := parseBody(body)
	k.mu.Lock()
	defer k.mu.Unlock()
	s := k.seen[caller]
	if s == nil {
		s = new(seenSet)
		k.seen[caller] = s
	}
	if !ok {
		s.bad++
		return nil, &Error{Code: CodeProto, Message: "checksum mismatch"}
	}
	w := int(seq / 64)
	for len(s.bits) <= w {
		s.bits = append(s.bits, 0)
	}
	if s.bits[w]&(1<<(seq%64)) != 0 {
		s.dups++
	}
	s.bits[w] |= 1 << (seq % 64)
	return body, nil
}

// report answers a caller's record: dups, bad (4 bytes each), then the
// bitmap of the sequences seen.
func (k *testKernel) report(_ context.Context, r *Request) ([]byte, error) {
	if len(r.Body) != 4 {
		return nil, &Error{Code: CodeProto, Message: "want a caller id"}
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	s := k.seen[binary.LittleEndian.Uint32(r.Body)]
	if s == nil {
		s = new(seenSet)
	}
	b := binary.LittleEndian.AppendUint32(nil, s.dups)
	b = binary.LittleEndian.AppendUint32(b, s.bad)
	for _, w := range s.bits {
		b = binary.LittleEndian.AppendUint64(b, w)
	}
	return b, nil
}

// publishReq asks the helper kernel to publish N events of Size bytes on
// Topic, each within TimeoutMs (0: none).
type publishReq struct {
	Topic     string
	N, Size   int
	TimeoutMs int
}

// publishResp counts Publish's outcomes.
type publishResp struct {
	OK, Resource, TooLarge, Other int
}

// publish publishes events whose body is: the event's index (8 bytes), the
// kernel's tag, then filler.
func (k *testKernel) publish(ctx context.Context, r *Request) ([]byte, error) {
	var p publishReq
	if err := json.Unmarshal(r.Body, &p); err != nil {
		return nil, &Error{Code: CodeProto, Message: err.Error()}
	}
	var out publishResp
	body := make([]byte, max(p.Size, 8+len(k.tag)))
	copy(body[8:], k.tag)
	for i := range p.N {
		binary.LittleEndian.PutUint64(body, uint64(i))
		pctx, cancel := ctx, context.CancelFunc(func() {})
		if p.TimeoutMs > 0 {
			pctx, cancel = context.WithTimeout(context.Background(), time.Duration(p.TimeoutMs)*time.Millisecond)
		}
		err := k.srv.Publish(pctx, p.Topic, body)
		cancel()
		switch {
		case err == nil:
			out.OK++
		case CodeOf(err) == CodeResource:
			out.Resource++
		case CodeOf(err) == CodeTooLarge:
			out.TooLarge++
		default:
			out.Other++
		}
	}
	return json.Marshal(out)
}

// ---------------------------------------------------------------- the test side

// kernelReport is the helper kernel's record of one caller.
type kernelReport struct {
	dups, bad uint32
	seen      map[uint64]bool
}

func fetchReport(ctx context.Context, c *Client, caller uint32) (kernelReport, error) {
	b, err := c.Call(ctx, "report", binary.LittleEndian.AppendUint32(nil, caller))
	if err != nil {
		return kernelReport{}, err
	}
	if len(b) < 8 {
		return kernelReport{}, fmt.Errorf("report of %d bytes", len(b))
	}
	r := kernelReport{dups: binary.LittleEndian.Uint32(b), bad: binary.LittleEndian.Uint32(b[4:]), seen: map[uint64]bool{}}
	for i := 8; i+8 <= len(b); i += 8 {
		w := binary.LittleEndian.Uint64(b[i:])
		for bit := range 64 {
			if w&(1<<bit) != 0 {
				r.seen[uint64((i-8)/8*64+bit)] = true
			}
		}
	}
	return r, nil
}

func kernelStats(ctx context.Context, c *Client) (ServerStats, error) {
	var st ServerStats
	b, err := c.Call(ctx, "stats", nil)
	if err == nil {
		err = json.Unmarshal(b, &st)
	}
	return st, err
}

func publishOn(ctx context.Context, c *Client, p publishReq) (publishResp, error) {
	var out publishResp
	req, _ := json.Marshal(p)
	b, err := c.Call(ctx, "publish", req)
	if err == nil {
		err = json.Unmarshal(b, &out)
	}
	return out, err
}

// stressFull reports whether SYPAS_STRESS=full asks for the long runs.
func stressFull() bool { return os.Getenv("SYPAS_STRESS") == "full" }

// ---------------------------------------------------------------- the subscriber

// subReport is what the subscriber helper saw: the events before the one
// whose body is "END", whether their indexes (the first 8 bytes) only went
// up, and its Subscription's Dropped when END came.
type subReport struct {
	Received int
	InOrder  bool
	Dropped  uint64
}

// helperSubscriber subscribes to topic on the kernel at sock, with
// SYPAS_RXRING as its ring's size, prints READY, and reads events until END;
// then it prints its subReport as JSON.
func helperSubscriber(sock, topic string) error {
	cfg := ClientConfig{}
	cfg.Logger = slog.New(slog.DiscardHandler)
	if n, _ := strconv.Atoi(os.Getenv("SYPAS_RXRING")); n > 0 {
		cfg.RxRingSize = uint32(n)
	}
	if isTCP(sock) {
		if testCA(nil) == nil {
			return caErr
		}
		cert, err := ca.Client("subscriber", testtls.DaemonURI)
		if err != nil {
			return err
		}
		cfg.TLS = ca.ClientConfig(cert)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := Dial(ctx, sock, cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	sub, err := c.Subscribe(ctx, topic, SubscribeOptions{Pending: 4096})
	if err != nil {
		return err
	}
	fmt.Println("READY")
	r := subReport{InOrder: true}
	last := -1
	for {
		select {
		case ev, ok := <-sub.Events():
			if !ok {
				return errors.New("the subscription ended")
			}
			if string(ev.Body) == "END" {
				r.Dropped = sub.Dropped()
				b, _ := json.Marshal(r)
				fmt.Println(string(b))
				return nil
			}
			i := int(binary.LittleEndian.Uint64(ev.Body))
			r.InOrder = r.InOrder && i > last
			last = i
			r.Received++
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// startSubscriber runs a subscriber helper on topic and waits for it to be
// subscribed.
func startSubscriber(t *testing.T, path, topic string, env ...string) *helperProc {
	t.Helper()
	h := startHelper(t, "subscriber", path, append(env, "SYPAS_TOPIC="+topic)...)
	require.Eventually(t, func() bool { return strings.Contains(h.out.String(), "READY\n") }, 30*time.Second, time.Millisecond)
	return h
}

// report waits for the subscriber helper to end and returns its report.
func (h *helperProc) report(t *testing.T) subReport {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- h.cmd.Wait() }()
	select {
	case err := <-done:
		require.NoError(t, err, "subscriber: %s", h.out.String())
	case <-time.After(30 * time.Second):
		h.cmd.Process.Kill()
		<-done
		t.Fatalf("the subscriber never ended: %s", h.out.String())
	}
	h.stdin.Close()
	var r subReport
	_, js, _ := strings.Cut(h.out.String(), "READY\n")
	require.NoError(t, json.Unmarshal([]byte(strings.TrimSpace(js)), &r), "subscriber said %q", h.out.String())
	return r
}
