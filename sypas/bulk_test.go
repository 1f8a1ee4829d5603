package sypas

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/control"
	"github.com/sypas/go/frame"
	"github.com/sypas/go/ring"
	"github.com/sypas/go/wire"
)

// bulkClient dials the kernel at path with a bulk region of size bytes.
func bulkClient(t *testing.T, path string, size uint32) *Client {
	t.Helper()
	cfg := ClientConfig{}
	cfg.BulkSize = size
	c := dialT(t, path, cfg)
	st, ok := c.BulkStats()
	require.True(t, ok, "the session has a bulk region")
	require.Zero(t, st.Spans)
	return c
}

// fillBody is makeBody for large sizes: the filler is a short pattern
// doubled by copy, so that 64 MiB bodies cost little even under -race.
func fillBody(b []byte, caller uint32, seq uint64) []byte {
	binary.LittleEndian.PutUint32(b, caller)
	binary.LittleEndian.PutUint64(b[4:], seq)
	n := min(len(b)-chkHeader, 4096)
	for i := range n {
		b[chkHeader+i] = byte(seq) + byte(i)
	}
	for done := n; done < len(b)-chkHeader; done *= 2 {
		copy(b[chkHeader+done:], b[chkHeader:chkHeader+done])
	}
	binary.LittleEndian.PutUint32(b[12:], bodySum(b))
	return b
}

// kernelProcStat asks the helper kernel what its process holds.
func kernelProcStat(ctx context.Context, t *testing.T, c *Client) procStat {
	t.Helper()
	var st procStat
	b, err := c.Call(ctx, "procstat", nil)
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(b, &st))
	return st
}

