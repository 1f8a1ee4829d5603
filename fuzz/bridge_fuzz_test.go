package fuzz

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/sypas/go/control"
	"github.com/sypas/go/control/token"
	"github.com/sypas/go/frame"
	"github.com/sypas/go/ring"
	"github.com/sypas/go/sypas"
	"github.com/sypas/go/wire"
)

// The bridge's fuzz targets feed a hostile peer's ring records to a real
// sypas.Server (FuzzBridgeKernel) and to a real sypas.Client
// (FuzzBridgeClient), across a real session.
//
// An input is a list of records, each [flags u8][length u16 LE][bytes]. A
// record of at least a frame header can be made to pass the first checks,
// so that the fuzzer reaches what lies behind them: flags bit 0 sets its
// sequence to the ring's next, bit 1 its cap_ref to the session's token,
// bit 2 its stream id to 1, bit 3 its correlation to that of the call in
// flight (FuzzBridgeClient).
const (
	fixSequence = 1 << iota
	fixCapRef
	fixStream
	fixCorrelation
)

// records splits in into records, patched as their flags say, calling put
// with each; capRef is the session's token id, corr the correlation of
// the call in flight. It returns how many it put.
func records(in []byte, capRef, corr uint64, put func([]byte) bool) uint64 {
	n := uint64(0)
	for len(in) >= 3 {
		flags, size := in[0], int(binary.LittleEndian.Uint16(in[1:3]))
		in = in[3:]
		size = min(size, len(in))
		rec := bytes.Clone(in[:size])
		in = in[size:]
		if len(rec) >= frame.HeaderSize {
			if flags&fixSequence != 0 {
				binary.LittleEndian.PutUint64(rec[24:], n+1)
			}
			if flags&fixCapRef != 0 {
				binary.LittleEndian.PutUint64(rec[40:], capRef)
			}
			if flags&fixStream != 0 {
				binary.LittleEndian.PutUint32(rec[16:], 1)
			}
			if flags&fixCorrelation != 0 {
				binary.LittleEndian.PutUint64(rec[32:], corr)
			}
		}
		if !put(rec) {
			break
		}
		n++
	}
	return n
}

// record is one fuzz record holding a frame of type t with payload m,
// correlation corr, and every fix applied.
func record(t testing.TB, typ frame.Type, flags frame.Flags, corr uint64, m wire.Message) []byte {
	return recordFixed(t, typ, flags, corr, m, fixSequence|fixCapRef|fixStream)
}

// recordFixed is record with the fixes given.
func recordFixed(t testing.TB, typ frame.Type, flags frame.Flags, corr uint64, m wire.Message, fixes byte) []byte {
	b, err := wire.AppendFrame(nil, frame.Header{Type: typ, Flags: flags, StreamID: 1, Correlation: corr}, m)
	require.NoError(t, err)
	return append(append([]byte{fixes}, binary.LittleEndian.AppendUint16(nil, uint16(len(b)))...), b...)
}

func fuzzKeys(t testing.TB) *token.Keyring {
	keys := token.NewKeyring()
	require.NoError(t, keys.Add(1, bytes.Repeat([]byte{3}, 32)))
	return keys
}

// healthCorr is the correlation of the health call that ends every
// FuzzBridgeKernel input: its answer shows the session still served.
const healthCorr = 0x5eed

