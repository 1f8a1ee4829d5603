package control

import (
	"cmp"
	"crypto/tls"
	"fmt"
	"log/slog"
	"math"
	"time"

	"github.com/sypas/go/control/token"
	"github.com/sypas/go/frame"
	"github.com/sypas/go/ring"
	"github.com/sypas/go/wire"
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
	DefaultFeatures          = wire.FeatureTokenRefresh
	// DefaultBulkSize is the bulk region a kernel grants when the daemon
	// asks for its default: room for a few large payloads in flight on a
	// small machine (bulk.DefaultSize).
	DefaultBulkSize = 64 << 20

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
	// handshake fails with E_PROTO. wire.FeatureChecksum is reserved and
	// refused: it is never granted.
	Features, RequireFeatures uint64
	// TxRingSize and RxRingSize are the data-area sizes of the daemon→kernel
	// and kernel→daemon rings: what a daemon asks for, or a kernel's default.
	// Zero means DefaultRingSize (kernel) or "the kernel's default" (daemon).
	TxRingSize, RxRingSize uint32
	// MaxRingSize caps what the kernel grants. Zero means DefaultMaxRingSize.
	MaxRingSize uint32
	// BulkSize is the size of each side's bulk region when
	// wire.FeatureBulk is granted (docs/PROTOCOL.md §6.4): what a daemon
	// asks for (zero: the kernel's default), or a kernel's default (zero:
	// DefaultBulkSize). A power of two in [wire.MinBulkSize,
	// wire.MaxBulkSize]. Its pages cost memory only once written.
	BulkSize uint32
	// MaxBulkSize caps the bulk region size a kernel grants or a daemon
	// accepts. Zero means wire.MaxBulkSize (1 GiB).
	MaxBulkSize uint32
	// MaxPayload is the inline payload limit; zero means
	// frame.DefaultMaxPayload. It is clamped so a frame fits in a ring record.
	MaxPayload uint32
	// MaxInFlight: zero means DefaultMaxInFlight (kernel) or the kernel's
	// default (daemon).
	MaxInFlight uint32
	// NoSharedMemory turns the rings off: the data plane travels inline on
	// the control socket (docs/PROTOCOL.md §8.6), whatever the peer
	// prefers. A daemon asks for it in HELLO; a kernel grants it to every
	// daemon that offers wire.FeatureInline and refuses the others. It
	// implies wire.FeatureInline in Features. Without it, a session is
	// inline only when the other side asks, or when the rings cannot be
	// set up (a kernel whose memfd_create or mmap fails grants inline to
	// a daemon that offers it; a daemon that cannot map the kernel's
	// rings dials again asking for inline, if it offers it).
	NoSharedMemory bool
	// Name is the daemon's name for the kernel's logs.
	Name string
	// Logger receives the audit records of this side's refusals (keys and
	// events: LogKey*, Event*; docs/SECURITY.md §10), one per refusal, at
	// Warn level (Error for an internal failure). Nil means slog.Default(),
	// so refusals are visible out of the box; use
	// slog.New(slog.DiscardHandler) to drop them.
	Logger *slog.Logger
	// Ring configures the ring ends the session attaches. Its Idle is
	// also how an inline session's reader polls a Unix socket before it
	// sleeps in ppoll(2).
	Ring ring.Config
}

// withDefaults replaces zero fields by their defaults. Negative values are
// left for validate to refuse: a typo must not silently become a default.
func (c SessionConfig) withDefaults() SessionConfig {
	c.HandshakeTimeout = cmp.Or(c.HandshakeTimeout, DefaultHandshakeTimeout)
	c.HeartbeatInterval = cmp.Or(c.HeartbeatInterval, DefaultHeartbeatInterval)
	c.DrainTimeout = cmp.Or(c.DrainTimeout, DefaultDrainTimeout)
	c.HeartbeatMisses = cmp.Or(c.HeartbeatMisses, DefaultHeartbeatMisses)
	c.Features = cmp.Or(c.Features, DefaultFeatures)
	c.MaxRingSize = cmp.Or(c.MaxRingSize, DefaultMaxRingSize)
	c.MaxBulkSize = cmp.Or(c.MaxBulkSize, wire.MaxBulkSize)
	c.MaxPayload = cmp.Or(c.MaxPayload, frame.DefaultMaxPayload)
	return c
}

// configErr reports an invalid configuration field. Every configuration
// error wraps ErrConfig and names the field, e.g.
// "ServerConfig.HeartbeatInterval".
func configErr(field, format string, args ...any) error {
	return fmt.Errorf("%w: %s %s", ErrConfig, field, fmt.Sprintf(format, args...))
}

// numField is a named configuration number, for checks over several.
type numField struct {
	name string
	v    int64
}

// negative refuses the first negative field: zero means the default, and a
// negative value is a mistake, never silently the default.
func negative(prefix string, fs ...numField) error {
	for _, f := range fs {
		if f.v < 0 {
			return configErr(prefix+f.name, "%d is negative", f.v)
		}
	}
	return nil
}

func durField(name string, d time.Duration) numField { return numField{name, int64(d)} }

