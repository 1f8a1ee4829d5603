package bulk_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/bulk"
	"github.com/sypas/go/frame"
	"github.com/sypas/go/internal/closetest"
	"github.com/sypas/go/internal/shm"
	"github.com/sypas/go/wire"
)

// The two-process test: this process allocates, fills and sends sequenced,
// checksummed spans from several goroutines at once, through a region too
// small for all of them (so senders wait for ACKs); the child, this test
// binary re-executed, maps the region, checks every span through its view
// and a copy, and acknowledges it. Descriptors and ACKs travel as 40-byte
// BULK payloads over two pipes (the rings' stand-in: the bridge will carry
// them in BULK frames). Then each side turns hostile: this one sends
// descriptors outside the region, the child repeats and forges ACKs; both
// must be refused, counted, and leave the allocator whole.

const (
	helperEnv  = "GO_WANT_BULK_HELPER"
	xpSize     = 16 << 20
	xpSenders  = 4
	xpMaxSpan  = 4 << 20
	xpBadDescs = 4 // hostile descriptors sent to the child
	xpBadAcks  = 6 // hostile ACKs the child sends back
)

func splitmix(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ x>>30) * 0xbf58476d1ce4e5b9
	x = (x ^ x>>27) * 0x94d049bb133111eb
	return x ^ x>>31
}

// xpSpanSize: from 16 bytes (the header) to xpMaxSpan, most below 1 MiB.
func xpSpanSize(seq uint64) int {
	h := splitmix(seq)
	if h&7 == 0 {
		return 16 + int(h>>8)%xpMaxSpan
	}
	return 16 + int(h>>8)%(1<<20)
}

// pattern is what spans are filled from, at an offset their sequence
// number chooses: copy is fast even under the race detector.
var pattern = sync.OnceValue(func() []byte {
	b := make([]byte, xpSize+4096*8)
	for i := 0; i < len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], splitmix(uint64(i)))
	}
	return b
})

func fillSpan(b []byte, seq uint64) {
	binary.LittleEndian.PutUint64(b, seq)
	binary.LittleEndian.PutUint64(b[8:], uint64(len(b)))
	copy(b[16:], pattern()[seq%4096*8:])
}

func checkSpan(b []byte, seq uint64) error {
	if len(b) < 16 || binary.LittleEndian.Uint64(b[8:]) != uint64(len(b)) {
		return fmt.Errorf("span of %d bytes: bad length header", len(b))
	}
	if !bytes.Equal(b[16:], pattern()[seq%4096*8:][:len(b)-16]) {
		return fmt.Errorf("span %d: content differs", seq)
	}
	return nil
}