// FuzzBridgeKernel: whatever a daemon writes into its ring, the kernel
// neither panics nor hangs nor writes a frame that does not decode, and
// either answers the health call written after it or ends the session with
// an ERROR that says why; other daemons are served throughout.
func FuzzBridgeKernel(f *testing.F) {
	req := func(op string, body []byte) wire.Message { return &wire.Request{Method: []byte(op), Body: body} }
	f.Add(record(f, frame.TypeRequest, 0, 1, req("echo", []byte("hi"))))
	f.Add(append(record(f, frame.TypeRequest, 0, 1, req("echo.pool", []byte("x"))), record(f, frame.TypeRequest, 0, 2, req("echo", nil))...))
	f.Add(record(f, frame.TypeRequest, 0, 0, req("echo", []byte("one-way"))))
	f.Add(record(f, frame.TypeRequest, 0, 7, req("panic", nil)))
	f.Add(record(f, frame.TypeRequest, 0, 7, req("no.such.op", nil)))
	f.Add(record(f, frame.TypeRequest, 0, 7, req("admin", nil)))
	f.Add(record(f, frame.TypeSubscribe, 0, 3, &wire.Subscribe{SubscriptionID: 1, Topic: []byte("news")}))
	f.Add(append(record(f, frame.TypeSubscribe, 0, 3, &wire.Subscribe{SubscriptionID: 1, Topic: []byte("news")}),
		record(f, frame.TypeUnsubscribe, 0, 4, &wire.Unsubscribe{SubscriptionID: 1})...))
	f.Add(record(f, frame.TypeResponse, frame.FlagEndStream, 1, &wire.Response{Body: []byte("not yours")}))
	f.Add([]byte{0, 5, 0, 'h', 'e', 'l', 'l', 'o'})
	f.Add([]byte{})
	// Bulk: the daemon's region holds an "echo" REQUEST at offset 0
	// (bulkReq); descriptors of it, of past its end, of another region,
	// and ACKs of leases the kernel never sent.
	span := func(off, n uint64, region uint32) *wire.Bulk {
		return &wire.Bulk{InnerType: frame.TypeRequest, Region: region, Offset: off, Length: n, Lease: 1}
	}
	f.Add(record(f, frame.TypeBulk, 0, 5, span(0, uint64(len(bulkReq)), control.DaemonBulkID)))
	f.Add(record(f, frame.TypeBulk, 0, 0, span(0, uint64(len(bulkReq)), control.DaemonBulkID)))
	f.Add(record(f, frame.TypeBulk, 0, 5, span(bridgeBulkSize-8, 16, control.DaemonBulkID)))
	f.Add(record(f, frame.TypeBulk, 0, 5, span(0, 64, control.KernelBulkID)))
	f.Add(record(f, frame.TypeBulk, frame.FlagAck, 0, &wire.Bulk{InnerType: frame.TypeResponse, Region: control.KernelBulkID, Length: 1, Lease: 7}))

	cfg := sypas.ServerConfig{Workers: 2}
	cfg.Keys, cfg.Logger = fuzzKeys(f), quiet
	cfg.HandshakeTimeout = 5 * time.Second
	srv, err := sypas.NewServer(cfg)
	require.NoError(f, err)
	echo := func(_ context.Context, r *sypas.Request) ([]byte, error) { return r.Body, nil }
	srv.Handle("echo", sypas.RightRequest, echo, sypas.Inline)
	srv.Handle("echo.pool", sypas.RightRequest, echo)
	srv.Handle("admin", sypas.RightAdmin, echo, sypas.Inline)
	srv.Handle("panic", sypas.RightRequest, func(context.Context, *sypas.Request) ([]byte, error) { panic("fuzz") }, sypas.Inline)
	path := filepath.Join(f.TempDir(), "k.sock")
	l, err := control.Listen(path, control.Config{})
	require.NoError(f, err)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	f.Cleanup(func() {
		srv.Close()
		<-served
		l.Close()
	})
	dcfg := control.DialConfig{SessionConfig: control.SessionConfig{Logger: quiet,
		Features: control.DefaultFeatures | wire.FeatureSubscribe | wire.FeatureBulk, TxRingSize: 16 << 10, RxRingSize: 16 << 10,
		BulkSize: bridgeBulkSize}}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	other, err := sypas.Dial(ctx, path, sypas.ClientConfig{DialConfig: dcfg})
	require.NoError(f, err)
	f.Cleanup(func() { other.Close() })

	f.Fuzz(func(t *testing.T, in []byte) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		s, err := control.Dial(ctx, path, dcfg)
		require.NoError(t, err)
		defer s.Close()
		copy(s.Bulk().Bytes(), bulkReq)

		// The kernel's ring is read while the records are written: its
		// answers must not wait for room behind our writes.
		read := make(chan error, 1)
		go func() { read <- readKernel(s) }()
		prod := s.Producer()
		prod.SetDeadline(time.Now().Add(5 * time.Second))
		write := func(rec []byte) bool {
			_, err := prod.Write(rec)
			return err == nil // a record too large for the ring, or the session ended
		}
		n := records(in, s.CapRef(), 0, write)
		health, err := wire.AppendFrame(nil, frame.Header{Type: frame.TypeRequest, StreamID: 1, Sequence: n + 1,
			Correlation: healthCorr, CapRef: s.CapRef()}, &wire.Request{Method: []byte(sypas.HealthOp)})
		require.NoError(t, err)
		write(health)

		select {
		case err := <-read:
			require.NoError(t, err)
		case <-ctx.Done():
			t.Fatal("the kernel neither answered the health call nor ended the session")
		}
		if h, err := other.Health(ctx); err != nil || h != "SERVING" {
			t.Fatalf("another daemon is not served: %q, %v", h, err)
		}
	})
}

