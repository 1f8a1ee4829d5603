package wire

import (
	"fmt"
	"math"
	"math/bits"
	"slices"
	"time"

	"github.com/sypas/go/frame"
)

// Payload limits (docs/PROTOCOL.md, section 7).
const (
	MaxNameLen    = 1024 // method, topic and daemon names
	MaxMessageLen = 4096 // ERROR and GOAWAY messages
	MaxTokenLen   = 2048 // token bytes in TOKEN: a version 1 token's maximum (control/token.MaxTokenSize)
	MaxRegions    = 64   // entries in REGIONS
	MinRingSize   = 4 << 10
	MaxRingSize   = 1 << 30
	PageSize      = 4096 // region sizes are multiples of it
	// Bulk region sizes (HELLO bulk_size, REGIONS role BULK): a power of
	// two in [MinBulkSize, MaxBulkSize]. A bulk payload may be as large
	// as its region.
	MinBulkSize = 64 << 10
	MaxBulkSize = 1 << 30
)

// Protocol versions a HELLO/WELCOME may name.
const (
	ProtocolVersion    = 1 // the version this package speaks
	MinProtocolVersion = 1
)

// Feature bits of HELLO and WELCOME. Unknown bits are legal in HELLO (the
// kernel answers with the intersection of what both sides know).
//
// FeatureChecksum is bit 0, reserved: a kernel never grants it and the
// control package refuses it in a configuration. A frame's CHECKSUM flag
// needs no negotiation: any sender may set it on any frame and every
// receiver verifies it when set (docs/PROTOCOL.md §2.4).
const (
	FeatureChecksum     uint64 = 1 << 0 // reserved; never granted
	FeatureBulk         uint64 = 1 << 1 // BULK descriptors and bulk regions
	FeatureSubscribe    uint64 = 1 << 2 // SUBSCRIBE/EVENT
	FeatureTokenRefresh uint64 = 1 << 3 // TOKEN_REFRESH before expiry
	// FeatureInline: in HELLO, the daemon can carry the data plane inline
	// on the control socket; in WELCOME, the kernel chose to: no REGIONS
	// follows, and the data-plane frames travel on the socket, stream 1
	// (docs/PROTOCOL.md §8.6).
	FeatureInline uint64 = 1 << 4
	// FeatureInlineOnly, in HELLO only (with FeatureInline): the daemon
	// maps no shared memory (its configuration, or its last attempt
	// failed), so the kernel grants FeatureInline or refuses. Never granted.
	FeatureInlineOnly uint64 = 1 << 5
)

// ---------------------------------------------------------------- REQUEST

// Request is the payload of a REQUEST frame. The frame's Correlation is the
// request id, echoed by the RESPONSE or ERROR.
//
// Decode keeps Method and Body as views into the payload. The body is
// everything after the method, so there are never trailing bytes.
type Request struct {
	Timeout time.Duration // relative deadline; 0 = none; never negative
	Method  []byte        // 1..MaxNameLen bytes, opaque (UTF-8 by convention)
	Body    []byte        // the rest of the payload; may be empty
}

const requestFixed = 10

func (*Request) Type() frame.Type { return frame.TypeRequest }
func (m *Request) Len() int       { return requestFixed + len(m.Method) + len(m.Body) }

func (m *Request) validate() error {
	switch {
	case m.Timeout < 0:
		return invalidField(frame.TypeRequest, "negative timeout %v", m.Timeout)
	case len(m.Method) == 0:
		return invalidField(frame.TypeRequest, "empty method")
	case len(m.Method) > MaxNameLen:
		return tooLong(frame.TypeRequest, "method", len(m.Method), MaxNameLen)
	}
	return nil
}

func (m *Request) Append(b []byte) ([]byte, error) {
	if err := m.validate(); err != nil {
		return b, err
	}
	b = slices.Grow(b, m.Len())
	b = le.AppendUint64(b, uint64(m.Timeout))
	b = le.AppendUint16(b, uint16(len(m.Method)))
	b = append(b, m.Method...)
	return append(b, m.Body...), nil
}

func (m *Request) Decode(p []byte) error {
	d := decoder{b: p, t: frame.TypeRequest}
	timeout := d.u64()
	n := int(d.u16())
	if timeout > math.MaxInt64 {
		d.invalid("timeout %d ns overflows", timeout)
	}
	if n == 0 || n > MaxNameLen {
		d.invalid("method length %d outside [1, %d]", n, MaxNameLen)
	}
	*m = Request{Timeout: time.Duration(timeout), Method: d.bytes(n), Body: d.rest()}
	if d.err != nil {
		*m = Request{}
	}
	return d.err
}

// --------------------------------------------------------------- RESPONSE