// Bodies from 64 KiB to 64 MiB, to a kernel in another process and back,
// through each way of calling: copied (Call), viewed (CallFunc), written
// in place (CallSpan); then many callers at once; then events. The kernel
// sees every body once and intact, every reply is the caller's own, and
// when all is done no span is in use on either side, and Close leaves no
// descriptor or mapping behind.
func TestBulkCrossProcess(t *testing.T) {
	needRings(t, "bulk needs shared memory")
	fds0 := readProcStat().FDs
	h := startHelperKernel(t, sockPath(t))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	watcher := dialT(t, h.path, ClientConfig{}) // asks the kernel what it holds
	kernel0 := kernelProcStat(ctx, t, watcher)
	c := bulkClient(t, h.path, 128<<20)
	require.Equal(t, 4, readProcStat().BulkMaps, "ours and the kernel's, for each client")
	cc := c.cur.Load()

	const caller = 1
	seq := uint64(0)
	buf := make([]byte, 64<<20)
	for _, n := range []int{64 << 10, 64<<10 + 1, 1 << 20, 16 << 20, 64 << 20} {
		body := fillBody(buf[:n], caller, seq)
		seq++
		got, err := c.Call(ctx, "chk", body)
		require.NoError(t, err, "Call %d", n)
		require.True(t, bytes.Equal(body, got), "Call %d: the reply is the body", n)

		body = fillBody(buf[:n], caller, seq)
		seq++
		err = c.CallFunc(ctx, "chk.pool", body, func(r []byte) error {
			if !bytes.Equal(body, r) {
				return errors.New("the reply is not the body")
			}
			return nil
		})
		require.NoError(t, err, "CallFunc %d", n)

		sp, err := c.AllocSpan(ctx, "chk", n)
		require.NoError(t, err)
		require.Len(t, sp.Bytes(), n)
		fillBody(sp.Bytes(), caller, seq)
		copy(buf, sp.Bytes())
		seq++
		err = c.CallSpan(ctx, sp, func(r []byte) error {
			if !bytes.Equal(buf[:n], r) {
				return errors.New("the reply is not the body")
			}
			return nil
		})
		require.NoError(t, err, "CallSpan %d", n)
	}

	// What the kernel holds once the session is up (its pidfd watcher
	// starts after the handshake): the same at the end, after many bulk
	// transfers.
	kernel1 := kernelProcStat(ctx, t, watcher)
	assert.Equal(t, kernel0.BulkMaps+2, kernel1.BulkMaps, "the kernel maps its region and ours")
	assert.Equal(t, int64(2), kernel1.Sessions)

	// Many callers at once, sizes mixed, each way of calling.
	const callers, calls = 8, 12
	var wg sync.WaitGroup
	errs := make(chan error, callers)
	for g := range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := uint32(100 + g)
			b := make([]byte, 2<<20)
			for i := range calls {
				n := []int{64<<10 + 7, 200 << 10, 1 << 20, 2 << 20}[(g+i)%4]
				var err error
				switch i % 3 {
				case 0:
					body := fillBody(b[:n], id, uint64(i))
					var got []byte
					if got, err = c.Call(ctx, "chk.pool", body); err == nil && !bytes.Equal(body, got) {
						err = errors.New("reply differs")
					}
				case 1:
					body := fillBody(b[:n], id, uint64(i))
					err = c.CallFunc(ctx, "chk", body, func(r []byte) error {
						if !bytes.Equal(body, r) {
							return errors.New("reply differs")
						}
						return nil
					})
				default:
					var sp Span
					if sp, err = c.AllocSpan(ctx, "chk.pool", n); err == nil {
						fillBody(sp.Bytes(), id, uint64(i))
						copy(b, sp.Bytes())
						err = c.CallSpan(ctx, sp, func(r []byte) error {
							if !bytes.Equal(b[:n], r) {
								return errors.New("reply differs")
							}
							return nil
						})
					}
				}
				if err != nil {
					errs <- fmt.Errorf("caller %d call %d (%d bytes): %w", id, i, n, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for id := range uint32(callers + 1) {
		want := uint64(calls)
		if id == 0 {
			want = seq
		} else {
			id += 99
		}
		r, err := fetchReport(ctx, c, max(id, caller))
		require.NoError(t, err)
		assert.Zero(t, r.dups, "caller %d: no body served twice", id)
		assert.Zero(t, r.bad, "caller %d: every body intact", id)
		assert.Len(t, r.seen, int(want), "caller %d: every body served", id)
	}

	// Events in bulk: 64 KiB to 64 MiB, in order, intact. The topic
	// blocks: three 64 MiB events do not fit the region at once, so the
	// publisher waits for the daemon's ACKs.
	sub, err := c.Subscribe(ctx, "block", SubscribeOptions{Pending: 16})
	require.NoError(t, err)
	for _, size := range []int{64 << 10, 1 << 20, 64 << 20} {
		out, err := publishOn(ctx, c, publishReq{Topic: "block", N: 3, Size: size, TimeoutMs: 20_000})
		require.NoError(t, err)
		require.Equal(t, publishResp{OK: 3}, out, "%d-byte events", size)
		for i := range 3 {
			select {
			case ev := <-sub.Events():
				require.Len(t, ev.Body, size)
				assert.EqualValues(t, i, binary.LittleEndian.Uint64(ev.Body), "in order")
			case <-time.After(10 * time.Second):
				t.Fatalf("no %d-byte event %d", size, i)
			}
		}
	}
	assert.Zero(t, sub.Dropped())
	require.NoError(t, sub.Unsubscribe(ctx))

	// Idle: every span back, on both sides; nothing refused.
	require.Eventually(t, func() bool { st, _ := c.BulkStats(); return st.Spans == 0 }, 10*time.Second, time.Millisecond)
	st, _ := c.BulkStats()
	assert.Zero(t, st.Refused)
	assert.NotZero(t, st.Acks)
	require.Eventually(t, func() bool {
		ks, err := kernelStats(ctx, c)
		return err == nil && ks.BulkSpans == 0
	}, 10*time.Second, time.Millisecond)
	ks, err := kernelStats(ctx, c)
	require.NoError(t, err)
	assert.Zero(t, ks.BulkRefused)

	kp := kernelProcStat(ctx, t, watcher)
	assert.Same(t, cc, c.cur.Load(), "one session all along: %v", c.cur.Load())
	assert.Equal(t, int64(2), kp.Sessions)
	assert.Equal(t, kernel1.FDs, kp.FDs, "the kernel holds the descriptors it held when the session began: %v, then %v", kernel1.Links, kp.Links)
	assert.Equal(t, kernel1.BulkMaps, kp.BulkMaps, "and the same bulk mappings")
	require.NoError(t, c.Close())
	assert.Equal(t, 2, readProcStat().BulkMaps, "only the watcher's after Close")
	require.NoError(t, watcher.Close())
	assert.Zero(t, readProcStat().BulkMaps, "no bulk mapping after Close")
	h.kill()
	assert.Eventually(t, func() bool { return readProcStat().FDs <= fds0 }, 5*time.Second, 10*time.Millisecond, "every descriptor closed")
}

// A full bulk region makes a call wait for room until its deadline, then
// fail with an error matching ErrResource (never another path); room
// made, the next call goes through. A body larger than the region fails
// at once with ErrTooLarge.
func TestBulkRegionFull(t *testing.T) {
	needRings(t, "bulk needs shared memory")
	h := startHelperKernel(t, sockPath(t))
	c := bulkClient(t, h.path, 1<<20)
	bg := context.Background()

	hold, err := c.AllocSpan(bg, "chk", 1<<20-16)
	require.NoError(t, err, "the whole region")
	body := fillBody(make([]byte, 100<<10), 1, 0)
	ctx, cancel := context.WithTimeout(bg, 100*time.Millisecond)
	start := time.Now()
	_, err = c.Call(ctx, "chk", body)
	cancel()
	assert.ErrorIs(t, err, ErrResource)
	assert.ErrorIs(t, err, context.DeadlineExceeded)
	assert.GreaterOrEqual(t, time.Since(start), 90*time.Millisecond, "it waited")
	st, _ := c.BulkStats()
	assert.NotZero(t, st.Full)

	ctx, cancel = context.WithTimeout(bg, 20*time.Millisecond)
	_, err = c.AllocSpan(ctx, "chk", 1000)
	cancel()
	assert.ErrorIs(t, err, ErrResource)

	require.NoError(t, hold.Free())
	got, err := c.Call(bg, "chk", body)
	require.NoError(t, err)
	assert.Equal(t, body, got)

	// One-way sends in bulk, each needing the last one's span back: the
	// ACKs are read though no call waits.
	ctx, cancel = context.WithTimeout(bg, 20*time.Second)
	defer cancel()
	big := make([]byte, 600<<10)
	for i := range 10 {
		require.NoError(t, c.Send(ctx, "chk", fillBody(big, 9, uint64(i))), "send %d", i)
	}
	require.Eventually(t, func() bool {
		r, err := fetchReport(ctx, c, 9)
		return err == nil && len(r.seen) == 10 && r.bad == 0 && r.dups == 0
	}, 10*time.Second, 10*time.Millisecond, "the kernel took every send once")

	_, err = c.Call(bg, "chk", make([]byte, 1<<20))
	assert.ErrorIs(t, err, ErrTooLarge, "larger than the region")
	_, err = c.AllocSpan(bg, "chk", 1<<20)
	assert.ErrorIs(t, err, ErrTooLarge)
	require.Eventually(t, func() bool { st, _ := c.BulkStats(); return st.Spans == 0 }, 5*time.Second, time.Millisecond)
}

// The kernel killed while it holds spans of the daemon (its handlers never
// returned): the daemon takes every one back when the session ends, and
// the Client's next session, with a new kernel, carries bulk again.
func TestBulkKernelKilled(t *testing.T) {
	needRings(t, "bulk needs shared memory")
	path := sockPath(t)
	h := startHelperKernel(t, path)
	c := bulkClient(t, path, 8<<20)
	cc := c.cur.Load()
	own := cc.own

	const n = 4
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			sp, err := c.AllocSpan(ctx, "hang", 1<<20)
			if err == nil {
				err = c.CallSpan(ctx, sp, nil)
			}
			errs <- err
		}()
	}
	require.Eventually(t, func() bool { return own.Stats().Spans == n }, 10*time.Second, time.Millisecond, "the kernel holds every span")
	h.kill()
	wg.Wait()
	close(errs)
	for err := range errs {
		assert.ErrorIs(t, err, ErrUnavailable)
	}
	require.Eventually(t, func() bool { return own.Stats().Spans == 0 }, 10*time.Second, time.Millisecond, "every lease freed")
	assert.EqualValues(t, n, own.Stats().Released)

	startHelperKernel(t, path)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	body := fillBody(make([]byte, 1<<20), 7, 0)
	got, err := c.Call(ctx, "chk", body, WaitForReady)
	require.NoError(t, err)
	assert.Equal(t, body, got)
	assert.NotSame(t, cc, c.cur.Load(), "a new session")
	require.Eventually(t, func() bool { st, _ := c.BulkStats(); return st.Spans == 0 }, 5*time.Second, time.Millisecond)
}

// bulkRequest fills a span of the raw daemon's bulk region with a REQUEST
// for op and returns its descriptor.
func (d *rawDaemon) bulkRequest(op string, body []byte) wire.Bulk {
	d.t.Helper()
	m := wire.Request{Method: []byte(op), Body: body}
	sp, err := d.s.Bulk().Alloc(context.Background(), m.Len())
	require.NoError(d.t, err)
	_, err = m.Append(sp.Bytes()[:0])
	require.NoError(d.t, err)
	desc, err := d.s.Bulk().Send(sp, frame.TypeRequest, 0)
	require.NoError(d.t, err)
	return desc
}

func (d *rawDaemon) bulkFrame(h frame.Header, desc wire.Bulk) {
	d.t.Helper()
	h.Type = frame.TypeBulk
	p, err := desc.Append(nil)
	require.NoError(d.t, err)
	d.frame(h, p)
}

// expectBulk reads the kernel's next frame, which must be BULK with flags,
// and returns its descriptor.
func (d *rawDaemon) expectBulk(flags frame.Flags) (frame.Frame, wire.Bulk) {
	d.t.Helper()
	f, err := d.next(10 * time.Second)
	require.NoError(d.t, err)
	require.Equal(d.t, frame.TypeBulk, f.Type, "want BULK, got %v (correlation %d)", f.Type, f.Correlation)
	require.Equal(d.t, flags, f.Flags)
	var desc wire.Bulk
	require.NoError(d.t, desc.Decode(f.Payload))
	return f, desc
}

// Hostile descriptors, across processes: a span outside the daemon's
// region, or naming another region, is refused with E_PROTO and the
// session goes on; a good span is served in place and released (ACK)
// before the answer; a reply in bulk released twice, or a lease never
// sent, ends the session with E_PROTO. The kernel counts every refusal,
// and its allocator holds nothing afterwards.
func TestBulkHostileDescriptors(t *testing.T) {
	needRings(t, "bulk needs shared memory")
	h := startHelperKernel(t, sockPath(t))
	good := dialT(t, h.path, ClientConfig{})
	bulkCfg := control.DialConfig{}
	bulkCfg.Features = control.DefaultFeatures | wire.FeatureSubscribe | wire.FeatureBulk
	bulkCfg.BulkSize = 1 << 20
	d := dialRaw(t, h.path, bulkCfg)
	require.NotNil(t, d.s.Bulk())

	body := fillBody(make([]byte, 200<<10), 1, 0)
	desc := d.bulkRequest("chk", body)
	out := desc
	out.Offset = uint64(d.s.Bulk().Size()) - 10 // runs past the end
	d.bulkFrame(frame.Header{Correlation: 1}, out)
	d.expectError(1, CodeProto)
	other := desc
	other.Region = control.KernelBulkID
	d.bulkFrame(frame.Header{Correlation: 2}, other)
	d.expectError(2, CodeProto)

	// The good one: ACK first, then the reply, itself in bulk.
	d.bulkFrame(frame.Header{Correlation: 3}, desc)
	_, ack := d.expectBulk(frame.FlagAck)
	assert.Equal(t, desc, ack, "the ACK echoes the descriptor")
	require.NoError(t, d.s.Bulk().Ack(&ack))
	assert.Zero(t, d.s.Bulk().Stats().Spans)
	f, reply := d.expectBulk(frame.FlagEndStream)
	assert.EqualValues(t, 3, f.Correlation)
	assert.Equal(t, frame.TypeResponse, reply.InnerType)
	v, err := d.s.PeerBulk().View(&reply)
	require.NoError(t, err)
	assert.Equal(t, body, v)
	p, err := reply.Append(nil)
	require.NoError(t, err)
	d.frame(frame.Header{Type: frame.TypeBulk, Flags: frame.FlagAck}, p)
	assert.Nil(t, d.s.Err(), "the session goes on")

	// The same ACK again: the kernel's allocator refuses it, and the
	// session ends.
	d.frame(frame.Header{Type: frame.TypeBulk, Flags: frame.FlagAck}, p)
	err = d.expectEnded()
	assert.ErrorIs(t, err, ErrProto)

	// A lease the kernel never sent, on another session.
	d2 := dialRaw(t, h.path, bulkCfg)
	forged := reply
	forged.Lease ^= 0x5a5a5a
	p, err = forged.Append(nil)
	require.NoError(t, err)
	d2.frame(frame.Header{Type: frame.TypeBulk, Flags: frame.FlagAck}, p)
	assert.ErrorIs(t, d2.expectEnded(), ErrProto)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var ks ServerStats
	require.Eventually(t, func() bool {
		ks, err = kernelStats(ctx, good)
		return err == nil && ks.BulkSpans == 0
	}, 10*time.Second, time.Millisecond)
	assert.EqualValues(t, 4, ks.BulkRefused, "two descriptors, two ACKs")
	_, err = good.Call(ctx, "chk", fillBody(make([]byte, 100), 2, 0))
	require.NoError(t, err, "the kernel serves on")
}

// Without the bulk right a request in a span is refused E_PERMISSION, and
// its span is released all the same. On the inline transport bulk does not
// exist: a body over the limit fails locally with ErrTooLarge.
func TestBulkRightAndInline(t *testing.T) {
	needRings(t, "bulk needs shared memory")
	kcfg := ServerConfig{}
	kcfg.Rights = RightRequest
	k := startKernel(t, kcfg, func(s *Server) {
		s.Handle("echo", RightRequest, echo, Inline)
	})
	c := dialT(t, k.path, ClientConfig{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	{
		_, err := c.Call(ctx, "echo", make([]byte, 100<<10))
		assert.ErrorIs(t, err, ErrPermission)
		require.Eventually(t, func() bool { st, _ := c.BulkStats(); return st.Spans == 0 }, 5*time.Second, time.Millisecond, "released though refused")
	}

	cfg := ClientConfig{}
	cfg.NoSharedMemory = true
	ci := dialT(t, k.path, cfg)
	_, ok := ci.BulkStats()
	assert.False(t, ok, "no bulk region inline")
	_, err := ci.Call(ctx, "echo", make([]byte, 100<<10))
	assert.ErrorIs(t, err, ErrTooLarge)
	_, err = ci.AllocSpan(ctx, "echo", 10)
	assert.ErrorIs(t, err, ErrTooLarge)
	got, err := ci.Call(ctx, "echo", []byte("small"))
	require.NoError(t, err)
	assert.Equal(t, "small", string(got))
}

// A zero-copy transfer (AllocSpan, CallSpan) allocates nothing, on either
// side: kernel and daemon share this process here, and the count includes
// the kernel's reading of the span, its ACK and its answer. A copying one
// (CallFunc with a body over the limit) allocates nothing either.
func TestBulkZeroCopyAllocs(t *testing.T) {
	needRings(t, "bulk needs shared memory")
	var out [8]byte
	k := startKernel(t, ServerConfig{}, func(s *Server) {
		s.Handle("take", RightRequest, func(_ context.Context, r *Request) ([]byte, error) {
			copy(out[:], r.Body)
			return out[:], nil
		}, Inline)
	})
	c := bulkClient(t, k.path, 4<<20)
	ctx := context.Background()
	body := make([]byte, 1<<20)
	check := func(r []byte) error {
		if len(r) != 8 {
			return errors.New("short reply")
		}
		return nil
	}
	zeroCopy := func() {
		sp, err := c.AllocSpan(ctx, "take", len(body))
		if err == nil {
			sp.Bytes()[0] = 1
			err = c.CallSpan(ctx, sp, check)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	copying := func() {
		if err := c.CallFunc(ctx, "take", body, check); err != nil {
			t.Fatal(err)
		}
	}
	for range 50 {
		zeroCopy()
		copying()
	}
	assert.Zero(t, testing.AllocsPerRun(200, zeroCopy), "AllocSpan, CallSpan")
	assert.Zero(t, testing.AllocsPerRun(200, copying), "CallFunc in bulk")
	require.Eventually(t, func() bool { st, _ := c.BulkStats(); return st.Spans == 0 }, 5*time.Second, time.Millisecond)
}

// A hostile kernel's descriptors: a reply in a span past the end of its
// region, a BULK that carries a REQUEST, an ACK of a lease the daemon never
// sent. Each ends the session with E_PROTO (the kernel is told why), the
// call fails with it, and the daemon's allocator is unchanged (a forged
// ACK is counted).
func TestBulkHostileKernel(t *testing.T) {
	needRings(t, "bulk needs shared memory")
	for _, tc := range []struct {
		name  string
		frame func(req frame.Frame) (frame.Header, wire.Bulk)
	}{
		{"outside", func(req frame.Frame) (frame.Header, wire.Bulk) {
			return frame.Header{Flags: frame.FlagEndStream, Correlation: req.Correlation},
				wire.Bulk{InnerType: frame.TypeResponse, Region: control.KernelBulkID, Offset: 1<<20 - 8, Length: 16, Lease: 1}
		}},
		{"other-region", func(req frame.Frame) (frame.Header, wire.Bulk) {
			return frame.Header{Flags: frame.FlagEndStream, Correlation: req.Correlation},
				wire.Bulk{InnerType: frame.TypeResponse, Region: control.DaemonBulkID, Length: 16, Lease: 1}
		}},
		{"inner-request", func(req frame.Frame) (frame.Header, wire.Bulk) {
			return frame.Header{Correlation: req.Correlation},
				wire.Bulk{InnerType: frame.TypeRequest, Region: control.KernelBulkID, Length: 16, Lease: 1}
		}},
		{"forged-ack", func(req frame.Frame) (frame.Header, wire.Bulk) {
			return frame.Header{Flags: frame.FlagAck},
				wire.Bulk{InnerType: frame.TypeRequest, Region: control.DaemonBulkID, Length: 100 << 10, Lease: 0x1234}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			path := sockPath(t)
			l, err := control.Listen(path, control.Config{})
			require.NoError(t, err)
			defer l.Close()
			cs, err := control.NewServer(l, control.ServerConfig{Keys: keyring(), SessionConfig: control.SessionConfig{
				Features: control.DefaultFeatures | wire.FeatureSubscribe | wire.FeatureBulk, Logger: quiet}})
			require.NoError(t, err)
			kernel := make(chan error, 1)
			go func() {
				ks, err := cs.Accept(ctx)
				if err != nil {
					kernel <- err
					return
				}
				defer ks.Close()
				cons := ks.Consumer()
				cons.SetDeadline(time.Now().Add(10 * time.Second))
				v, err := cons.Next()
				if err != nil {
					kernel <- err
					return
				}
				var req frame.Frame
				if _, err := req.Decode(v, frame.Config{MaxPayload: frame.HardMaxPayload}); err != nil {
					kernel <- err
					return
				}
				req.Payload = nil
				cons.Release()
				h, d := tc.frame(req)
				h.Type, h.StreamID, h.Sequence, h.CapRef = frame.TypeBulk, 1, 1, ks.CapRef()
				b, err := wire.AppendFrame(nil, h, &d)
				if err == nil {
					_, err = ks.Producer().Write(b)
				}
				// ErrPeerClosed: published, and the daemon read it, sent
				// its ERROR and closed its ring before Write's wake-up
				// looked; the session's reason is that ERROR.
				if err != nil && !errors.Is(err, ring.ErrPeerClosed) {
					kernel <- err
					return
				}
				<-ks.Done()
				kernel <- ks.Err()
			}()
			cfg := ClientConfig{MaxAttempts: 1}
			cfg.Logger, cfg.BulkSize = quiet, 1<<20
			c, err := Dial(ctx, path, cfg)
			require.NoError(t, err)
			defer c.Close()
			cc := c.cur.Load()
			_, err = c.Call(ctx, "x", make([]byte, 100<<10))
			assert.ErrorIs(t, err, ErrProto)
			select {
			case kerr := <-kernel:
				assert.ErrorIs(t, kerr, wire.ErrProto, "the kernel learns why: %v", kerr)
			case <-ctx.Done():
				t.Fatal("the session did not end")
			}
			// ReleaseAll runs in the goroutine that ended the session first,
			// which may be the socket's reader (the kernel hung up after
			// the ERROR) rather than the call's: the span comes back soon
			// after the call returns, not before.
			assert.Eventually(t, func() bool { return cc.own.Stats().Spans == 0 }, 5*time.Second, time.Millisecond,
				"the call's span is back (ReleaseAll)")
			st := cc.own.Stats()
			if tc.name == "forged-ack" {
				assert.EqualValues(t, 1, st.Refused, "the forged ACK is counted")
			}
			assert.Zero(t, st.Acks, "nothing was released by the kernel")
		})
	}
}

// The kernel's replies in bulk: one larger than the region is answered
// E_TOO_LARGE; one that finds the kernel's region full (the daemon holds
// the last reply's view) waits the write timeout, then is answered
// E_RESOURCE, and the session goes on.
func TestBulkKernelReplies(t *testing.T) {
	needRings(t, "bulk needs shared memory")
	kcfg := ServerConfig{WriteTimeout: 100 * time.Millisecond}
	k := startKernel(t, kcfg, func(s *Server) {
		s.Handle("blob", RightRequest, func(_ context.Context, r *Request) ([]byte, error) {
			n, _ := strconv.Atoi(string(r.Body))
			return bytes.Repeat([]byte("r"), n), nil
		}, Inline)
	})
	c := bulkClient(t, k.path, 128<<10)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	_, err := c.Call(ctx, "blob", []byte("200000"))
	assert.ErrorIs(t, err, ErrTooLarge)

	holding, release := make(chan struct{}), make(chan struct{})
	held := make(chan error, 1)
	go func() {
		held <- c.CallFunc(ctx, "blob", []byte("100000"), func(r []byte) error {
			close(holding)
			<-release // the kernel's span stays ours
			return nil
		})
	}()
	<-holding
	second := make(chan error, 1)
	go func() {
		_, err := c.Call(ctx, "blob", []byte("100000"))
		second <- err
	}()
	time.Sleep(300 * time.Millisecond) // the kernel's write timeout passes
	close(release)
	require.NoError(t, <-held)
	err = <-second
	assert.ErrorIs(t, err, ErrResource)
	got, err := c.Call(ctx, "blob", []byte("100000"))
	require.NoError(t, err, "the session goes on")
	assert.Len(t, got, 100000)
	require.Eventually(t, func() bool { return k.srv.Stats().BulkSpans == 0 }, 5*time.Second, time.Millisecond)
}

// A Span given to CallSpan is the kernel's until its ACK, even when the
// call gave up first (its context ended while the handler still reads the
// body): Free then refuses it, as the documented "free twice" misuse
// (defer sp.Free() after CallSpan) must. Freeing it handed the memory to
// the next caller while the kernel's handler read it, and the kernel's ACK
// then ended the session with E_PROTO.
func TestBulkSpanFreeAfterAbandonedCall(t *testing.T) {
	needRings(t, "bulk needs shared memory")
	entered, proceed := make(chan struct{}), make(chan struct{})
	intact := make(chan bool, 1)
	k := startKernel(t, ServerConfig{}, func(s *Server) {
		s.Handle("slow", RightRequest, func(_ context.Context, r *Request) ([]byte, error) {
			close(entered)
			<-proceed // whatever the caller's deadline says
			intact <- bytes.Count(r.Body, []byte{0xaa}) == len(r.Body)
			return nil, nil
		})
		s.Handle("echo", RightRequest, echo, Inline)
	})
	c := bulkClient(t, k.path, 1<<20)
	bg := context.Background()

	sp, err := c.AllocSpan(bg, "slow", 300<<10)
	require.NoError(t, err)
	for i := range sp.Bytes() {
		sp.Bytes()[i] = 0xaa
	}
	ctx, cancel := context.WithCancel(bg)
	done := make(chan error, 1)
	go func() { done <- c.CallSpan(ctx, sp, nil) }()
	<-entered
	cancel()
	require.ErrorIs(t, <-done, context.Canceled)

	assert.ErrorIs(t, sp.Free(), os.ErrInvalid, "the kernel still holds the span")
	assert.ErrorIs(t, c.CallSpan(bg, sp, nil), os.ErrInvalid, "sent already")
	st, _ := c.BulkStats()
	assert.Equal(t, int64(1), st.Spans, "still out")

	// The next large body gets other memory than the span being read.
	other := bytes.Repeat([]byte{0x55}, 300<<10)
	got, err := c.Call(bg, "echo", other)
	require.NoError(t, err)
	assert.Equal(t, other, got)

	close(proceed)
	assert.True(t, <-intact, "the handler read the body it was sent")
	require.Eventually(t, func() bool {
		_, err := c.Call(bg, "echo", []byte("read the ACK")) // a reader for it
		st, _ := c.BulkStats()
		return err == nil && st.Spans == 0
	}, 5*time.Second, time.Millisecond)
	st, _ = c.BulkStats()
	assert.Zero(t, st.Refused, "no ACK refused")
	got, err = c.Call(bg, "echo", other)
	require.NoError(t, err, "the session goes on")
	assert.Equal(t, other, got)
}

// A call in bulk that gave up before its answer (its context ended while
// the handler ran) leaves no caller to read the kernel's ACK of its span:
// the Client reads it anyway, so the span comes back while the Client is
// idle, and the next body that needs the room gets it. Unread, the ACK
// left the region full, and every later bulk call waited for room that
// only a reader could give back, then failed with E_RESOURCE.
func TestBulkAbandonedCallReleased(t *testing.T) {
	needRings(t, "bulk needs shared memory")
	proceed, returned := make(chan struct{}), make(chan struct{}, 2)
	k := startKernel(t, ServerConfig{}, func(s *Server) {
		s.Handle("slow", RightRequest, func(context.Context, *Request) ([]byte, error) {
			<-proceed
			returned <- struct{}{}
			return nil, nil
		})
		s.Handle("echo", RightRequest, echo, Inline)
	})
	c := bulkClient(t, k.path, 1<<20)
	bg := context.Background()
	for _, zeroCopy := range []bool{true, false} {
		ctx, cancel := context.WithTimeout(bg, 50*time.Millisecond)
		if zeroCopy {
			sp, err := c.AllocSpan(bg, "slow", 600<<10)
			require.NoError(t, err)
			err = c.CallSpan(ctx, sp, nil)
			require.ErrorIs(t, err, context.DeadlineExceeded)
		} else {
			_, err := c.Call(ctx, "slow", make([]byte, 600<<10))
			require.ErrorIs(t, err, context.DeadlineExceeded)
		}
		cancel()
		proceed <- struct{}{}
		<-returned
		require.Eventually(t, func() bool { st, _ := c.BulkStats(); return st.Spans == 0 }, 5*time.Second,
			time.Millisecond, "the span comes back with no call waiting (zero-copy %v)", zeroCopy)

		ctx, cancel = context.WithTimeout(bg, 5*time.Second)
		body := bytes.Repeat([]byte{7}, 600<<10)
		got, err := c.Call(ctx, "echo", body)
		cancel()
		require.NoError(t, err, "the region has room again")
		assert.Equal(t, body, got)
	}
}

// Misuse of a Span (CallSpan after Free, or twice) is the caller's error,
// reported at once: not the session's end. It was turned into one,
// matching ErrUnavailable after waiting endGrace for a session that was
// fine, which told retrying callers to reconnect.
func TestBulkSpanMisuseIsNotUnavailable(t *testing.T) {
	needRings(t, "bulk needs shared memory")
	k := startKernel(t, ServerConfig{}, func(s *Server) { s.Handle("echo", RightRequest, echo, Inline) })
	c := bulkClient(t, k.path, 1<<20)
	bg := context.Background()
	sp, err := c.AllocSpan(bg, "echo", 100<<10)
	require.NoError(t, err)
	require.NoError(t, sp.Free())
	assert.ErrorIs(t, sp.Free(), os.ErrInvalid, "freed twice")
	start := time.Now()
	err = c.CallSpan(bg, sp, nil)
	assert.ErrorIs(t, err, os.ErrInvalid, "CallSpan after Free")
	assert.NotErrorIs(t, err, ErrUnavailable, "the session is fine")
	assert.Less(t, time.Since(start), endGrace/2, "no wait for a session end")

	// The freed span's block is the next span's: the stale CallSpan (with
	// a deadline, so a timeout_ns to write) leaves its bytes alone.
	next, err := c.AllocSpan(bg, "echo", 100<<10)
	require.NoError(t, err)
	require.Equal(t, sp.sp.Offset(), next.sp.Offset(), "the same block again")
	mem := c.cur.Load().own.Bytes()[next.sp.Offset():]
	copy(mem, "NEXT'S!!")
	ctx, cancel := context.WithTimeout(bg, time.Minute)
	err = c.CallSpan(ctx, sp, nil)
	cancel()
	assert.ErrorIs(t, err, os.ErrInvalid, "CallSpan after Free, with a deadline")
	assert.Equal(t, "NEXT'S!!", string(mem[:8]), "another span's timeout_ns untouched")
	require.NoError(t, next.Free())

	sp, err = c.AllocSpan(bg, "echo", 100<<10)
	require.NoError(t, err)
	require.NoError(t, c.CallSpan(bg, sp, nil))
	err = c.CallSpan(bg, sp, nil)
	assert.ErrorIs(t, err, os.ErrInvalid, "CallSpan twice")
	assert.NotErrorIs(t, err, ErrUnavailable)
	_, err = c.Call(bg, "echo", []byte("still up"))
	require.NoError(t, err)
	st, _ := c.BulkStats()
	assert.Zero(t, st.Spans)
	assert.Zero(t, st.Refused)
}
