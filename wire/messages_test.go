package wire

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math"
	"reflect"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/frame"
)

// samples returns one valid, fully populated message of every type, in
// frame type order. The docs examples are rendered from them.
func samples() []Message {
	return []Message{
		&Request{Timeout: 250_000_000, Method: []byte("kv.get"), Body: []byte(`{"key":"a"}`)},
		&Response{Body: []byte(`{"value":1}`)},
		&Event{SubscriptionID: 7, Timestamp: 1_767_225_600_000_000_000, Topic: []byte("cpu.load"), Body: []byte("0.42")},
		&Subscribe{SubscriptionID: 7, Options: SubLastValue, Topic: []byte("cpu.*")},
		&Unsubscribe{SubscriptionID: 7},
		&ErrorMsg{Code: CodeNotFound, RetryAfterMs: 0, Message: []byte("no method kv.put")},
		&Heartbeat{Nonce: 0x0123456789abcdef, SentAt: 1_000_000_000},
		&Bulk{InnerType: frame.TypeResponse, Flags: BulkChecksum, Region: 3, Offset: 1 << 20, Length: 300 << 10, Lease: 99, Checksum: 0xdeadbeef},
		&GoAway{LastCorrelation: 41, Code: CodeOK, Message: []byte("shutdown")},
		&Hello{MinVersion: 1, MaxVersion: 1, Features: FeatureChecksum | FeatureBulk | FeatureSubscribe,
			TxRingSize: 1 << 20, RxRingSize: 1 << 20, MaxPayload: 64 << 10, MaxInFlight: 128, Name: []byte("netd")},
		&Welcome{Version: 1, HeartbeatMisses: 3, HeartbeatIntervalMs: 1000, Features: FeatureChecksum | FeatureBulk,
			SessionID: 0x5e55, TxRingSize: 1 << 20, RxRingSize: 1 << 20, MaxPayload: 64 << 10, MaxInFlight: 64},
		&Token{TokenID: 0x8badf00d, ExpiryUnix: 1_767_229_200_000_000_000, Token: []byte("\x01opaque-macaroon-bytes")},
		&TokenRefresh{TokenID: 0x8badf00d, RequestedTTLMs: 3_600_000},
		&Regions{Entries: []Region{
			{Role: RoleControl, ID: 0, Size: 4096},
			{Role: RoleRingTx, ID: 1, Size: 1 << 20},
			{Role: RoleRingRx, ID: 2, Size: 1 << 20},
			{Role: RoleBulk, ID: 3, Size: 64 << 20},
		}},
	}
}

// fresh returns a new zero value of m's type.
func fresh(m Message) Message {
	return reflect.New(reflect.TypeOf(m).Elem()).Interface().(Message)
}

// varLen is the number of bytes of m that a shorter payload may drop and
// still decode (the trailing body).
func varLen(m Message) int {
	switch m := m.(type) {
	case *Request:
		return len(m.Body)
	case *Event:
		return len(m.Body)
	case *Response:
		return len(m.Body)
	}
	return 0
}

func TestSamplesCoverEveryType(t *testing.T) {
	var got []frame.Type
	for _, m := range samples() {
		got = append(got, m.Type())
		n := NewMessage(m.Type())
		require.NotNil(t, n, "%v", m.Type())
		assert.Equal(t, fresh(m), n)
	}
	assert.Equal(t, frame.Types(), got)
	assert.Nil(t, NewMessage(0x7f))
}

func TestPayloadRoundTrip(t *testing.T) {
	for _, m := range samples() {
		t.Run(m.Type().String(), func(t *testing.T) {
			p, err := m.Append(nil)
			require.NoError(t, err)
			assert.Len(t, p, m.Len())

			got := fresh(m)
			require.NoError(t, got.Decode(p))
			assert.Equal(t, m, got)
			again, err := got.Append(nil)
			require.NoError(t, err)
			assert.Equal(t, p, again)

			// Through a whole frame, with checksum.
			b, err := AppendFrame([]byte("prefix"), frame.Header{Flags: frame.FlagChecksum, Correlation: 5}, m)
			require.NoError(t, err)
			assert.Equal(t, "prefix", string(b[:6]))
			var f frame.Frame
			n, err := f.Decode(b[6:], frame.Config{})
			require.NoError(t, err)
			assert.Equal(t, len(b)-6, n)
			assert.Equal(t, m.Type(), f.Type)
			assert.Equal(t, uint64(5), f.Correlation)
			got = fresh(m)
			require.NoError(t, DecodeFrame(&f, got))
			assert.Equal(t, m, got)
		})
	}
}

func TestPayloadEveryTruncation(t *testing.T) {
	for _, m := range samples() {
		p, err := m.Append(nil)
		require.NoError(t, err)
		for i := range len(p) - varLen(m) {
			err := fresh(m).Decode(p[:i])
			assert.ErrorIs(t, err, ErrMalformed, "%v cut at %d of %d", m.Type(), i, len(p))
		}
	}
}