// Response is the payload of a RESPONSE frame: the body, all of it. The
// frame's Correlation names the request; FlagEndStream marks the last
// RESPONSE of a streamed reply. Decode keeps Body as a view.
type Response struct {
	Body []byte
}

func (*Response) Type() frame.Type { return frame.TypeResponse }
func (m *Response) Len() int       { return len(m.Body) }

func (m *Response) Append(b []byte) ([]byte, error) { return append(b, m.Body...), nil }

func (m *Response) Decode(p []byte) error {
	*m = Response{Body: nilIfEmpty(p[:len(p):len(p)])}
	return nil
}

// ------------------------------------------------------------------ EVENT

// Event is the payload of an EVENT frame, a publication on a subscription.
// Decode keeps Topic and Body as views; Body is the rest of the payload.
type Event struct {
	SubscriptionID uint64 // from the SUBSCRIBE; never 0
	Timestamp      uint64 // publisher's CLOCK_REALTIME, Unix ns; 0 = unknown
	Topic          []byte // the concrete topic, 1..MaxNameLen bytes
	Body           []byte
}

const eventFixed = 18

func (*Event) Type() frame.Type { return frame.TypeEvent }
func (m *Event) Len() int       { return eventFixed + len(m.Topic) + len(m.Body) }

func (m *Event) validate() error {
	switch {
	case m.SubscriptionID == 0:
		return invalidField(frame.TypeEvent, "subscription id 0")
	case len(m.Topic) == 0:
		return invalidField(frame.TypeEvent, "empty topic")
	case len(m.Topic) > MaxNameLen:
		return tooLong(frame.TypeEvent, "topic", len(m.Topic), MaxNameLen)
	}
	return nil
}

func (m *Event) Append(b []byte) ([]byte, error) {
	if err := m.validate(); err != nil {
		return b, err
	}
	b = slices.Grow(b, m.Len())
	b = le.AppendUint64(b, m.SubscriptionID)
	b = le.AppendUint64(b, m.Timestamp)
	b = le.AppendUint16(b, uint16(len(m.Topic)))
	b = append(b, m.Topic...)
	return append(b, m.Body...), nil
}

func (m *Event) Decode(p []byte) error {
	d := decoder{b: p, t: frame.TypeEvent}
	id, ts := d.u64(), d.u64()
	n := int(d.u16())
	if n == 0 || n > MaxNameLen {
		d.invalid("topic length %d outside [1, %d]", n, MaxNameLen)
	}
	*m = Event{SubscriptionID: id, Timestamp: ts, Topic: d.bytes(n), Body: d.rest()}
	if d.err == nil {
		d.err = m.validate()
	}
	if d.err != nil {
		*m = Event{}
	}
	return d.err
}

// -------------------------------------------------------------- SUBSCRIBE

// SubscribeOptions are the option bits of SUBSCRIBE.
type SubscribeOptions uint32

const (
	// SubLastValue asks for the topic's last event right away.
	SubLastValue SubscribeOptions = 1 << 0

	knownSubscribeOptions = SubLastValue
)

// Subscribe is the payload of a SUBSCRIBE frame. Decode keeps Topic as a
// view. Trailing bytes are rejected.
type Subscribe struct {
	SubscriptionID uint64 // chosen by the subscriber, unique per session, never 0
	Options        SubscribeOptions
	Topic          []byte // topic or pattern, 1..MaxNameLen bytes
}

const subscribeFixed = 14

func (*Subscribe) Type() frame.Type { return frame.TypeSubscribe }
func (m *Subscribe) Len() int       { return subscribeFixed + len(m.Topic) }

func (m *Subscribe) validate() error {
	switch {
	case m.SubscriptionID == 0:
		return invalidField(frame.TypeSubscribe, "subscription id 0")
	case m.Options&^knownSubscribeOptions != 0:
		return invalidField(frame.TypeSubscribe, "unknown options %#x", uint32(m.Options))
	case len(m.Topic) == 0:
		return invalidField(frame.TypeSubscribe, "empty topic")
	case len(m.Topic) > MaxNameLen:
		return tooLong(frame.TypeSubscribe, "topic", len(m.Topic), MaxNameLen)
	}
	return nil
}

func (m *Subscribe) Append(b []byte) ([]byte, error) {
	if err := m.validate(); err != nil {
		return b, err
	}
	b = slices.Grow(b, m.Len())
	b = le.AppendUint64(b, m.SubscriptionID)
	b = le.AppendUint32(b, uint32(m.Options))
	b = le.AppendUint16(b, uint16(len(m.Topic)))
	return append(b, m.Topic...), nil
}