// bridgeBulkSize is the bulk regions' size in the bridge's fuzz targets: the
// smallest.
const bridgeBulkSize = wire.MinBulkSize

// bulkReq is the REQUEST payload the fuzzing daemon keeps at offset 0 of
// its bulk region.
var bulkReq = func() []byte {
	b, err := (&wire.Request{Method: []byte("echo"), Body: bytes.Repeat([]byte("b"), 100)}).Append(nil)
	if err != nil {
		panic(err)
	}
	return b
}()

// readKernel reads the kernel's ring of s until the answer to the health
// call, or the session's end, which must come with the kernel's reason.
// Every frame must decode.
func readKernel(s *control.Session) error {
	cons := s.Consumer()
	cons.SetDeadline(time.Now().Add(8 * time.Second))
	for {
		v, err := cons.Next()
		if err != nil {
			if errors.Is(err, ring.ErrCorrupt) {
				return fmt.Errorf("the kernel corrupted its ring: %w", err)
			}
			select {
			case <-s.Done():
			case <-time.After(8 * time.Second):
				return fmt.Errorf("the ring failed (%w) and the session did not end", err)
			}
			var we *wire.Error
			if !errors.As(s.Err(), &we) || len(we.Message) == 0 {
				return fmt.Errorf("the session ended without the kernel's reason: %v", s.Err())
			}
			return nil
		}
		var fr frame.Frame
		if _, err := fr.Decode(v, frame.Config{MaxPayload: frame.HardMaxPayload}); err != nil {
			return fmt.Errorf("the kernel wrote a bad frame: %w", err)
		}
		m := wire.NewMessage(fr.Type)
		if m == nil {
			return fmt.Errorf("the kernel wrote a %v", fr.Type)
		}
		if err := wire.DecodeFrame(&fr, m); err != nil {
			return fmt.Errorf("the kernel wrote a bad %v payload: %w", fr.Type, err)
		}
		cons.Release()
		if fr.Type == frame.TypeResponse && fr.Correlation == healthCorr {
			return nil
		}
	}
}