// validate checks c as a field of owner ("ServerConfig", "DialConfig").
func (c SessionConfig) validate(owner string) error {
	field := func(name string) string { return owner + "." + name }
	if err := negative(owner+".", durField("HandshakeTimeout", c.HandshakeTimeout),
		durField("HeartbeatInterval", c.HeartbeatInterval), durField("DrainTimeout", c.DrainTimeout)); err != nil {
		return err
	}
	for _, r := range []struct {
		name string
		v    uint32
	}{{"MaxBulkSize", c.MaxBulkSize}, {"BulkSize", c.BulkSize}} {
		if !wire.BulkSizeOK(uint64(r.v), true) {
			return configErr(field(r.name), "%d: want 0 or a power of two in [%d, %d]", r.v, wire.MinBulkSize, wire.MaxBulkSize)
		}
	}
	if c.MaxBulkSize != 0 && c.BulkSize > c.MaxBulkSize {
		return configErr(field("BulkSize"), "%d above MaxBulkSize %d", c.BulkSize, c.MaxBulkSize)
	}
	for _, r := range []struct {
		name string
		v    uint32
	}{{"MaxRingSize", c.MaxRingSize}, {"TxRingSize", c.TxRingSize}, {"RxRingSize", c.RxRingSize}} { // MaxRingSize first: NewServer derives default ring sizes from it
		if r.v != 0 && (r.v&(r.v-1) != 0 || r.v < wire.MinRingSize || r.v > wire.MaxRingSize) {
			return configErr(field(r.name), "%d: want 0 or a power of two in [%d, %d]", r.v, wire.MinRingSize, wire.MaxRingSize)
		}
		if r.name != "MaxRingSize" && c.MaxRingSize != 0 && r.v > c.MaxRingSize {
			return configErr(field(r.name), "%d above MaxRingSize %d", r.v, c.MaxRingSize)
		}
	}
	switch {
	case c.HeartbeatMisses < 0 || c.HeartbeatMisses > 0xFFFF:
		return configErr(field("HeartbeatMisses"), "%d: want 0 (the default) to %d", c.HeartbeatMisses, 0xFFFF)
	case c.HeartbeatInterval > maxHeartbeatMs*time.Millisecond:
		return configErr(field("HeartbeatInterval"), "%v above %v", c.HeartbeatInterval, maxHeartbeatMs*time.Millisecond)
	case c.MaxPayload > frame.HardMaxPayload:
		return configErr(field("MaxPayload"), "%d above %d", c.MaxPayload, frame.HardMaxPayload)
	case len(c.Name) > wire.MaxNameLen:
		return configErr(field("Name"), "of %d bytes, at most %d", len(c.Name), wire.MaxNameLen)
	case (c.Features|c.RequireFeatures)&wire.FeatureChecksum != 0:
		return configErr(field("Features"), "has bit 0 (CHECKSUM), which is reserved: never offered or granted")
	case c.RequireFeatures&^c.Features != 0:
		return configErr(field("RequireFeatures"), "%#x not all in Features %#x", c.RequireFeatures, c.Features)
	}
	if err := c.Ring.Idle.Validate(); err != nil {
		// Else every handshake fails attaching a ring end, and a daemon
		// blames the kernel's memfds.
		return configErr(field("Ring.Idle"), "%v", err)
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
	// TLS configures tcp:// addresses: the kernel's CAs (RootCAs) and this
	// daemon's client certificate (Certificates or GetClientCertificate),
	// which the kernel's Policy must admit. It is cloned; TLS 1.3 is
	// required, and ServerName defaults to the address's host.
	TLS *tls.Config
	// InsecurePlaintextLoopback lets a tcp:// address with no TLS connect
	// in plaintext, to a loopback address only (benchmarks, tests).
	InsecurePlaintextLoopback bool
	// Fallbacks are addresses Dial tries in order when the one before
	// cannot be reached (nothing listens, the transport is not built in):
	// a preference order, e.g. the Unix socket, then tcp://, then grpc://.
	// A kernel that answers and refuses is not passed over. A Client on a
	// fallback stays on it until that session ends; its next dial starts
	// again from the first address.
	Fallbacks []string

	inlineWhy string // Dial's second attempt: why it asks for inline
}

// check validates c as Dial will use it (its zero fields replaced by the
// defaults); c itself is not changed.
func (c DialConfig) check() error {
	c.SessionConfig = c.SessionConfig.withDefaults()
	if err := c.SessionConfig.validate("DialConfig"); err != nil {
		return err
	}
	if err := negative("DialConfig.", durField("MaxHeartbeatTimeout", c.MaxHeartbeatTimeout),
		durField("Backoff.Base", c.Backoff.Base), durField("Backoff.Max", c.Backoff.Max)); err != nil {
		return err
	}
	// Either would make Delay zero or negative: a Client redialing a dying
	// kernel in a tight loop.
	switch b := c.Backoff; {
	case math.IsNaN(b.Multiplier):
		return configErr("DialConfig.Backoff.Multiplier", "is NaN")
	case !(b.Jitter < 1):
		return configErr("DialConfig.Backoff.Jitter", "%v: want below 1", b.Jitter)
	}
	return nil
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
	// means request, subscribe, publish and bulk.
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
	// Limits bound the sessions, handshakes, descriptors and control
	// traffic the daemons can cause. The zero value is the defaults.
	Limits Limits
}

func (c *ServerConfig) validate() error {
	if err := c.SessionConfig.validate("ServerConfig"); err != nil {
		return err
	}
	switch {
	case c.Keys == nil:
		return configErr("ServerConfig.Keys", "is required")
	case c.TokenTTL < 0:
		return negative("ServerConfig.", durField("TokenTTL", c.TokenTTL))
	case c.Rights&^token.RightsAll != 0:
		return configErr("ServerConfig.Rights", "%#x has unknown bits (known: %#x)", uint64(c.Rights), uint64(token.RightsAll))
	case !token.ValidScope(c.Scope):
		return configErr("ServerConfig.Scope", "%q is not a canonical scope (token.ValidScope)", c.Scope)
	}
	if _, ok := c.Keys.Current(); !ok {
		return configErr("ServerConfig.Keys", "has no current key (Keyring.Rotate or Add)")
	}
	return c.Limits.validate(c.TokenTTL)
}
