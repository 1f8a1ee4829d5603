package control

import (
	"cmp"
	"fmt"
	"time"

	"github.com/sypas/sypas/control/token"
	"github.com/sypas/sypas/frame"
	"github.com/sypas/sypas/ring"
	"github.com/sypas/sypas/sypas"
)

// Defaults of SessionConfig, DialConfig and ServerConfig zero values.
const (
	DefaultHandshakeTimeout  = 5 * time.Second
	DefaultHeartbeatInterval = time.Second
	DefaultHeartbeatMisses   = 3
	DefaultDrainTimeout      = 5 * time.Second
	DefaultRingSize          = 256 << 10 // per direction
	DefaultMaxRingSize       = 16 << 20
	DefaultMaxInFlight       = 128
	DefaultTokenTTL          = time.Hour
	DefaultFeatures          = sypas.FeatureTokenRefresh

	// controlMaxPayload bounds a frame on the control socket: the largest
	// control payload is a TOKEN (18 + 2048 bytes) or a HELLO with its name
	// and some extension. Anything larger fails before allocation.
	controlMaxPayload = 8 << 10
)

// SessionConfig holds what both ends of a session configure. The zero value
// is the documented defaults.
type SessionConfig struct {
	// HandshakeTimeout bounds the whole handshake, from connect (or accept)
	// to TOKEN. Zero means DefaultHandshakeTimeout.
	HandshakeTimeout time.Duration
	// HeartbeatInterval and HeartbeatMisses: a side sends a HEARTBEAT every
	// interval and declares the peer gone after interval×misses without a
	// frame from it. The kernel's values are announced in WELCOME and bind
	// both sides; a daemon's are ignored. Zero means 1 s and 3.
	HeartbeatInterval time.Duration
	HeartbeatMisses   int
	// DrainTimeout bounds Shutdown's wait for the peer's GOAWAY, and how long
	// a session that received GOAWAY waits for its owner to call Shutdown.
	// Zero means DefaultDrainTimeout.
	DrainTimeout time.Duration
	// Features offered (daemon) or supported (kernel). Zero means
	// DefaultFeatures. RequireFeatures must all be granted, or the
	// handshake fails with E_PROTO. sypas.FeatureChecksum is reserved and
	// refused: it is never granted.
	Features, RequireFeatures uint64
	// TxRingSize and RxRingSize are the data-area sizes of the daemon→kernel
	// and kernel→daemon rings: what a daemon asks for, or a kernel's default.
	// Zero means DefaultRingSize (kernel) or "the kernel's default" (daemon).
	TxRingSize, RxRingSize uint32
	// MaxRingSize caps what the kernel grants. Zero means DefaultMaxRingSize.
	MaxRingSize uint32
	// MaxPayload is the inline payload limit; zero means
	// frame.DefaultMaxPayload. It is clamped so a frame fits in a ring record.
	MaxPayload uint32
	// MaxInFlight: zero means DefaultMaxInFlight (kernel) or the kernel's
	// default (daemon).
	MaxInFlight uint32
	// Name is the daemon's name for the kernel's logs.
	Name string
	// Ring configures the ring ends the session attaches.
	Ring ring.Config
}

func (c SessionConfig) withDefaults() SessionConfig {
	set := func(v *time.Duration, d time.Duration) {
		if *v <= 0 {
			*v = d
		}
	}
	set(&c.HandshakeTimeout, DefaultHandshakeTimeout)
	set(&c.HeartbeatInterval, DefaultHeartbeatInterval)
	set(&c.DrainTimeout, DefaultDrainTimeout)
	if c.HeartbeatMisses <= 0 {
		c.HeartbeatMisses = DefaultHeartbeatMisses
	}
	c.Features = cmp.Or(c.Features, DefaultFeatures)
	c.MaxRingSize = cmp.Or(c.MaxRingSize, DefaultMaxRingSize)
	c.MaxPayload = cmp.Or(c.MaxPayload, frame.DefaultMaxPayload)
	return c
}

func (c SessionConfig) validate() error {
	ringOK := func(n uint32) bool {
		return n == 0 || (n&(n-1) == 0 && n >= sypas.MinRingSize && n <= sypas.MaxRingSize)
	}
	switch {
	case !ringOK(c.TxRingSize) || !ringOK(c.RxRingSize) || !ringOK(c.MaxRingSize):
		return fmt.Errorf("control: ring sizes %d/%d/%d: want 0 or a power of two in [%d, %d]",
			c.TxRingSize, c.RxRingSize, c.MaxRingSize, sypas.MinRingSize, sypas.MaxRingSize)
	case c.MaxRingSize != 0 && (c.TxRingSize > c.MaxRingSize || c.RxRingSize > c.MaxRingSize):
		return fmt.Errorf("control: ring sizes %d/%d above MaxRingSize %d", c.TxRingSize, c.RxRingSize, c.MaxRingSize)
	case c.MaxPayload > frame.HardMaxPayload:
		return fmt.Errorf("control: max payload %d above %d", c.MaxPayload, frame.HardMaxPayload)
	case c.HeartbeatMisses > 0xFFFF || c.HeartbeatInterval > maxHeartbeatMs*time.Millisecond:
		return fmt.Errorf("control: heartbeat %v × %d out of range", c.HeartbeatInterval, c.HeartbeatMisses)
	case len(c.Name) > sypas.MaxNameLen:
		return fmt.Errorf("control: name of %d bytes, at most %d", len(c.Name), sypas.MaxNameLen)
	case (c.Features|c.RequireFeatures)&sypas.FeatureChecksum != 0:
		return fmt.Errorf("control: feature bit 0 (CHECKSUM) is reserved: never offered or granted")
	case c.RequireFeatures&^c.Features != 0:
		return fmt.Errorf("control: required features %#x not all offered (%#x)", c.RequireFeatures, c.Features)
	}
	return nil
}

// DialConfig configures the daemon side. The zero value is the defaults.
type DialConfig struct {
	SessionConfig
	// ServerUIDs are the uids the kernel may run as (CheckServer). Empty
	// means root and the daemon's own effective uid.
	ServerUIDs []uint32
	// Backoff paces Client's reconnects. The zero value is gRPC's.
	Backoff Backoff
	// MaxHeartbeatTimeout caps the silence the kernel may impose through
	// WELCOME (heartbeat interval × misses, which is also the write
	// timeout): a WELCOME above it is refused with E_PROTO, so a hostile
	// kernel cannot make a daemon wait hours to notice it is gone. Zero
	// means DefaultMaxHeartbeatTimeout.
	MaxHeartbeatTimeout time.Duration
}

// DefaultMaxHeartbeatTimeout is DialConfig.MaxHeartbeatTimeout's default:
// twenty times the default 1 s × 3.
const DefaultMaxHeartbeatTimeout = time.Minute

// ServerConfig configures the kernel side. Keys is required.
type ServerConfig struct {
	SessionConfig
	// Keys signs the session tokens.
	Keys *token.Keyring
	// TokenTTL is a token's lifetime. Zero means DefaultTokenTTL.
	TokenTTL time.Duration
	// Rights and Scope are granted to every session's token. Zero rights
	// means request, subscribe and publish.
	Rights token.Rights
	Scope  string
	// Revoked, if set, is consulted by every session: Session.Capability's
	// Allows refuses a revoked token at once, and TOKEN_REFRESH of a revoked
	// token ends the session with E_AUTH instead of renewing it. Nil means
	// nothing is ever revoked.
	Revoked *token.Revocations
	// Clock is the time tokens are minted and checked against (expiry at
	// refresh). Nil means time.Now. Session timers still run on real time.
	Clock func() time.Time
}