func (m *Subscribe) Decode(p []byte) error {
	d := decoder{b: p, t: frame.TypeSubscribe}
	id, opts := d.u64(), SubscribeOptions(d.u32())
	n := int(d.u16())
	if n == 0 || n > MaxNameLen {
		d.invalid("topic length %d outside [1, %d]", n, MaxNameLen)
	}
	*m = Subscribe{SubscriptionID: id, Options: opts, Topic: d.bytes(n)}
	if d.err == nil {
		d.err = m.validate()
	}
	if d.strict() != nil {
		*m = Subscribe{}
	}
	return d.err
}

// ------------------------------------------------------------ UNSUBSCRIBE

// Unsubscribe is the payload of an UNSUBSCRIBE frame: exactly 8 bytes.
type Unsubscribe struct {
	SubscriptionID uint64 // never 0
}

func (*Unsubscribe) Type() frame.Type { return frame.TypeUnsubscribe }
func (*Unsubscribe) Len() int         { return 8 }

func (m *Unsubscribe) Append(b []byte) ([]byte, error) {
	if m.SubscriptionID == 0 {
		return b, invalidField(frame.TypeUnsubscribe, "subscription id 0")
	}
	return le.AppendUint64(b, m.SubscriptionID), nil
}

func (m *Unsubscribe) Decode(p []byte) error {
	d := decoder{b: p, t: frame.TypeUnsubscribe}
	*m = Unsubscribe{SubscriptionID: d.u64()}
	if d.err == nil && m.SubscriptionID == 0 {
		d.invalid("subscription id 0")
	}
	if d.strict() != nil {
		*m = Unsubscribe{}
	}
	return d.err
}

// ------------------------------------------------------------------ ERROR

// ErrorMsg is the payload of an ERROR frame. The frame's Correlation names
// the failed request (0: the connection as a whole, which the sender then
// closes). Decode keeps Message as a view. Trailing bytes are rejected.
// Unknown codes are accepted (and are Fatal).
type ErrorMsg struct {
	Code         Code   // never CodeOK
	RetryAfterMs uint32 // hint for Transient codes; 0 = none
	Message      []byte // UTF-8 detail, 0..MaxMessageLen bytes
}

const errorFixed = 8

func (*ErrorMsg) Type() frame.Type { return frame.TypeError }
func (m *ErrorMsg) Len() int       { return errorFixed + len(m.Message) }

func (m *ErrorMsg) validate() error {
	switch {
	case m.Code == CodeOK:
		return invalidField(frame.TypeError, "code E_OK")
	case len(m.Message) > MaxMessageLen:
		return tooLong(frame.TypeError, "message", len(m.Message), MaxMessageLen)
	}
	return nil
}

func (m *ErrorMsg) Append(b []byte) ([]byte, error) {
	if err := m.validate(); err != nil {
		return b, err
	}
	b = slices.Grow(b, m.Len())
	b = le.AppendUint16(b, uint16(m.Code))
	b = le.AppendUint16(b, uint16(len(m.Message)))
	b = le.AppendUint32(b, m.RetryAfterMs)
	return append(b, m.Message...), nil
}

func (m *ErrorMsg) Decode(p []byte) error {
	d := decoder{b: p, t: frame.TypeError}
	code := Code(d.u16())
	n := int(d.u16())
	retry := d.u32()
	if n > MaxMessageLen {
		d.invalid("message length %d exceeds %d", n, MaxMessageLen)
	}
	*m = ErrorMsg{Code: code, RetryAfterMs: retry, Message: d.bytes(n)}
	if d.err == nil {
		d.err = m.validate()
	}
	if d.strict() != nil {
		*m = ErrorMsg{}
	}
	return d.err
}

// Err converts the payload to a Go error (copying the message).
func (m *ErrorMsg) Err() *Error {
	return &Error{
		Code:       m.Code,
		Message:    string(m.Message),
		RetryAfter: time.Duration(m.RetryAfterMs) * time.Millisecond,
	}
}

// NewErrorMsg builds the ERROR payload describing err: its code (CodeOf),
// its text truncated to MaxMessageLen, and RetryAfter of an *Error. It
// allocates (error path only).
func NewErrorMsg(err error) ErrorMsg {
	m := ErrorMsg{Code: CodeOf(err)}
	if m.Code == CodeOK {
		m.Code = CodeInternal
	}
	msg := ""
	if e, ok := err.(*Error); ok {
		msg = e.Message
		m.RetryAfterMs = uint32(min(e.RetryAfter/time.Millisecond, math.MaxUint32))
	} else if err != nil {
		msg = err.Error()
	}
	if len(msg) > MaxMessageLen {
		msg = msg[:MaxMessageLen]
	}
	m.Message = nilIfEmpty([]byte(msg))
	return m
}

// -------------------------------------------------------------- HEARTBEAT