func TestPayloadTrailingBytes(t *testing.T) {
	for _, m := range samples() {
		p, err := m.Append(nil)
		require.NoError(t, err)
		p = append(p, 0xee)
		got := fresh(m)
		err = got.Decode(p)
		switch m.Type() {
		case frame.TypeRequest, frame.TypeResponse, frame.TypeEvent:
			require.NoError(t, err, "the body takes the rest")
		case frame.TypeHello:
			require.NoError(t, err, "HELLO is extensible")
			assert.Equal(t, m, got)
		default:
			assert.ErrorIs(t, err, ErrTrailing, "%v", m.Type())
			assert.ErrorIs(t, err, ErrMalformed, "%v", m.Type())
		}
	}
}

func TestDecodeFrameTypeMismatch(t *testing.T) {
	f := frame.Frame{Header: frame.Header{Type: frame.TypeResponse}}
	assert.ErrorIs(t, DecodeFrame(&f, &Request{}), ErrMalformed)
}

// mutate returns the sample payload of type t with bytes at off replaced.
func mutate(t *testing.T, typ frame.Type, off int, v ...byte) []byte {
	for _, m := range samples() {
		if m.Type() == typ {
			p, err := m.Append(nil)
			require.NoError(t, err)
			copy(p[off:], v)
			return p
		}
	}
	t.Fatalf("no sample of %v", typ)
	return nil
}

func TestPayloadFieldValidation(t *testing.T) {
	ff := []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
	for _, tc := range []struct {
		name string
		m    Message
		p    []byte
	}{
		{"requestTimeoutOverflow", &Request{}, mutate(t, frame.TypeRequest, 0, ff...)},
		{"requestEmptyMethod", &Request{}, mutate(t, frame.TypeRequest, 8, 0, 0)},
		{"requestLongMethod", &Request{}, append(append(make([]byte, 8), 0x01, 0x04), make([]byte, 1025)...)},
		{"eventSub0", &Event{}, mutate(t, frame.TypeEvent, 0, 0, 0, 0, 0, 0, 0, 0, 0)},
		{"eventEmptyTopic", &Event{}, mutate(t, frame.TypeEvent, 16, 0, 0)},
		{"subscribeOptions", &Subscribe{}, mutate(t, frame.TypeSubscribe, 8, 2)},
		{"subscribeSub0", &Subscribe{}, mutate(t, frame.TypeSubscribe, 0, 0, 0, 0, 0, 0, 0, 0, 0)},
		{"unsubscribe0", &Unsubscribe{}, make([]byte, 8)},
		{"errorOK", &ErrorMsg{}, mutate(t, frame.TypeError, 0, 0, 0)},
		{"errorLongMessage", &ErrorMsg{}, mutate(t, frame.TypeError, 2, 0x01, 0x10)},
		{"bulkInner", &Bulk{}, mutate(t, frame.TypeBulk, 0, byte(frame.TypeHello))},
		{"bulkFlags", &Bulk{}, mutate(t, frame.TypeBulk, 1, 3)},
		{"bulkReserved", &Bulk{}, mutate(t, frame.TypeBulk, 2, 1)},
		{"bulkReserved2", &Bulk{}, mutate(t, frame.TypeBulk, 39, 1)},
		{"bulkEmpty", &Bulk{}, mutate(t, frame.TypeBulk, 16, 0, 0, 0, 0, 0, 0, 0, 0)},
		{"bulkOverflow", &Bulk{}, mutate(t, frame.TypeBulk, 8, ff...)},
		{"bulkChecksumWithoutFlag", &Bulk{}, mutate(t, frame.TypeBulk, 1, 0)},
		{"goAwayLongMessage", &GoAway{}, mutate(t, frame.TypeGoAway, 10, 0x01, 0x10)},
		{"helloVersion0", &Hello{}, mutate(t, frame.TypeHello, 0, 0, 0)},
		{"helloVersionRange", &Hello{}, mutate(t, frame.TypeHello, 0, 2, 0, 1, 0)},
		{"helloReserved", &Hello{}, mutate(t, frame.TypeHello, 4, 1)},
		{"helloRingNotPow2", &Hello{}, mutate(t, frame.TypeHello, 16, 1, 0, 0x10, 0)},
		{"helloRingTooSmall", &Hello{}, mutate(t, frame.TypeHello, 20, 0, 4, 0, 0)},
		{"helloMaxPayload", &Hello{}, mutate(t, frame.TypeHello, 24, 1, 0, 0, 1)},
		{"helloLongName", &Hello{}, mutate(t, frame.TypeHello, 32, 0x01, 0x04)},
		{"welcomeVersion", &Welcome{}, mutate(t, frame.TypeWelcome, 0, 0, 0)},
		{"welcomeMisses", &Welcome{}, mutate(t, frame.TypeWelcome, 2, 0, 0)},
		{"welcomeInterval", &Welcome{}, mutate(t, frame.TypeWelcome, 4, 0, 0, 0, 0)},
		{"welcomeSession", &Welcome{}, mutate(t, frame.TypeWelcome, 16, 0, 0, 0, 0, 0, 0, 0, 0)},
		{"welcomeRing0", &Welcome{}, mutate(t, frame.TypeWelcome, 24, 0, 0, 0, 0)},
		{"welcomeMaxPayload0", &Welcome{}, mutate(t, frame.TypeWelcome, 32, 0, 0, 0, 0)},
		{"welcomeInFlight0", &Welcome{}, mutate(t, frame.TypeWelcome, 36, 0, 0, 0, 0)},
		{"tokenID0", &Token{}, mutate(t, frame.TypeToken, 0, 0, 0, 0, 0, 0, 0, 0, 0)},
		{"tokenExpiry", &Token{}, mutate(t, frame.TypeToken, 8, ff...)},
		{"tokenEmpty", &Token{}, mutate(t, frame.TypeToken, 16, 0, 0)},
		{"tokenLong", &Token{}, mutate(t, frame.TypeToken, 16, 0x01, 0x10)},
		{"refreshID0", &TokenRefresh{}, make([]byte, 16)},
		{"refreshReserved", &TokenRefresh{}, mutate(t, frame.TypeTokenRefresh, 12, 1)},
		{"regions0", &Regions{}, mutate(t, frame.TypeRegions, 0, 0, 0)},
		{"regionsCountHigh", &Regions{}, mutate(t, frame.TypeRegions, 0, 5, 0)},
		{"regionsCountHuge", &Regions{}, mutate(t, frame.TypeRegions, 0, 0xff, 0xff)},
		{"regionsReserved", &Regions{}, mutate(t, frame.TypeRegions, 3, 1)},
		{"regionsRole", &Regions{}, mutate(t, frame.TypeRegions, 8, 9)},
		{"regionsFlags", &Regions{}, mutate(t, frame.TypeRegions, 9, 2)},
		{"regionsEntryReserved", &Regions{}, mutate(t, frame.TypeRegions, 10, 1)},
		{"regionsDuplicateID", &Regions{}, mutate(t, frame.TypeRegions, 8+16+4, 0)},
		{"regionsSize", &Regions{}, mutate(t, frame.TypeRegions, 8+16+8, 1, 0, 0, 0, 0, 0, 0, 0)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.m.Decode(tc.p)
			require.ErrorIs(t, err, ErrMalformed)
			if r, ok := tc.m.(*Regions); ok {
				assert.Empty(t, r.Entries, "a failed Decode leaves no entries (capacity is kept)")
			} else {
				assert.Equal(t, fresh(tc.m), tc.m, "a failed Decode leaves the zero value")
			}
		})
	}
}

