package sypas

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/frame"
	"github.com/sypas/go/wire"
)

// stressCaller is what one caller of TestCrossProcessStress did: the
// sequences the kernel must have seen (answered calls, sends), and those
// it may have seen (calls whose deadline expired).
type stressCaller struct {
	must, maybe                      []uint64
	calls, sends, expired, big, errs int
}

// 64 callers make sequenced, checksummed calls to a kernel in another
// process for a sustained period: Inline and pool handlers, small bodies
// and bodies at max_payload, one-way sends, calls whose deadline expires
// before the (late) reply, and each kind of context (deadline,
// cancellable, none). Every reply must be the caller's own, intact, and
// the kernel must have seen every call answered and every send exactly
// once, and nothing else.
func TestCrossProcessStress(t *testing.T) {
	dur := 3 * time.Second
	switch {
	case stressFull():
		dur = 30 * time.Second
	case testing.Short():
		dur = time.Second
	}
	h := startHelperKernel(t, sockPath(t))
	cfg := ClientConfig{}
	cfg.BulkSize = wire.MinBulkSize // the smallest bulk region: 64 KiB
	c := dialT(t, h.path, cfg)
	bg := context.Background()

	// A body over the limit, inline and bulk, fails before anything is sent.
	_, err := c.Call(bg, "chk", make([]byte, wire.MinBulkSize))
	require.ErrorIs(t, err, ErrTooLarge)

	const callers = 64
	res := make([]stressCaller, callers)
	errs := make(chan error, callers)
	end := time.Now().Add(dur)
	var wg sync.WaitGroup
	for g := range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := stressCall(c, uint32(g+1), end, &res[g]); err != nil {
				errs <- fmt.Errorf("caller %d: %w", g+1, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		return
	}

	var total stressCaller
	ctx, cancel := context.WithTimeout(bg, 30*time.Second)
	defer cancel()
	for g := range callers {
		r := &res[g]
		total.calls += r.calls
		total.sends += r.sends
		total.expired += r.expired
		total.big += r.big
		var rep kernelReport
		// The sends are in the kernel's ring, perhaps not served yet.
		require.Eventually(t, func() bool {
			rep, err = fetchReport(ctx, c, uint32(g+1))
			require.NoError(t, err)
			for _, s := range r.must {
				if !rep.seen[s] {
					return false
				}
			}
			return true
		}, 20*time.Second, 10*time.Millisecond, "caller %d: the kernel never saw some answered calls or sends", g+1)
		assert.Zero(t, rep.dups, "caller %d: duplicates", g+1)
		assert.Zero(t, rep.bad, "caller %d: bodies that failed their checksum", g+1)
		maybe := make(map[uint64]bool, len(r.maybe))
		for _, s := range r.maybe {
			maybe[s] = true
		}
		for _, s := range r.must {
			maybe[s] = true
		}
		for s := range rep.seen {
			if !maybe[s] {
				t.Errorf("caller %d: the kernel saw sequence %d, which was never sent", g+1, s)
				break
			}
		}
	}
	st, err := kernelStats(ctx, c)
	require.NoError(t, err)
	assert.Zero(t, st.Denied, "no refusal in normal use")
	assert.Zero(t, st.Failed)
	assert.Zero(t, st.Panics)
	t.Logf("%v: %d calls (%d at max_payload), %d sends, %d expired; kernel: %+v",
		dur, total.calls, total.big, total.sends, total.expired, st)
	assert.Positive(t, total.calls)
	assert.Positive(t, total.sends)
	assert.Positive(t, total.big)
}

// stressCall is one caller of TestCrossProcessStress.
func stressCall(c *Client, id uint32, end time.Time, r *stressCaller) error {
	rng := rand.New(rand.NewPCG(uint64(id), 1))
	var body, dst []byte
	bg := context.Background()
	for seq := uint64(1); time.Now().Before(end); seq++ {
		op, k := "chk", rng.IntN(20)
		switch {
		case k >= 2 && k < 4:
			op = "chk.slow"
		case rng.IntN(3) == 0:
			op = "chk.pool"
		}
		size := chkHeader + rng.IntN(200)
		if rng.IntN(40) == 0 {
			size = frame.DefaultMaxPayload - 10 - len(op) - rng.IntN(8) // at (or just under) max_payload
			r.big++
		}
		body = makeBody(body, id, seq, size, byte(seq))

		// The context: a deadline, cancellable without one, or neither.
		ctx, cancel := bg, context.CancelFunc(func() {})
		switch rng.IntN(3) {
		case 0:
			ctx, cancel = context.WithTimeout(bg, time.Minute)
		case 1:
			ctx, cancel = context.WithCancel(bg)
		}
		var reply []byte
		var err error
		switch {
		case k < 2: // one-way
			err = c.Send(ctx, op, body)
			cancel()
			if err != nil {
				return fmt.Errorf("send %d: %w", seq, err)
			}
			r.sends++
			r.must = append(r.must, seq)
			continue
		case k < 4: // a deadline that expires before the reply: the slot is abandoned
			cancel()
			ctx, cancel = context.WithTimeout(bg, time.Duration(1+rng.IntN(3))*time.Millisecond)
			reply, err = c.Call(ctx, op, body)
			cancel()
			if errors.Is(err, context.DeadlineExceeded) {
				r.expired++
				r.maybe = append(r.maybe, seq)
				continue
			}
		case k < 8:
			reply, err = c.CallInto(ctx, op, body, dst[:0])
			dst = reply
		case k < 11:
			err = c.CallFunc(ctx, op, body, func(b []byte) error {
				if !bytes.Equal(b, body) {
					return fmt.Errorf("CallFunc %d: a reply of %d bytes is not the request's %d", seq, len(b), len(body))
				}
				reply = body
				return nil
			})
		default:
			reply, err = c.Call(ctx, op, body)
		}
		cancel()
		if err != nil {
			return fmt.Errorf("call %d (%s, %d bytes): %w", seq, op, len(body), err)
		}
		if caller, s, ok := parseBody(reply); !ok || caller != id || s != seq || !bytes.Equal(reply, body) {
			return fmt.Errorf("call %d: got the reply of caller %d sequence %d (checksum ok: %v), %d bytes", seq, caller, s, ok, len(reply))
		}
		r.calls++
		r.must = append(r.must, seq)
	}
	return nil
}
