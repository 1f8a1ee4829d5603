package frame

import (
	"strconv"
	"strings"
)

// Type is the frame type, header byte 5. It says how the payload is encoded.
type Type uint8

// Frame types of protocol version 1. Data-plane types are 0x01..0x1f,
// control-plane types 0x20..0x3f. Zero is never valid.
const (
	TypeRequest      Type = 0x01 // call a method; Correlation is the request id
	TypeResponse     Type = 0x02 // result of a REQUEST; echoes its Correlation
	TypeEvent        Type = 0x03 // publication on a subscription
	TypeSubscribe    Type = 0x04 // start a subscription to a topic
	TypeUnsubscribe  Type = 0x05 // end a subscription
	TypeError        Type = 0x06 // failure of a REQUEST, or of the connection
	TypeHeartbeat    Type = 0x07 // liveness ping; FlagAck marks the pong
	TypeBulk         Type = 0x08 // descriptor of a payload held in bulk memory
	TypeGoAway       Type = 0x09 // sender accepts no new requests
	TypeHello        Type = 0x20 // daemon→kernel: versions, features, sizes
	TypeWelcome      Type = 0x21 // kernel→daemon: chosen parameters, session
	TypeToken        Type = 0x22 // kernel→daemon: capability token + expiry
	TypeTokenRefresh Type = 0x23 // daemon→kernel: ask for a fresh token
	TypeRegions      Type = 0x24 // announces memfds passed with SCM_RIGHTS
)

// TypeHelloAck is another name of TypeWelcome (HELLO_ACK in design notes).
const TypeHelloAck = TypeWelcome

var typeNames = [...]string{
	TypeRequest:      "REQUEST",
	TypeResponse:     "RESPONSE",
	TypeEvent:        "EVENT",
	TypeSubscribe:    "SUBSCRIBE",
	TypeUnsubscribe:  "UNSUBSCRIBE",
	TypeError:        "ERROR",
	TypeHeartbeat:    "HEARTBEAT",
	TypeBulk:         "BULK",
	TypeGoAway:       "GOAWAY",
	TypeHello:        "HELLO",
	TypeWelcome:      "WELCOME",
	TypeToken:        "TOKEN",
	TypeTokenRefresh: "TOKEN_REFRESH",
	TypeRegions:      "REGIONS",
}

// typeFlags is allowedFlags indexed by any type byte: zero for a type that
// is not defined, which lets the decoder check type and flags with one load.
var typeFlags = func() (t [256]Flags) {
	copy(t[:], allowedFlags[:])
	return t
}()

// allowedFlags[t] is the set of flags a frame of type t may carry.
var allowedFlags = [len(typeNames)]Flags{
	TypeRequest:      FlagChecksum | FlagEndStream,
	TypeResponse:     FlagChecksum | FlagEndStream,
	TypeEvent:        FlagChecksum | FlagEndStream,
	TypeSubscribe:    FlagChecksum,
	TypeUnsubscribe:  FlagChecksum,
	TypeError:        FlagChecksum | FlagEndStream,
	TypeHeartbeat:    FlagChecksum | FlagAck,
	TypeBulk:         FlagChecksum | FlagEndStream | FlagAck,
	TypeGoAway:       FlagChecksum,
	TypeHello:        FlagChecksum,
	TypeWelcome:      FlagChecksum,
	TypeToken:        FlagChecksum,
	TypeTokenRefresh: FlagChecksum,
	TypeRegions:      FlagChecksum,
}

// Types returns every type defined by protocol version 1, in wire order.
func Types() []Type {
	var ts []Type
	for t, name := range typeNames {
		if name != "" {
			ts = append(ts, Type(t))
		}
	}
	return ts
}

// Valid reports whether t is defined by protocol version 1.
func (t Type) Valid() bool {
	return int(t) < len(typeNames) && typeNames[t] != ""
}

// AllowedFlags returns the flags a frame of type t may carry (0 for an
// unknown type).
func (t Type) AllowedFlags() Flags {
	if int(t) < len(allowedFlags) {
		return allowedFlags[t]
	}
	return 0
}

// String returns the protocol name ("REQUEST") or "Type(0x7f)" for an
// unknown value.
func (t Type) String() string {
	if t.Valid() {
		return typeNames[t]
	}
	return "Type(0x" + hex(uint64(t), 2) + ")"
}

// Flags is the header flag word, bytes 6..7.
type Flags uint16

// Flag bits of protocol version 1. Which bits a type accepts is given by
// [Type.AllowedFlags]; any other bit is rejected with ErrBadFlags.
const (
	// FlagChecksum: the header's CRC32C field covers the whole frame.
	FlagChecksum Flags = 1 << 0
	// FlagEndStream: the last frame the sender sends for this
	// correlation id (REQUEST, RESPONSE, EVENT, ERROR, BULK).
	FlagEndStream Flags = 1 << 1
	// FlagAck: acknowledgement: the pong of a HEARTBEAT, or the release
	// of a BULK span.
	FlagAck Flags = 1 << 2

	// KnownFlags is the union of every flag defined by version 1.
	KnownFlags = FlagChecksum | FlagEndStream | FlagAck
)

var flagNames = [...]string{"CHECKSUM", "END_STREAM", "ACK"}

// Has reports whether every bit of g is set in f.
func (f Flags) Has(g Flags) bool { return f&g == g }

// String returns the set bits joined by "|" ("CHECKSUM|END_STREAM"), unknown
// bits as a hex remainder ("ACK|0x8000"), and "0" for no flags.
func (f Flags) String() string {
	if f == 0 {
		return "0"
	}
	var sb strings.Builder
	for i, name := range flagNames {
		if f&(1<<i) != 0 {
			if sb.Len() > 0 {
				sb.WriteByte('|')
			}
			sb.WriteString(name)
		}
	}
	if rest := f &^ KnownFlags; rest != 0 {
		if sb.Len() > 0 {
			sb.WriteByte('|')
		}
		sb.WriteString("0x" + hex(uint64(rest), 4))
	}
	return sb.String()
}

func hex(v uint64, width int) string {
	s := strconv.FormatUint(v, 16)
	for len(s) < width {
		s = "0" + s
	}
	return s
}