// FuzzBridgeClient: whatever a kernel writes into the daemon's ring while a
// Call waits, the Client neither panics nor lets the Call outlive its
// context, and Close returns.
func FuzzBridgeClient(f *testing.F) {
	all := byte(fixSequence | fixCapRef | fixStream | fixCorrelation)
	f.Add(recordFixed(f, frame.TypeResponse, frame.FlagEndStream, 0, &wire.Response{Body: []byte("x")}, all))
	f.Add(recordFixed(f, frame.TypeResponse, 0, 0, &wire.Response{Body: []byte("x")}, all))
	f.Add(recordFixed(f, frame.TypeError, 0, 0, &wire.ErrorMsg{Code: wire.CodeResource, Message: []byte("busy"), RetryAfterMs: 1}, all))
	f.Add(recordFixed(f, frame.TypeError, 0, 0, &wire.ErrorMsg{Code: wire.CodeAuth, Message: []byte("who")}, all))
	f.Add(append(recordFixed(f, frame.TypeResponse, frame.FlagEndStream, 99, &wire.Response{Body: []byte("stale")}, all&^fixCorrelation),
		recordFixed(f, frame.TypeResponse, frame.FlagEndStream, 0, &wire.Response{Body: []byte("x")}, all)...))
	f.Add(recordFixed(f, frame.TypeEvent, 0, 0, &wire.Event{SubscriptionID: 9, Topic: []byte("t"), Body: []byte("e")}, all&^fixCorrelation))
	f.Add(recordFixed(f, frame.TypeRequest, 0, 1, &wire.Request{Method: []byte("x")}, all&^fixCorrelation))
	// Bulk: the kernel's region holds 'k' bytes; a reply and an event in
	// it, one past its end, one in the daemon's region, forged ACKs.
	reply := func(off, n uint64, region uint32) *wire.Bulk {
		return &wire.Bulk{InnerType: frame.TypeResponse, Region: region, Offset: off, Length: n, Lease: 3}
	}
	f.Add(recordFixed(f, frame.TypeBulk, frame.FlagEndStream, 0, reply(0, 70000, control.KernelBulkID), all))
	f.Add(recordFixed(f, frame.TypeBulk, frame.FlagEndStream, 0, reply(bridgeBulkSize-4, 8, control.KernelBulkID), all))
	f.Add(recordFixed(f, frame.TypeBulk, frame.FlagEndStream, 0, reply(0, 10, control.DaemonBulkID), all))
	f.Add(recordFixed(f, frame.TypeBulk, 0, 0, &wire.Bulk{InnerType: frame.TypeEvent, Region: control.KernelBulkID, Length: 30, Lease: 4}, all&^fixCorrelation))
	f.Add(recordFixed(f, frame.TypeBulk, frame.FlagAck, 0, &wire.Bulk{InnerType: frame.TypeRequest, Region: control.DaemonBulkID, Length: 1, Lease: 9}, all&^fixCorrelation))
	f.Add([]byte{0, 5, 0, 'h', 'e', 'l', 'l', 'o'})
	f.Add([]byte{})

	path := filepath.Join(f.TempDir(), "k.sock")
	l, err := control.Listen(path, control.Config{})
	require.NoError(f, err)
	f.Cleanup(func() { l.Close() })
	srv, err := control.NewServer(l, control.ServerConfig{Keys: fuzzKeys(f), SessionConfig: control.SessionConfig{
		Logger: quiet, Features: control.DefaultFeatures | wire.FeatureSubscribe | wire.FeatureBulk,
		TxRingSize: 16 << 10, RxRingSize: 16 << 10, BulkSize: bridgeBulkSize}})
	require.NoError(f, err)
	ccfg := sypas.ClientConfig{MaxAttempts: 1}
	ccfg.Logger = quiet

	f.Fuzz(func(t *testing.T, in []byte) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		accepted := make(chan *control.Session, 1)
		go func() {
			for { // past a reconnection the last input's Client began before its Close
				ks, err := srv.Accept(ctx)
				if err == nil || ctx.Err() != nil {
					accepted <- ks
					return
				}
			}
		}()
		c, err := sypas.Dial(ctx, path, ccfg)
		require.NoError(t, err)
		ks := <-accepted
		require.NotNil(t, ks)
		defer ks.Close()
		if ks.Bulk() != nil {
			copy(ks.Bulk().Bytes(), bytes.Repeat([]byte("k"), bridgeBulkSize))
		}

		const callFor = 200 * time.Millisecond
		callCtx, cancelCall := context.WithTimeout(ctx, callFor)
		defer cancelCall()
		called := make(chan error, 1)
		start := time.Now()
		go func() {
			_, err := c.Call(callCtx, "echo", []byte("x"))
			called <- err
		}()
		// The kernel learns the call's correlation from its REQUEST.
		cons := ks.Consumer()
		cons.SetDeadline(time.Now().Add(5 * time.Second))
		v, err := cons.Next()
		require.NoError(t, err)
		var req frame.Frame
		_, err = req.Decode(v, frame.Config{})
		require.NoError(t, err)
		cons.Release()

		prod := ks.Producer()
		prod.SetDeadline(time.Now().Add(2 * time.Second))
		records(in, ks.CapRef(), req.Correlation, func(rec []byte) bool {
			_, err := prod.Write(rec)
			return err == nil
		})
		select {
		case <-called:
		case <-time.After(callFor + 5*time.Second):
			t.Fatalf("a Call with a %v deadline still waits after %v", callFor, time.Since(start))
		}
		closed := make(chan struct{})
		go func() { c.Close(); close(closed) }()
		select {
		case <-closed:
		case <-time.After(5 * time.Second):
			t.Fatal("Close hangs")
		}
	})
}
