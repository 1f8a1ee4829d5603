package ring

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/sypas/go/futex"
)

// The two-process stress: each process produces n sequenced, checksummed
// records of random sizes on its outgoing ring and checks the n it receives on
// the other, so loss, duplication, reordering, truncation and corruption are
// all caught. The child is this test binary re-executed.

const helperEnv = "GO_WANT_HELPER_PROCESS"

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func splitmix(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ x>>30) * 0xbf58476d1ce4e5b9
	x = (x ^ x>>27) * 0x94d049bb133111eb
	return x ^ x>>31
}

// stressSize: mostly small records, one in 64 up to 4 KiB; at least 12 bytes
// for the sequence number and the checksum.
func stressSize(seq, seed uint64) int {
	h := splitmix(seq ^ seed)
	if h&63 == 0 {
		return 12 + int(h>>8)%4096
	}
	return 12 + int(h>>8)%244
}

func fillStress(b []byte, seq, seed uint64) {
	binary.LittleEndian.PutUint64(b, seq)
	body := b[8 : len(b)-4]
	x := seq ^ seed
	for i := range body {
		if i&7 == 0 {
			x = x*6364136223846793005 + 1442695040888963407
		}
		body[i] = byte(x >> (8 * (i & 7)))
	}
	binary.LittleEndian.PutUint32(b[len(b)-4:], crc32.Checksum(b[:len(b)-4], castagnoli))
}

func checkStress(b []byte, seq, seed uint64) error {
	if want := stressSize(seq, seed); len(b) != want {
		return fmt.Errorf("record %d: %d bytes, want %d", seq, len(b), want)
	}
	if got := binary.LittleEndian.Uint64(b); got != seq {
		return fmt.Errorf("record %d: sequence %d (lost or duplicated records)", seq, got)
	}
	if crc32.Checksum(b[:len(b)-4], castagnoli) != binary.LittleEndian.Uint32(b[len(b)-4:]) {
		return fmt.Errorf("record %d: checksum mismatch", seq)
	}
	return nil
}

func produceStress(p *Producer, n int, seed uint64) error {
	for seq := uint64(0); seq < uint64(n); seq++ {
		size := stressSize(seq, seed)
		var b []byte
		if seq&1 == 0 { // both reservation paths, as the hot-loop idiom mixes them
			b = p.TryReserve(size)
		}
		if b == nil {
			var err error
			if b, err = p.Reserve(size); err != nil {
				return fmt.Errorf("reserve record %d: %w", seq, err)
			}
		}
		fillStress(b, seq, seed)
		if err := p.Commit(size); err != nil {
			return err
		}
		if seq%16 == 15 || seq == uint64(n)-1 {
			if err := p.Flush(); err != nil {
				return err
			}
		}
	}
	return p.Close()
}

func consumeStress(c *Consumer, n int, seed uint64) error {
	for seq := uint64(0); seq < uint64(n); seq++ {
		b, err := c.Next()
		if err != nil {
			return fmt.Errorf("read record %d: %w", seq, err)
		}
		if err := checkStress(b, seq, seed); err != nil {
			return err
		}
		if seq%8 == 7 {
			c.Release()
		}
	}
	c.Release()
	if _, err := c.Next(); !errors.Is(err, io.EOF) {
		return fmt.Errorf("after %d records: want io.EOF, got %v", n, err)
	}
	return nil
}