func TestEncodeRejectsInvalid(t *testing.T) {
	long := make([]byte, MaxNameLen+1)
	for _, m := range []Message{
		&Request{}, &Request{Method: long}, &Request{Method: []byte("m"), Timeout: -1},
		&Event{Topic: []byte("t")}, &Event{SubscriptionID: 1},
		&Subscribe{SubscriptionID: 1, Topic: []byte("t"), Options: 0x80}, &Subscribe{SubscriptionID: 1, Topic: long},
		&Unsubscribe{},
		&ErrorMsg{}, &ErrorMsg{Code: CodeAuth, Message: make([]byte, MaxMessageLen+1)},
		&Bulk{}, &Bulk{InnerType: frame.TypeEvent, Length: 1, Checksum: 1},
		&GoAway{Message: make([]byte, MaxMessageLen+1)},
		&Hello{}, &Hello{MinVersion: 1, MaxVersion: 1, TxRingSize: 5000},
		&Welcome{}, &Token{}, &Token{TokenID: 1, ExpiryUnix: 1, Token: make([]byte, MaxTokenLen+1)},
		&TokenRefresh{},
		&Regions{}, &Regions{Entries: make([]Region, MaxRegions+1)},
		&Regions{Entries: []Region{{Role: RoleBulk, Size: 4096}, {Role: RoleBulk, Size: 4096}}},
	} {
		b, err := m.Append([]byte("keep"))
		if assert.Error(t, err, "%v %+v", m.Type(), m) {
			assert.True(t, errorIsAny(err, ErrMalformed, ErrFieldTooLong), "%v: %v", m.Type(), err)
		}
		assert.Equal(t, "keep", string(b))
		b, err = AppendFrame([]byte("keep"), frame.Header{}, m)
		assert.Error(t, err)
		assert.Equal(t, "keep", string(b))
	}
	_, err := AppendFrame(nil, frame.Header{}, &Response{Body: make([]byte, frame.HardMaxPayload+1)})
	assert.ErrorIs(t, err, ErrTooLarge)
	_, err = AppendFrame(nil, frame.Header{Flags: frame.FlagAck}, &Response{})
	assert.ErrorIs(t, err, frame.ErrBadFlags)
}