// Heartbeat is the payload of a HEARTBEAT frame: exactly 16 bytes. The
// reply (FlagAck) echoes Nonce.
type Heartbeat struct {
	Nonce  uint64
	SentAt uint64 // sender's CLOCK_MONOTONIC ns; informational only
}

func (*Heartbeat) Type() frame.Type { return frame.TypeHeartbeat }
func (*Heartbeat) Len() int         { return 16 }

func (m *Heartbeat) Append(b []byte) ([]byte, error) {
	return le.AppendUint64(le.AppendUint64(b, m.Nonce), m.SentAt), nil
}

func (m *Heartbeat) Decode(p []byte) error {
	d := decoder{b: p, t: frame.TypeHeartbeat}
	*m = Heartbeat{Nonce: d.u64(), SentAt: d.u64()}
	if d.strict() != nil {
		*m = Heartbeat{}
	}
	return d.err
}

// ------------------------------------------------------------------- BULK

// BulkFlags are the flag bits of a BULK descriptor.
type BulkFlags uint8

const (
	// BulkChecksum: Checksum is the CRC32C (Castagnoli) of the span.
	BulkChecksum BulkFlags = 1 << 0

	knownBulkFlags = BulkChecksum
)

// Bulk is the payload of a BULK frame: exactly 40 bytes describing a span
// of a bulk region that holds the payload of an InnerType message too
// large to travel inline. The receiver checks Region, Offset and Length
// against the regions it mapped; this codec checks only what the payload
// alone determines. A BULK frame with FlagAck and the same Lease returns
// the span to its sender.
type Bulk struct {
	InnerType frame.Type // REQUEST, RESPONSE or EVENT
	Flags     BulkFlags
	Region    uint32 // RegionID of a RoleBulk region announced in REGIONS
	Offset    uint64 // byte offset of the span in the region
	Length    uint64 // span length, ≥ 1; Offset+Length does not overflow
	Lease     uint64 // sender's handle for the span, echoed on release
	Checksum  uint32 // CRC32C of the span if BulkChecksum, else 0
}

func (*Bulk) Type() frame.Type { return frame.TypeBulk }
func (*Bulk) Len() int         { return 40 }

func (m *Bulk) validate() error {
	switch {
	case m.InnerType != frame.TypeRequest && m.InnerType != frame.TypeResponse && m.InnerType != frame.TypeEvent:
		return invalidField(frame.TypeBulk, "inner type %v", m.InnerType)
	case m.Flags&^knownBulkFlags != 0:
		return invalidField(frame.TypeBulk, "unknown flags %#x", uint8(m.Flags))
	case m.Length == 0:
		return invalidField(frame.TypeBulk, "empty span")
	case m.Offset+m.Length < m.Offset:
		return invalidField(frame.TypeBulk, "span %d+%d overflows", m.Offset, m.Length)
	case m.Flags&BulkChecksum == 0 && m.Checksum != 0:
		return invalidField(frame.TypeBulk, "checksum %#x without flag", m.Checksum)
	}
	return nil
}

func (m *Bulk) Append(b []byte) ([]byte, error) {
	if err := m.validate(); err != nil {
		return b, err
	}
	b = slices.Grow(b, m.Len())
	b = append(b, byte(m.InnerType), byte(m.Flags), 0, 0)
	b = le.AppendUint32(b, m.Region)
	b = le.AppendUint64(b, m.Offset)
	b = le.AppendUint64(b, m.Length)
	b = le.AppendUint64(b, m.Lease)
	b = le.AppendUint32(b, m.Checksum)
	return le.AppendUint32(b, 0), nil
}

func (m *Bulk) Decode(p []byte) error {
	d := decoder{b: p, t: frame.TypeBulk}
	inner, flags, rsv1 := frame.Type(d.u8()), BulkFlags(d.u8()), d.u16()
	*m = Bulk{InnerType: inner, Flags: flags, Region: d.u32(), Offset: d.u64(), Length: d.u64(), Lease: d.u64(), Checksum: d.u32()}
	rsv2 := d.u32()
	if d.err == nil {
		d.err = m.validate()
	}
	if rsv1 != 0 || rsv2 != 0 {
		d.invalid("reserved bytes not zero")
	}
	if d.strict() != nil {
		*m = Bulk{}
	}
	return d.err
}

// ----------------------------------------------------------------- GOAWAY

// GoAway is the payload of a GOAWAY frame. The sender processes requests
// with correlation ids up to LastCorrelation and no later ones; it closes
// the session once they are answered. Decode keeps Message as a view.
// Trailing bytes are rejected.
type GoAway struct {
	LastCorrelation uint64
	Code            Code   // CodeOK for a normal shutdown
	Message         []byte // 0..MaxMessageLen bytes
}

const goAwayFixed = 12

func (*GoAway) Type() frame.Type { return frame.TypeGoAway }
func (m *GoAway) Len() int       { return goAwayFixed + len(m.Message) }