// duplex runs a producer on out and a consumer on in at once. cancel, when
// closed, interrupts both (the watchdog's way to stop a hung run).
func duplex(in, out []byte, n int, policy futex.Policy, seedIn, seedOut uint64, cancel <-chan struct{}) error {
	cfg := Config{Idle: futex.Config{Policy: policy}}
	p, err := NewProducer(out, cfg)
	if err != nil {
		return err
	}
	c, err := NewConsumer(in, cfg)
	if err != nil {
		return err
	}
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		select {
		case <-cancel:
			p.Interrupt(errors.New("watchdog: stopped"))
			c.Interrupt(errors.New("watchdog: stopped"))
		case <-stop:
		}
	}()
	var wg sync.WaitGroup
	var perr error
	wg.Add(1)
	go func() { defer wg.Done(); perr = produceStress(p, n, seedOut) }()
	cerr := consumeStress(c, n, seedIn)
	if cerr != nil {
		c.Close() // unblock our producer if it waits on a dead peer
	}
	wg.Wait()
	c.Close()
	return errors.Join(perr, cerr)
}

func stressCount() int {
	if os.Getenv("SYPAS_STRESS") == "full" {
		return 10_000_000
	}
	return 100_000
}

func TestCrossProcessStress(t *testing.T) {
	n := stressCount()
	for _, mode := range []struct {
		name   string
		policy futex.Policy
	}{{"spin", futex.PolicySpin}, {"park", futex.PolicyPark}, {"auto", futex.PolicyAuto}} {
		t.Run(mode.name, func(t *testing.T) {
			const capacity = 1 << 18
			toChild, err := CreateRegion(capacity)
			require.NoError(t, err)
			defer toChild.Close()
			toParent, err := CreateRegion(capacity)
			require.NoError(t, err)
			defer toParent.Close()

			ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
			defer cancel()
			cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestHelperProcess$")
			cmd.Env = append(os.Environ(), helperEnv+"=ring-duplex",
				"SYPAS_N="+strconv.Itoa(n), "SYPAS_POLICY="+strconv.Itoa(int(mode.policy)),
				"SYPAS_CAP="+strconv.Itoa(capacity))
			cmd.ExtraFiles = []*os.File{toChild.File(), toParent.File()}
			cmd.Stderr = os.Stderr
			require.NoError(t, cmd.Start())
			childDone := make(chan error, 1)
			go func() { childDone <- cmd.Wait() }()

			abort := make(chan struct{})
			var abortOnce sync.Once
			stop := func() { abortOnce.Do(func() { close(abort) }) }
			watchdog := time.AfterFunc(3*time.Minute, stop)
			defer watchdog.Stop()

			start := time.Now()
			mine := make(chan error, 1)
			go func() { mine <- duplex(toParent.Bytes(), toChild.Bytes(), n, mode.policy, 2, 1, abort) }()
			var childErr, parentErr error
			select {
			case childErr = <-childDone:
				if childErr != nil {
					stop() // the child failed: don't wait for records that will not come
				}
				parentErr = <-mine
			case parentErr = <-mine:
				childErr = <-childDone
			}
			require.NoError(t, parentErr, "parent side")
			require.NoError(t, childErr, "child side")
			elapsed := time.Since(start)
			t.Logf("%s: %d records each way in %v (%.1f M records/s in total)", mode.name, n, elapsed.Round(time.Millisecond), 2*float64(n)/elapsed.Seconds()/1e6)
		})
	}
}

// TestHelperProcess is the child of the cross-process tests, not a test.
func TestHelperProcess(t *testing.T) {
	if os.Getenv(helperEnv) != "ring-duplex" {
		t.Skip("helper process")
	}
	err := func() error {
		n, _ := strconv.Atoi(os.Getenv("SYPAS_N"))
		policy, _ := strconv.Atoi(os.Getenv("SYPAS_POLICY"))
		capacity, _ := strconv.Atoi(os.Getenv("SYPAS_CAP"))
		in, err := OpenRegion(os.NewFile(3, "to-child"), capacity)
		if err != nil {
			return err
		}
		defer in.Close()
		out, err := OpenRegion(os.NewFile(4, "to-parent"), capacity)
		if err != nil {
			return err
		}
		defer out.Close()
		return duplex(in.Bytes(), out.Bytes(), n, futex.Policy(policy), 1, 2, nil)
	}()
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		os.Exit(1)
	}
	os.Exit(0)
}