func TestCrossProcess(t *testing.T) {
	perSender := 100
	if testing.Short() {
		perSender = 20
	}
	n := xpSenders * perSender
	fdsBefore, mappedBefore := openFDs(t), shm.Mapped()
	r, err := bulk.CreateRegion(bulk.Config{Size: xpSize, ID: 9})
	require.NoError(t, err)
	defer func() {
		if r != nil { // the end of the test drops it to see its mapping go
			r.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd, descW, ackR := startChild(t, ctx, r, helperEnv+"=1", "SYPAS_N="+strconv.Itoa(n+1))
	defer descW.Close()
	defer ackR.Close()
	childDone := make(chan error, 1)
	go func() { childDone <- cmd.Wait() }()

	// ACKs: each releases its span; every refusal is counted by the region.
	acksDone := make(chan error, 1)
	go func() {
		var ackErrs []error
		buf := make([]byte, 40)
		for {
			if _, err := io.ReadFull(ackR, buf); err != nil {
				if !errors.Is(err, io.EOF) {
					ackErrs = append(ackErrs, err)
				}
				acksDone <- errors.Join(ackErrs...)
				return
			}
			var d wire.Bulk
			if err := d.Decode(buf); err != nil {
				ackErrs = append(ackErrs, err)
				continue
			}
			if err := r.Ack(&d); err != nil && !errors.Is(err, bulk.ErrLease) {
				ackErrs = append(ackErrs, err)
			}
		}
	}()

	var descMu sync.Mutex // one writer at a time keeps the 40-byte records whole
	send := func(d *wire.Bulk) error {
		b, err := d.Append(make([]byte, 0, 40))
		if err != nil {
			return err
		}
		descMu.Lock()
		defer descMu.Unlock()
		_, err = descW.Write(b)
		return err
	}
	sendSpan := func(seq uint64, size int) error {
		s, err := r.Alloc(ctx, size)
		if err != nil {
			return fmt.Errorf("alloc span %d of %d bytes: %w", seq, size, err)
		}
		fillSpan(s.Bytes(), seq)
		d, err := r.Send(s, frame.TypeRequest, wire.BulkChecksum)
		if err != nil {
			return err
		}
		return send(&d)
	}

	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, xpSenders)
	var moved int64
	var movedMu sync.Mutex
	for w := range xpSenders {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range perSender {
				seq := uint64(i*xpSenders + w)
				size := xpSpanSize(seq)
				if err := sendSpan(seq, size); err != nil {
					errs <- err
					return
				}
				movedMu.Lock()
				moved += int64(size)
				movedMu.Unlock()
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	waitIdle(t, r, childDone)
	// The last span is the whole region: every block merged back.
	require.NoError(t, sendSpan(uint64(n), xpSize))
	waitIdle(t, r, childDone)
	elapsed := time.Since(start)

	// Hostile descriptors: the child must refuse each (it counts them).
	for _, d := range []wire.Bulk{
		{InnerType: frame.TypeRequest, Region: 8, Offset: 0, Length: 1},
		{InnerType: frame.TypeRequest, Region: 9, Offset: xpSize - 1, Length: 2},
		{InnerType: frame.TypeRequest, Region: 9, Offset: xpSize, Length: 1},
		{InnerType: frame.TypeRequest, Region: 9, Offset: 1 << 62, Length: 1 << 62},
	} {
		require.NoError(t, send(&d))
	}
	require.NoError(t, descW.Close())

	require.NoError(t, <-childDone, "child")
	require.NoError(t, <-acksDone, "acknowledgements")
	st := r.Stats()
	t.Logf("%d spans, %d MiB in %v; %+v", n+1, (moved+xpSize)>>20, elapsed.Round(time.Millisecond), st)
	assert.Equal(t, int64(0), st.Spans, "no span leaked")
	assert.Equal(t, uint64(n+1), st.Acks, "each span acknowledged once")
	assert.Equal(t, uint64(xpBadAcks), st.Refused, "each hostile ACK refused")
	require.NoError(t, r.Free(mustAlloc(t, r, xpSize)), "the allocator is whole")

	// No descriptor or mapping outlives the region and the pipes.
	require.NoError(t, r.Close())
	r = nil
	require.NoError(t, ackR.Close())
	assert.Equal(t, fdsBefore, openFDs(t), "open descriptors")
	closetest.Collect(t, mappedBefore)
}

// openFDs counts this process's open file descriptors.
func openFDs(t *testing.T) int {
	t.Helper()
	fds, err := os.ReadDir("/proc/self/fd")
	require.NoError(t, err)
	return len(fds)
}

// startChild re-executes this test binary as the peer
// (TestBulkHelperProcess, its mode and parameters in env) with the region's
// memfd as fd 3, the read end of the descriptors' pipe as fd 4 and the write
// end of the ACKs' pipe as fd 5, and returns the other ends.
func startChild(t *testing.T, ctx context.Context, r *bulk.Region, env ...string) (cmd *exec.Cmd, descW, ackR *os.File) {
	t.Helper()
	descR, descW, err := os.Pipe()
	require.NoError(t, err)
	ackR, ackW, err := os.Pipe()
	require.NoError(t, err)
	cmd = exec.CommandContext(ctx, os.Args[0], "-test.run=^TestBulkHelperProcess$")
	cmd.Env = append(os.Environ(), env...)
	cmd.ExtraFiles = []*os.File{r.File(), descR, ackW}
	cmd.Stderr = os.Stderr
	err = cmd.Start()
	descR.Close() // the child's alone now: ackR ends, and descW fails, when it dies
	ackW.Close()
	require.NoError(t, err)
	return cmd, descW, ackR
}

// waitIdle waits until every span has come back, or fails if the child
// exits first.
func waitIdle(t *testing.T, r *bulk.Region, childDone chan error) {
	t.Helper()
	for deadline := time.Now().Add(2 * time.Minute); r.Stats().Spans != 0; {
		select {
		case err := <-childDone:
			childDone <- err
			t.Fatalf("child exited (%v) with %d spans unacknowledged", err, r.Stats().Spans)
		case <-time.After(time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d spans still unacknowledged after 2 minutes", r.Stats().Spans)
		}
	}
}

// The peer dies mid-transfer, holding spans and with senders waiting for
// room: the end of the session (ReleaseAll, once the child is reaped, as
// the control plane reports a dead peer) takes back every span it held,
// the waiting senders wake, fail to send and free theirs; none is lost.
func TestCrossProcessPeerKilled(t *testing.T) {
	const size = 4 << 20
	r, err := bulk.CreateRegion(bulk.Config{Size: size, ID: 9})
	require.NoError(t, err)
	defer r.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd, descW, ackR := startChild(t, ctx, r, helperEnv+"=die", "SYPAS_SIZE="+strconv.Itoa(size))
	defer descW.Close()
	defer ackR.Close()

	// ACKs until the pipe ends; then, once the child is reaped (the
	// control plane's "peer dead"), the session ends: ReleaseAll. Not at the
	// pipe's EOF alone: a dying child may still hold the descriptors' pipe
	// open for a moment, and spans sent then would never be released.
	var released int
	var childErr error
	acksDone := make(chan struct{})
	go func() {
		defer close(acksDone)
		buf := make([]byte, 40)
		for {
			if _, err := io.ReadFull(ackR, buf); err != nil {
				break
			}
			var d wire.Bulk
			if d.Decode(buf) == nil {
				assert.NoError(t, r.Ack(&d))
			}
		}
		childErr = cmd.Wait()
		released = r.ReleaseAll()
	}()

	var descMu sync.Mutex
	var wg sync.WaitGroup
	for w := range xpSenders {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				s, err := r.Alloc(ctx, 256<<10+(i*w*7919)%(768<<10))
				if !assert.NoError(t, err) {
					return
				}
				d, err := r.Send(s, frame.TypeRequest, 0)
				if !assert.NoError(t, err) {
					return
				}
				b, _ := d.Append(make([]byte, 0, 40))
				descMu.Lock()
				_, err = descW.Write(b)
				descMu.Unlock()
				if err != nil { // the peer is gone: the frame never left
					assert.NoError(t, r.Unsend(s))
					return
				}
			}
		}()
	}
	wg.Wait()
	<-acksDone
	assert.Error(t, childErr, "the child kills itself")
	st := r.Stats()
	t.Logf("released %d spans at the session's end; %+v", released, st)
	assert.Equal(t, uint64(released), st.Released)
	assert.Positive(t, released, "the dead peer held spans")
	assert.Equal(t, int64(0), st.Spans, "every span came back")
	require.NoError(t, r.Free(mustAlloc(t, r, size)), "the allocator is whole")
}

// TestBulkHelperProcess is the child of the cross-process tests, not a test.
func TestBulkHelperProcess(t *testing.T) {
	switch os.Getenv(helperEnv) {
	case "die":
		dieMidTransfer()
	case "1":
	default:
		t.Skip("helper process")
	}
	if err := bulkChild(); err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

func bulkChild() error {
	n, _ := strconv.Atoi(os.Getenv("SYPAS_N"))
	p, err := bulk.OpenRegion(os.NewFile(3, "bulk"), 9, xpSize)
	if err != nil {
		return err
	}
	defer p.Close()
	descs, acks := os.NewFile(4, "descs"), os.NewFile(5, "acks")
	defer acks.Close()

	var (
		mu   sync.Mutex
		seen = make([]bool, n)
		errs []error
		some []wire.Bulk // a few acknowledged descriptors, to acknowledge again
		wg   sync.WaitGroup
	)
	work := make(chan wire.Bulk, 16)
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, xpSize)
			for d := range work {
				err := func() error {
					v, err := p.View(&d)
					if err != nil {
						return nil // counted by Refused, checked below
					}
					seq := binary.LittleEndian.Uint64(v) // read once, then checked
					if seq >= uint64(n) {
						return fmt.Errorf("sequence %d out of range", seq)
					}
					m, err := p.ReadInto(buf, &d) // the CRC32C, on the copy
					if err != nil {
						return fmt.Errorf("span %d: %w", seq, err)
					}
					if err := checkSpan(buf[:m], seq); err != nil {
						return err
					}
					mu.Lock()
					dup := seen[seq]
					seen[seq] = true
					if len(some) < 3 {
						some = append(some, d)
					}
					mu.Unlock()
					if dup {
						return fmt.Errorf("span %d delivered twice", seq)
					}
					b, _ := d.Append(make([]byte, 0, 40))
					_, err = acks.Write(b) // 40 bytes < PIPE_BUF: never interleaved
					return err
				}()
				if err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
				}
			}
		}()
	}
	buf := make([]byte, 40)
	for {
		if _, err := io.ReadFull(descs, buf); err != nil {
			if !errors.Is(err, io.EOF) {
				errs = append(errs, err)
			}
			break
		}
		var d wire.Bulk
		if err := d.Decode(buf); err != nil {
			errs = append(errs, err)
			continue
		}
		work <- d
	}
	close(work)
	wg.Wait()
	for seq, ok := range seen {
		if !ok {
			errs = append(errs, fmt.Errorf("span %d never arrived", seq))
		}
	}
	if got := p.Refused(); got != xpBadDescs {
		errs = append(errs, fmt.Errorf("refused %d descriptors, want %d", got, xpBadDescs))
	}
	// Hostile ACKs: each acknowledged span again, and three forgeries.
	if len(some) != 3 {
		return errors.Join(append(errs, fmt.Errorf("%d spans to acknowledge again", len(some)))...)
	}
	bad := append([]wire.Bulk(nil), some...)
	forged := some[0]
	forged.Lease ^= 0x0123456789abcdef
	bad = append(bad, forged)
	forged = some[1]
	forged.Region++
	bad = append(bad, forged)
	forged = some[2]
	forged.Length++
	bad = append(bad, forged)
	if len(bad) != xpBadAcks {
		panic("xpBadAcks")
	}
	for _, d := range bad {
		b, _ := d.Append(make([]byte, 0, 40))
		if _, err := acks.Write(b); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// dieMidTransfer acknowledges the first spans it is sent, then keeps the
// next ones unacknowledged and dies by SIGKILL, as a crashed peer would.
func dieMidTransfer() {
	size, _ := strconv.Atoi(os.Getenv("SYPAS_SIZE"))
	p, err := bulk.OpenRegion(os.NewFile(3, "bulk"), 9, size)
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		os.Exit(1)
	}
	descs, acks := os.NewFile(4, "descs"), os.NewFile(5, "acks")
	buf := make([]byte, 40)
	for i := 0; ; i++ {
		if _, err := io.ReadFull(descs, buf); err != nil {
			break
		}
		var d wire.Bulk
		if d.Decode(buf) != nil {
			break
		}
		if _, err := p.View(&d); err != nil {
			break
		}
		if i < 10 {
			acks.Write(buf)
			continue
		}
		if i == 12 {
			break // three spans held, senders waiting for room
		}
	}
	syscall.Kill(os.Getpid(), syscall.SIGKILL)
	// Until the signal lands the ACK pipe stays open (dropped, its *os.File
	// would be closed by the garbage collector), so that its end comes with
	// the death, as a real peer's socket would.
	runtime.KeepAlive(acks)
	runtime.KeepAlive(p)
	select {}
}