func errorIsAny(err error, targets ...error) bool {
	for _, t := range targets {
		if errorsIs(err, t) {
			return true
		}
	}
	return false
}

func TestDecodeViewsAreCapped(t *testing.T) {
	p, err := (&Event{SubscriptionID: 1, Topic: []byte("topic"), Body: []byte("body")}).Append(nil)
	require.NoError(t, err)
	var e Event
	require.NoError(t, e.Decode(p))
	assert.Equal(t, len(e.Topic), cap(e.Topic), "appending to Topic must not overwrite Body")
	_ = append(e.Topic, 'X')
	assert.Equal(t, "body", string(e.Body))
}

func TestRegionsDecodeReusesEntries(t *testing.T) {
	m := samples()[13].(*Regions)
	p, err := m.Append(nil)
	require.NoError(t, err)
	got := Regions{Entries: make([]Region, 0, MaxRegions)}
	before := &got.Entries[:1][0]
	require.NoError(t, got.Decode(p))
	assert.Same(t, before, &got.Entries[0])
	assert.Equal(t, "CONTROL RING_TX RING_RX BULK RegionRole(9)",
		fmt.Sprint(RoleControl, RoleRingTx, RoleRingRx, RoleBulk, RegionRole(9)))
}

func TestZeroAllocs(t *testing.T) {
	buf := make([]byte, 0, 1<<10)
	for _, m := range samples() {
		p, err := m.Append(nil)
		require.NoError(t, err)
		got := fresh(m)
		if r, ok := got.(*Regions); ok {
			r.Entries = make([]Region, 0, MaxRegions)
		}
		assert.Zero(t, testing.AllocsPerRun(50, func() { buf, err = m.Append(buf[:0]) }), "%v Append", m.Type())
		require.NoError(t, err)
		assert.Zero(t, testing.AllocsPerRun(50, func() { err = got.Decode(p) }), "%v Decode", m.Type())
		require.NoError(t, err)
		h := frame.Header{Flags: frame.FlagChecksum}
		assert.Zero(t, testing.AllocsPerRun(50, func() { buf, err = AppendFrame(buf[:0], h, m) }), "%v AppendFrame", m.Type())
		require.NoError(t, err)
	}
}

func TestHelloExtension(t *testing.T) {
	h := *samples()[9].(*Hello)
	p, err := h.Append(nil)
	require.NoError(t, err)
	var got Hello
	for _, n := range []int{1, 3} { // too few bytes for bulk_size: ignored
		require.NoError(t, got.Decode(append(p[:len(p):len(p)], bytes.Repeat([]byte{0xab}, n)...)))
		assert.Equal(t, h, got)
	}
	assert.False(t, got.HasBulkSize)

	// bulk_size 0 (the kernel's default) is encoded when HasBulkSize says
	// so: a daemon that offers BULK sends it (§3.10).
	h.HasBulkSize = true
	p, err = h.Append(nil)
	require.NoError(t, err)
	assert.Len(t, p, h.Len())
	assert.Equal(t, []byte{0, 0, 0, 0}, p[len(p)-4:])
	require.NoError(t, got.Decode(p))
	assert.Equal(t, h, got)

	h.BulkSize = 16 << 20
	p, err = h.Append(nil)
	require.NoError(t, err)
	assert.Len(t, p, h.Len())
	p = append(p, bytes.Repeat([]byte{0xab}, 24)...) // fields of a later version
	require.NoError(t, got.Decode(p))
	assert.Equal(t, h, got)

	for _, bad := range []uint32{1, 3 << 20, MinBulkSize / 2, MaxBulkSize * 2} {
		h.BulkSize = bad
		_, err := h.Append(nil)
		assert.ErrorIs(t, err, ErrMalformed, "bulk_size %d", bad)
		q := binary.LittleEndian.AppendUint32(p[:len(p)-24-4:len(p)-24-4], bad)
		assert.Error(t, got.Decode(q), "bulk_size %d", bad)
	}
}

func TestTimes(t *testing.T) {
	w := Welcome{HeartbeatIntervalMs: 1500}
	assert.Equal(t, "1.5s", w.HeartbeatInterval().String())
	tok := Token{ExpiryUnix: 1_767_225_600_000_000_000}
	assert.Equal(t, int64(1_767_225_600), tok.Expiry().Unix())
	assert.Less(t, uint64(math.MaxInt64), uint64(math.MaxUint64))
}