func (m *GoAway) Append(b []byte) ([]byte, error) {
	if len(m.Message) > MaxMessageLen {
		return b, tooLong(frame.TypeGoAway, "message", len(m.Message), MaxMessageLen)
	}
	b = slices.Grow(b, m.Len())
	b = le.AppendUint64(b, m.LastCorrelation)
	b = le.AppendUint16(b, uint16(m.Code))
	b = le.AppendUint16(b, uint16(len(m.Message)))
	return append(b, m.Message...), nil
}

func (m *GoAway) Decode(p []byte) error {
	d := decoder{b: p, t: frame.TypeGoAway}
	last, code := d.u64(), Code(d.u16())
	n := int(d.u16())
	if n > MaxMessageLen {
		d.invalid("message length %d exceeds %d", n, MaxMessageLen)
	}
	*m = GoAway{LastCorrelation: last, Code: code, Message: d.bytes(n)}
	if d.strict() != nil {
		*m = GoAway{}
	}
	return d.err
}

// ------------------------------------------------------------------ HELLO

// Hello is the payload of a HELLO frame, the daemon's first frame. Zero
// sizes ask for the kernel's default. Decode keeps Name as a view.
//
// HELLO is the one extensible payload: BulkSize, the first field appended
// after Name, is present when 4 or more bytes follow Name; bytes after it
// are ignored, so a later version can append fields a kernel skips.
type Hello struct {
	MinVersion  uint16 // ≥ 1
	MaxVersion  uint16 // ≥ MinVersion
	Features    uint64 // Feature* bits the daemon supports; unknown bits allowed
	TxRingSize  uint32 // daemon→kernel ring bytes: 0 or a power of two in [MinRingSize, MaxRingSize]
	RxRingSize  uint32 // kernel→daemon ring bytes: same rule
	MaxPayload  uint32 // largest inline payload the daemon accepts: 0 (default) .. frame.HardMaxPayload
	MaxInFlight uint32 // requests the daemon may have outstanding; 0 = kernel default
	Name        []byte // daemon name for logs, 0..MaxNameLen bytes
	// BulkSize is the size asked for each side's bulk region, with
	// FeatureBulk: 0 (the kernel's default) or a power of two in
	// [MinBulkSize, MaxBulkSize].
	BulkSize uint32
	// HasBulkSize: the bulk_size field is present. Decode sets it when 4
	// or more bytes follow Name; Append encodes the field when it is set
	// or BulkSize is not 0. A daemon that offers FeatureBulk sets it:
	// a HELLO without the field comes from a daemon that predates bulk
	// regions, which a kernel does not grant BULK (docs/PROTOCOL.md §6.4).
	HasBulkSize bool
}

const helloFixed = 34

func (*Hello) Type() frame.Type { return frame.TypeHello }
func (m *Hello) Len() int {
	if m.bulkField() {
		return helloFixed + len(m.Name) + 4
	}
	return helloFixed + len(m.Name)
}

// bulkField reports whether Append encodes bulk_size.
func (m *Hello) bulkField() bool { return m.BulkSize != 0 || m.HasBulkSize }

// BulkSizeOK reports whether n is a bulk region size: a power of two in
// [MinBulkSize, MaxBulkSize] (0 only if zeroOK: the default).
func BulkSizeOK(n uint64, zeroOK bool) bool {
	if n == 0 {
		return zeroOK
	}
	return n&(n-1) == 0 && n >= MinBulkSize && n <= MaxBulkSize
}

func (m *Hello) validate() error {
	switch {
	case m.MinVersion < MinProtocolVersion || m.MinVersion > m.MaxVersion:
		return invalidField(frame.TypeHello, "version range [%d, %d]", m.MinVersion, m.MaxVersion)
	case !ringSizeOK(m.TxRingSize, true) || !ringSizeOK(m.RxRingSize, true):
		return invalidField(frame.TypeHello, "ring sizes %d/%d", m.TxRingSize, m.RxRingSize)
	case m.MaxPayload > frame.HardMaxPayload:
		return invalidField(frame.TypeHello, "max payload %d", m.MaxPayload)
	case len(m.Name) > MaxNameLen:
		return tooLong(frame.TypeHello, "name", len(m.Name), MaxNameLen)
	case !BulkSizeOK(uint64(m.BulkSize), true):
		return invalidField(frame.TypeHello, "bulk size %d", m.BulkSize)
	}
	return nil
}

func ringSizeOK(n uint32, zeroOK bool) bool {
	if n == 0 {
		return zeroOK
	}
	return bits.OnesCount32(n) == 1 && n >= MinRingSize && n <= MaxRingSize
}

