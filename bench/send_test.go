package bench

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/sypas/go/control"
	"github.com/sypas/go/futex"
	"github.com/sypas/go/sypas"
)

// BenchmarkSend: one-way Sends of 64-byte and 1 KiB bodies from one
// goroutine to a kernel in another process, whose Inline handler checks
// each body's sequence number and sums its words; the clock stops when a
// Call has read back the count and sum, which must match what was sent.
// Beside it, in the same run, its baselines from BenchmarkStream: the ring
// with one Flush per message (as a lone sender's Send does), and a Unix
// socket with one write(2) per message. Pinned as the ring streams are.
func BenchmarkSend(b *testing.B) {
	for _, size := range []int{64, 1024} {
		sz := sizeName(size)
		b.Run("sypas/"+sz, func(b *testing.B) { benchSend(b, size) })
		b.Run("ring/"+sz, func(b *testing.B) { benchRingStream(b, size, 1, true, "view") })
		b.Run("unix-socket/"+sz, func(b *testing.B) { benchUnixStream(b, size) })
	}
}

func benchSend(b *testing.B, size int) {
	idle := futex.Config{}
	pinned := shouldPin(true)
	c := dialKernel(b, startKernel(b, idle, pinned), idle)
	if _, _, err := sinkResult(c); err != nil { // the session is up
		b.Fatal(err)
	}
	ctx := context.Background()
	msg := streamMessage(size)
	stop := startStream(b, size, pinned)
	for i := 0; i < b.N; i++ {
		binary.LittleEndian.PutUint64(msg, uint64(i))
		if err := c.Send(ctx, "sink", msg); err != nil {
			b.Fatal(err)
		}
	}
	n, sum, err := sinkResult(c)
	binary.LittleEndian.PutUint64(msg, 0)
	if want := streamSum(msg, b.N); err != nil || n != uint64(b.N) || sum != want {
		b.Fatalf("the kernel took %d messages summing to %#x (%v); %d summing to %#x were sent", n, sum, err, b.N, want)
	}
	stop()
}

// BenchmarkPublish: the kernel (this process) publishes b.N events of 64
// bytes on one topic to 1 and 8 subscribers, each a Client with its own
// session, all in one other process. The topic's policy is Block, so the
// publisher waits for room rather than dropping. Each subscriber checks that
// its events arrive in order with their bodies whole; the clock stops when
// every subscriber has had all of them. It reports events/s delivered (b.N
// × subscribers / time), SetBytes is the bytes delivered per Publish, and
// "dropped" the events subscribers lost (full Pending: 0 expected).
func BenchmarkPublish(b *testing.B) {
	for _, subs := range []int{1, 8} {
		b.Run(strconv.Itoa(subs), func(b *testing.B) { benchPublish(b, subs, msgSize) })
	}
}

const benchTopic = "bench.events"

func benchPublish(b *testing.B, subs, size int) {
	cfg := sypas.ServerConfig{Topics: map[string]sypas.SlowPolicy{benchTopic: sypas.Block}}
	cfg.Keys = benchKeys()
	cfg.Logger = slog.New(slog.DiscardHandler)
	srv, err := sypas.NewServer(cfg)
	if err != nil {
		b.Fatal(err)
	}
	path := filepath.Join(b.TempDir(), "k.sock")
	l, err := control.Listen(path, control.Config{})
	if err != nil {
		b.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	b.Cleanup(func() {
		srv.Close()
		<-served
		l.Close()
	})

	ackR, ackW := ackPipe(b)
	cmd := startPeer(b, "sypas-subscribers", false, []*os.File{ackW},
		"SYPAS_SOCK="+path, "SUBS="+strconv.Itoa(subs), "N="+strconv.Itoa(b.N), "SIZE="+strconv.Itoa(size))
	ackW.Close()
	awaitAck(b, ackR) // subscribed
	ctx := context.Background()
	msg := streamMessage(size)
	b.SetBytes(int64(subs * size))
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		binary.LittleEndian.PutUint64(msg, uint64(i))
		if err := srv.Publish(ctx, benchTopic, msg); err != nil {
			b.Fatal(err)
		}
	}
	var dropped [8]byte
	if err := readFull(int(ackR.Fd()), dropped[:]); err != nil {
		b.Fatalf("subscribers: %v", err)
	}
	b.StopTimer()
	d := binary.LittleEndian.Uint64(dropped[:])
	b.ReportMetric(float64(uint64(b.N*subs)-d)/b.Elapsed().Seconds(), "events/s")
	b.ReportMetric(float64(d), "dropped")
	waitPeer(b, cmd)
}

func init() { peers["sypas-subscribers"] = subscribers }

// subscribers subscribes SUBS clients to the topic, acknowledges on fd 3,
// takes N events on each, checking them, and writes on fd 3 how many the
// subscriptions dropped.
func subscribers() error {
	subs, n, size := envInt("SUBS"), envInt("N"), envInt("SIZE")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cfg := sypas.ClientConfig{}
	cfg.Logger = slog.New(slog.DiscardHandler)
	var ss []*sypas.Subscription
	for range subs {
		c, err := sypas.Dial(ctx, os.Getenv("SYPAS_SOCK"), cfg)
		if err != nil {
			return err
		}
		defer c.Close()
		s, err := c.Subscribe(ctx, benchTopic, sypas.SubscribeOptions{})
		if err != nil {
			return err
		}
		ss = append(ss, s)
	}
	if err := writeFull(3, []byte{1}); err != nil {
		return err
	}
	errs := make(chan error, subs)
	var wg sync.WaitGroup
	for _, s := range ss {
		wg.Add(1)
		go func() { defer wg.Done(); errs <- takeEvents(ctx, s, n, size) }()
	}
	wg.Wait()
	close(errs)
	var all []error
	for err := range errs {
		all = append(all, err)
	}
	if err := errors.Join(all...); err != nil {
		return err
	}
	var dropped uint64
	for _, s := range ss {
		dropped += s.Dropped()
	}
	return writeFull(3, binary.LittleEndian.AppendUint64(nil, dropped))
}

// takeEvents takes events from s until it has had n or lost the rest,
// checking that each is whole and later in the sequence than the last.
func takeEvents(ctx context.Context, s *sypas.Subscription, n, size int) error {
	want := streamMessage(size)
	next := uint64(0)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for got := 0; uint64(got)+s.Dropped() < uint64(n); {
		select {
		case ev, ok := <-s.Events():
			if !ok {
				return errors.New("the subscription ended")
			}
			if len(ev.Body) != size || ev.Topic != benchTopic {
				return fmt.Errorf("event %d: %d bytes on %q", got, len(ev.Body), ev.Topic)
			}
			seq := binary.LittleEndian.Uint64(ev.Body)
			binary.LittleEndian.PutUint64(want, seq)
			if seq < next || !bytes.Equal(ev.Body, want) {
				return fmt.Errorf("event %d: sequence %d after %d, or its body changed", got, seq, next)
			}
			next = seq + 1
			got++
		case <-tick.C: // events dropped do not arrive: look at the count
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}