func (m *Hello) Append(b []byte) ([]byte, error) {
	if err := m.validate(); err != nil {
		return b, err
	}
	b = slices.Grow(b, m.Len())
	b = le.AppendUint16(b, m.MinVersion)
	b = le.AppendUint16(b, m.MaxVersion)
	b = le.AppendUint32(b, 0)
	b = le.AppendUint64(b, m.Features)
	b = le.AppendUint32(b, m.TxRingSize)
	b = le.AppendUint32(b, m.RxRingSize)
	b = le.AppendUint32(b, m.MaxPayload)
	b = le.AppendUint32(b, m.MaxInFlight)
	b = le.AppendUint16(b, uint16(len(m.Name)))
	b = append(b, m.Name...)
	if m.bulkField() {
		b = le.AppendUint32(b, m.BulkSize)
	}
	return b, nil
}

func (m *Hello) Decode(p []byte) error {
	d := decoder{b: p, t: frame.TypeHello}
	minV, maxV, rsv := d.u16(), d.u16(), d.u32()
	*m = Hello{MinVersion: minV, MaxVersion: maxV, Features: d.u64(),
		TxRingSize: d.u32(), RxRingSize: d.u32(), MaxPayload: d.u32(), MaxInFlight: d.u32()}
	n := int(d.u16())
	if n > MaxNameLen {
		d.invalid("name length %d exceeds %d", n, MaxNameLen)
	}
	m.Name = d.bytes(n)
	if d.err == nil && len(d.b)-d.off >= 4 {
		m.BulkSize, m.HasBulkSize = d.u32(), true
	}
	if rsv != 0 {
		d.invalid("reserved bytes not zero")
	}
	if d.err == nil {
		d.err = m.validate()
	}
	// Extension rule: bytes after BulkSize (or fewer than 4 after Name)
	// are ignored.
	if d.err != nil {
		*m = Hello{}
	}
	return d.err
}

// ---------------------------------------------------------------- WELCOME

// Welcome is the payload of a WELCOME (HELLO_ACK) frame, the kernel's
// answer to HELLO: exactly 40 bytes of granted, concrete parameters.
type Welcome struct {
	Version             uint16 // chosen from the HELLO range, ≥ 1
	HeartbeatMisses     uint16 // missed heartbeats before the peer is dead, ≥ 1
	HeartbeatIntervalMs uint32 // ≥ 1
	Features            uint64 // subset of the HELLO's Features
	SessionID           uint64 // never 0
	TxRingSize          uint32 // granted daemon→kernel ring bytes (power of two)
	RxRingSize          uint32 // granted kernel→daemon ring bytes (power of two)
	MaxPayload          uint32 // inline payload limit, both directions: 1..frame.HardMaxPayload
	MaxInFlight         uint32 // ≥ 1
}

func (*Welcome) Type() frame.Type { return frame.TypeWelcome }
func (*Welcome) Len() int         { return 40 }

// HeartbeatInterval returns HeartbeatIntervalMs as a Duration.
func (m *Welcome) HeartbeatInterval() time.Duration {
	return time.Duration(m.HeartbeatIntervalMs) * time.Millisecond
}

func (m *Welcome) validate() error {
	switch {
	case m.Version < MinProtocolVersion:
		return invalidField(frame.TypeWelcome, "version %d", m.Version)
	case m.HeartbeatMisses == 0 || m.HeartbeatIntervalMs == 0:
		return invalidField(frame.TypeWelcome, "heartbeat %d ms × %d", m.HeartbeatIntervalMs, m.HeartbeatMisses)
	case m.SessionID == 0:
		return invalidField(frame.TypeWelcome, "session id 0")
	case !ringSizeOK(m.TxRingSize, false) || !ringSizeOK(m.RxRingSize, false):
		return invalidField(frame.TypeWelcome, "ring sizes %d/%d", m.TxRingSize, m.RxRingSize)
	case m.MaxPayload == 0 || m.MaxPayload > frame.HardMaxPayload:
		return invalidField(frame.TypeWelcome, "max payload %d", m.MaxPayload)
	case m.MaxInFlight == 0:
		return invalidField(frame.TypeWelcome, "max in flight 0")
	}
	return nil
}

func (m *Welcome) Append(b []byte) ([]byte, error) {
	if err := m.validate(); err != nil {
		return b, err
	}
	b = slices.Grow(b, m.Len())
	b = le.AppendUint16(b, m.Version)
	b = le.AppendUint16(b, m.HeartbeatMisses)
	b = le.AppendUint32(b, m.HeartbeatIntervalMs)
	b = le.AppendUint64(b, m.Features)
	b = le.AppendUint64(b, m.SessionID)
	b = le.AppendUint32(b, m.TxRingSize)
	b = le.AppendUint32(b, m.RxRingSize)
	b = le.AppendUint32(b, m.MaxPayload)
	return le.AppendUint32(b, m.MaxInFlight), nil
}

func (m *Welcome) Decode(p []byte) error {
	d := decoder{b: p, t: frame.TypeWelcome}
	*m = Welcome{Version: d.u16(), HeartbeatMisses: d.u16(), HeartbeatIntervalMs: d.u32(),
		Features: d.u64(), SessionID: d.u64(), TxRingSize: d.u32(), RxRingSize: d.u32(),
		MaxPayload: d.u32(), MaxInFlight: d.u32()}
	if d.err == nil {
		d.err = m.validate()
	}
	if d.strict() != nil {
		*m = Welcome{}
	}
	return d.err
}

// ------------------------------------------------------------------ TOKEN

// Token is the payload of a TOKEN frame. TokenID is the capability
// reference to put in the CapRef of every later frame header; Token is the
// opaque token (format: section 6 of docs/PROTOCOL.md), kept as a view by
// Decode. Trailing bytes are rejected.
type Token struct {
	TokenID    uint64 // never 0
	ExpiryUnix int64  // expiry, Unix ns (CLOCK_REALTIME); > 0
	Token      []byte // 1..MaxTokenLen bytes
}

const tokenFixed = 18

func (*Token) Type() frame.Type { return frame.TypeToken }
func (m *Token) Len() int       { return tokenFixed + len(m.Token) }

// Expiry returns ExpiryUnix as a time.Time.
func (m *Token) Expiry() time.Time { return time.Unix(0, m.ExpiryUnix) }

func (m *Token) validate() error {
	switch {
	case m.TokenID == 0:
		return invalidField(frame.TypeToken, "token id 0")
	case m.ExpiryUnix <= 0:
		return invalidField(frame.TypeToken, "expiry %d", m.ExpiryUnix)
	case len(m.Token) == 0:
		return invalidField(frame.TypeToken, "empty token")
	case len(m.Token) > MaxTokenLen:
		return tooLong(frame.TypeToken, "token", len(m.Token), MaxTokenLen)
	}
	return nil
}

func (m *Token) Append(b []byte) ([]byte, error) {
	if err := m.validate(); err != nil {
		return b, err
	}
	b = slices.Grow(b, m.Len())
	b = le.AppendUint64(b, m.TokenID)
	b = le.AppendUint64(b, uint64(m.ExpiryUnix))
	b = le.AppendUint16(b, uint16(len(m.Token)))
	return append(b, m.Token...), nil
}

func (m *Token) Decode(p []byte) error {
	d := decoder{b: p, t: frame.TypeToken}
	id, exp := d.u64(), int64(d.u64())
	n := int(d.u16())
	if n == 0 || n > MaxTokenLen {
		d.invalid("token length %d outside [1, %d]", n, MaxTokenLen)
	}
	*m = Token{TokenID: id, ExpiryUnix: exp, Token: d.bytes(n)}
	if d.err == nil {
		d.err = m.validate()
	}
	if d.strict() != nil {
		*m = Token{}
	}
	return d.err
}

// ---------------------------------------------------------- TOKEN_REFRESH

// TokenRefresh is the payload of a TOKEN_REFRESH frame: exactly 16 bytes.
// The kernel answers with a TOKEN (or an ERROR E_AUTH) carrying the same
// Correlation.
type TokenRefresh struct {
	TokenID        uint64 // the token being refreshed; never 0
	RequestedTTLMs uint32 // 0 = kernel default
}

func (*TokenRefresh) Type() frame.Type { return frame.TypeTokenRefresh }
func (*TokenRefresh) Len() int         { return 16 }

func (m *TokenRefresh) Append(b []byte) ([]byte, error) {
	if m.TokenID == 0 {
		return b, invalidField(frame.TypeTokenRefresh, "token id 0")
	}
	b = le.AppendUint64(b, m.TokenID)
	b = le.AppendUint32(b, m.RequestedTTLMs)
	return le.AppendUint32(b, 0), nil
}

func (m *TokenRefresh) Decode(p []byte) error {
	d := decoder{b: p, t: frame.TypeTokenRefresh}
	*m = TokenRefresh{TokenID: d.u64(), RequestedTTLMs: d.u32()}
	rsv := d.u32()
	if d.err == nil && m.TokenID == 0 {
		d.invalid("token id 0")
	}
	if rsv != 0 {
		d.invalid("reserved bytes not zero")
	}
	if d.strict() != nil {
		*m = TokenRefresh{}
	}
	return d.err
}

// ---------------------------------------------------------------- REGIONS

// RegionRole says what a shared-memory region is for.
type RegionRole uint8

const (
	RoleControl RegionRole = 1 // control block: ring indices, doorbells
	RoleRingTx  RegionRole = 2 // daemon→kernel ring
	RoleRingRx  RegionRole = 3 // kernel→daemon ring
	RoleBulk    RegionRole = 4 // bulk memory for BULK descriptors
)

func (r RegionRole) String() string {
	switch r {
	case RoleControl:
		return "CONTROL"
	case RoleRingTx:
		return "RING_TX"
	case RoleRingRx:
		return "RING_RX"
	case RoleBulk:
		return "BULK"
	}
	return fmt.Sprintf("RegionRole(%d)", uint8(r))
}

// RegionFlags are the flag bits of a REGIONS entry.
type RegionFlags uint8

const (
	// RegionReadOnly: the receiver maps the region read-only (the memfd
	// is sealed against writes by the receiver's side).
	RegionReadOnly RegionFlags = 1 << 0

	knownRegionFlags = RegionReadOnly
)

// Region is one entry of REGIONS.
type Region struct {
	Role  RegionRole
	Flags RegionFlags
	ID    uint32 // unique within the session; BULK descriptors name it
	Size  uint64 // bytes to map: > 0, a multiple of PageSize
}

// Regions is the payload of a REGIONS frame. Entry i describes the i-th
// file descriptor passed with SCM_RIGHTS in the same sendmsg call, so the
// count of entries equals the count of descriptors. Trailing bytes are
// rejected.
//
// Decode reuses the capacity of Entries (allocating only when it is below
// the entry count, at most MaxRegions): keep one Regions value around to
// decode without allocating.
type Regions struct {
	Entries []Region // 1..MaxRegions entries with distinct IDs
}

const (
	regionsFixed = 8
	regionSize   = 16
)

func (*Regions) Type() frame.Type { return frame.TypeRegions }
func (m *Regions) Len() int       { return regionsFixed + regionSize*len(m.Entries) }

func (m *Regions) validate() error {
	if len(m.Entries) == 0 || len(m.Entries) > MaxRegions {
		return invalidField(frame.TypeRegions, "%d entries, want 1..%d", len(m.Entries), MaxRegions)
	}
	for i, r := range m.Entries {
		switch {
		case r.Role < RoleControl || r.Role > RoleBulk:
			return invalidField(frame.TypeRegions, "entry %d: role %v", i, r.Role)
		case r.Flags&^knownRegionFlags != 0:
			return invalidField(frame.TypeRegions, "entry %d: flags %#x", i, uint8(r.Flags))
		case r.Size == 0 || r.Size%PageSize != 0:
			return invalidField(frame.TypeRegions, "entry %d: size %d", i, r.Size)
		}
		for _, q := range m.Entries[:i] {
			if q.ID == r.ID {
				return invalidField(frame.TypeRegions, "entry %d: duplicate id %d", i, r.ID)
			}
		}
	}
	return nil
}

func (m *Regions) Append(b []byte) ([]byte, error) {
	if err := m.validate(); err != nil {
		return b, err
	}
	b = slices.Grow(b, m.Len())
	b = le.AppendUint16(b, uint16(len(m.Entries)))
	b = append(b, 0, 0, 0, 0, 0, 0)
	for _, r := range m.Entries {
		b = append(b, byte(r.Role), byte(r.Flags), 0, 0)
		b = le.AppendUint32(b, r.ID)
		b = le.AppendUint64(b, r.Size)
	}
	return b, nil
}

func (m *Regions) Decode(p []byte) error {
	d := decoder{b: p, t: frame.TypeRegions}
	n := int(d.u16())
	rsv := uint64(d.u16()) | uint64(d.u32())
	m.Entries = m.Entries[:0]
	if n == 0 || n > MaxRegions {
		d.invalid("%d entries, want 1..%d", n, MaxRegions)
	}
	if d.err == nil && len(p)-d.off != n*regionSize {
		d.err = fmt.Errorf("%v: %d entries need %d bytes, have %d: %w", d.t, n, n*regionSize, len(p)-d.off, ErrTruncated)
		if len(p)-d.off > n*regionSize {
			d.err = fmt.Errorf("%v: %d bytes after %d entries: %w", d.t, len(p)-d.off-n*regionSize, n, ErrTrailing)
		}
	}
	if d.err == nil {
		m.Entries = slices.Grow(m.Entries, n)
		for range n {
			role, flags, r := RegionRole(d.u8()), RegionFlags(d.u8()), d.u16()
			rsv |= uint64(r)
			m.Entries = append(m.Entries, Region{Role: role, Flags: flags, ID: d.u32(), Size: d.u64()})
		}
	}
	if rsv != 0 {
		d.invalid("reserved bytes not zero")
	}
	if d.err == nil {
		d.err = m.validate()
	}
	if d.strict() != nil {
		m.Entries = m.Entries[:0]
	}
	return d.err
}
