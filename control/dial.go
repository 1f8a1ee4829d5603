package control

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/sypas/go/frame"
	"github.com/sypas/go/ring"
	"github.com/sypas/go/wire"
)

// Dial connects to the kernel at addr and runs the daemon side of the
// handshake (docs/PROTOCOL.md §6): CheckServer, HELLO, WELCOME, REGIONS
// with the two ring memfds, TOKEN. The whole of it is bounded by ctx and
// cfg.HandshakeTimeout. The Session's Producer is the daemon→kernel ring,
// its Consumer the kernel→daemon ring. Every failure after the connect
// wraps ErrHandshake and has released every descriptor received.
//
// addr is a Unix socket path (or unix:///path), tcp://host:port (TLS 1.3
// with cfg.TLS; the data plane inline, §9), or the address of a
// transport a package registered (grpc://host:port: RegisterTransport);
// see ParseAddress. When addr cannot be reached (nothing listens, a
// transport not built in), each of cfg.Fallbacks is tried in turn, and
// Session.Fallback says why the better ones were passed over; a kernel
// that answers and refuses (a handshake, TLS or policy failure) is not
// passed over.
func Dial(ctx context.Context, addr string, cfg DialConfig) (*Session, error) {
	if err := cfg.check(); err != nil {
		return nil, err
	}
	cfg.SessionConfig = cfg.SessionConfig.withDefaults()
	var skipped []string
	var errs []error
	for i, a := range append([]string{addr}, cfg.Fallbacks...) {
		s, err := dialAddr(ctx, a, cfg)
		if err == nil {
			s.fallback, s.addr = strings.Join(skipped, "; "), a
			return s, nil
		}
		errs = append(errs, err)
		if !Unreachable(err) || ctx.Err() != nil || i == len(cfg.Fallbacks) {
			break
		}
		skipped = append(skipped, err.Error())
	}
	return nil, errors.Join(errs...)
}

// Unreachable reports whether a Dial failed because nothing could be
// reached at the address (nothing listens, the host does not answer, the
// transport is not built into this program), as opposed to a kernel that
// answered and refused or failed the handshake (ErrHandshake). Only the
// former makes Dial try a fallback.
func Unreachable(err error) bool {
	return err != nil && !errors.Is(err, ErrHandshake) && !errors.Is(err, ErrConfig)
}

// checkAddress refuses, with ErrConfig, an address c cannot dial whatever
// the network does: malformed, or tcp:// without TLS (or the plaintext
// loopback exception), or with a TLS configuration that cannot work. A
// tcp:// address is dialed with the TLS configuration it returns (nil:
// plaintext loopback).
func (c DialConfig) checkAddress(addr string) (*tls.Config, error) {
	network, where, err := ParseAddress(addr)
	if err != nil || network != "tcp" {
		return nil, err
	}
	if c.TLS == nil {
		if !c.InsecurePlaintextLoopback {
			return nil, configErr("DialConfig.TLS", "is nil: %s needs TLS (plain TCP: InsecurePlaintextLoopback, loopback only)", addr)
		}
		return nil, checkLoopback("DialConfig.InsecurePlaintextLoopback", where)
	}
	host, _, _ := net.SplitHostPort(where)
	return clientTLS(c.TLS, host)
}

// dialAddr dials one address within HandshakeTimeout.
func dialAddr(ctx context.Context, addr string, cfg DialConfig) (*Session, error) {
	tlsCfg, err := cfg.checkAddress(addr)
	if err != nil {
		return nil, err
	}
	network, where, _ := ParseAddress(addr)
	ctx, cancel := context.WithTimeout(ctx, cfg.HandshakeTimeout)
	defer cancel()
	switch network {
	case NetworkUnix:
		return dialUnix(ctx, where, cfg)
	case "tcp":
		c, err := connectTCP(ctx, where, tlsCfg)
		if err != nil {
			return nil, err
		}
		return dialConn(ctx, c, cfg)
	}
	t := transportFor(network)
	if t == nil {
		return nil, fmt.Errorf("control: dial %s: %w", addr, &noTransportError{network})
	}
	c, err := t(ctx, where, cfg)
	if err != nil {
		return nil, fmt.Errorf("control: dial %s: %w", addr, err)
	}
	return dialConn(ctx, c, cfg)
}

// dialUnix dials the Unix socket at path; a daemon that cannot map the
// kernel's rings dials again for inline.
func dialUnix(ctx context.Context, path string, cfg DialConfig) (*Session, error) {
	c, err := connect(ctx, path)
	if err != nil {
		return nil, fmt.Errorf("control: dial %s: %w", path, err)
	}
	s, err := dialConn(ctx, c, cfg)
	if err != nil && errors.Is(err, errRingsUnusable) && cfg.Features&wire.FeatureInline != 0 && !cfg.NoSharedMemory {
		// The kernel's rings cannot be mapped here (mmap refused, a seal
		// or header check failed): ask for the data plane inline (§8.6).
		reason := "mapping the kernel's rings failed: " + err.Error()
		c, cerr := connect(ctx, path)
		if cerr != nil {
			return nil, errors.Join(err, fmt.Errorf("control: dial %s again for inline: %w", path, cerr))
		}
		cfg.NoSharedMemory, cfg.inlineWhy = true, reason
		return dialConn(ctx, c, cfg)
	}
	return s, err
}

// connectTCP connects to host:port and runs the TLS handshake with tc
// (checkAddress's), or, with a nil tc (DialConfig.InsecurePlaintextLoopback),
// stays in plaintext on a loopback address only. A failed TLS handshake
// wraps ErrHandshake: the kernel answered.
func connectTCP(ctx context.Context, hostport string, tc *tls.Config) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", hostport)
	if err != nil {
		return nil, fmt.Errorf("control: dial tcp://%s: %w", hostport, err)
	}
	if tc == nil {
		if err := onLoopback("DialConfig.InsecurePlaintextLoopback", c.RemoteAddr()); err != nil {
			c.Close()
			return nil, err
		}
		return c, nil
	}
	t := tls.Client(c, tc)
	if err := t.HandshakeContext(ctx); err != nil {
		c.Close()
		return nil, fmt.Errorf("%w: TLS with tcp://%s: %w", ErrHandshake, hostport, err)
	}
	return t, nil
}

// DialConn runs the daemon side of the handshake on conn, a reliable byte
// stream already connected to a kernel (and authenticated, if it crosses
// hosts: the kernel's certificate verified by TLS), which it owns from then
// on. It is how a transport built outside this package (a gRPC stream
// adapted to a net.Conn) carries a session: Dial calls it for the
// transports of RegisterTransport. On a *net.UnixConn it is Dial's own
// handshake (CheckServer, rings or inline); on anything else the data
// plane is inline (INLINE_ONLY offered, no REGIONS: §8.6, §9) and the
// kernel's uid is not checked. conn's deadlines must work as net.Conn's
// do: the session bounds every read and write with them. The handshake is
// bounded by ctx and cfg.HandshakeTimeout; every failure wraps
// ErrHandshake and has closed conn.
func DialConn(ctx context.Context, conn net.Conn, cfg DialConfig) (*Session, error) {
	if err := cfg.check(); err != nil {
		conn.Close()
		return nil, err
	}
	cfg.SessionConfig = cfg.SessionConfig.withDefaults()
	ctx, cancel := context.WithTimeout(ctx, cfg.HandshakeTimeout)
	defer cancel()
	return dialConn(ctx, conn, cfg)
}

// errRingsUnusable marks a handshake that failed because this side could
// not map or attach the rings the kernel sent, as opposed to a REGIONS
// frame that breaks the protocol.
var errRingsUnusable = errors.New("control: the rings cannot be used")

// connect connects to the socket at path within ctx. A full accept backlog
// (EAGAIN: Go's connect does not block) is waited out, as a blocking
// connect(2) would: the kernel is there, only busy, and a connection flood
// by another process must not turn into an immediate failure and a backoff.
func connect(ctx context.Context, path string) (*net.UnixConn, error) {
	var d net.Dialer
	pause := 100 * time.Microsecond
	for {
		c, err := d.DialContext(ctx, "unix", path)
		if err == nil {
			return c.(*net.UnixConn), nil
		}
		if !errors.Is(err, syscall.EAGAIN) {
			return nil, err
		}
		t := time.NewTimer(pause)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("%w (%w)", ctx.Err(), err)
		case <-t.C:
		}
		pause = min(2*pause, 10*time.Millisecond)
	}
}

// dialConn runs the daemon handshake on conn, which it owns.
func dialConn(ctx context.Context, conn net.Conn, cfg DialConfig) (*Session, error) {
	cfg.SessionConfig = cfg.SessionConfig.withDefaults()
	s := newSession(false, conn, cfg.SessionConfig)
	stop := s.handshakeDeadline(ctx)
	if err := s.clientHandshake(cfg); err != nil {
		return nil, s.endHandshake(ctx, stop, err)
	}
	if err := s.endHandshake(ctx, stop, nil); err != nil {
		return nil, err
	}
	return s, nil
}

func (s *Session) clientHandshake(cfg DialConfig) error {
	inlineWhy := cfg.inlineWhy
	s.setState(StateAttest)
	if uc, ok := s.conn.(*net.UnixConn); ok {
		if err := CheckServer(uc, cfg.ServerUIDs...); err != nil {
			return err
		}
	} else {
		// No shared memory across the stream; the kernel was authenticated
		// by it (TLS verified its certificate).
		cfg.NoSharedMemory = true
		if inlineWhy == "" {
			inlineWhy = "the connection is " + networkOf(s.conn) + ", not a Unix socket: no shared memory across it"
		}
	}

	s.setState(StateHandshake)
	features := cfg.Features
	if cfg.NoSharedMemory {
		features |= wire.FeatureInline | wire.FeatureInlineOnly
		if inlineWhy == "" {
			inlineWhy = "the daemon's configuration turns shared memory off"
		}
	}
	hello := wire.Hello{
		MinVersion: wire.MinProtocolVersion, MaxVersion: wire.ProtocolVersion,
		Features: features, TxRingSize: cfg.TxRingSize, RxRingSize: cfg.RxRingSize,
		MaxPayload: cfg.MaxPayload, MaxInFlight: cfg.MaxInFlight, Name: []byte(cfg.Name),
	}
	if features&wire.FeatureBulk != 0 {
		// Always sent with BULK, 0 included: it tells the kernel that
		// this daemon knows bulk regions (§6.4).
		hello.BulkSize, hello.HasBulkSize = cfg.BulkSize, true
	}
	if err := s.send(&hello, 0, 0, 0); err != nil {
		// A kernel that refused us at once (E_RESOURCE) may have closed
		// before HELLO arrived: its ERROR is still there to read.
		if _, _, rerr := s.readFrame(); isPeerError(rerr) {
			return rerr
		}
		return err
	}
	f, _, err := s.readFrame()
	if err != nil {
		return err
	}
	if err := s.welcome.Decode(f.Payload); err != nil {
		return protoErr("WELCOME: %v", err)
	}
	if err := checkWelcome(&s.welcome, &hello, &cfg.SessionConfig); err != nil {
		return err
	}
	maxDead := cmp.Or(cfg.MaxHeartbeatTimeout, DefaultMaxHeartbeatTimeout)
	if dead := s.welcome.HeartbeatInterval() * time.Duration(s.welcome.HeartbeatMisses); dead > maxDead {
		return protoErr("heartbeat %d ms × %d = %v above the daemon's limit %v",
			s.welcome.HeartbeatIntervalMs, s.welcome.HeartbeatMisses, dead, maxDead)
	}
	// From here on the peer's limits are the session's.
	s.cfg.HeartbeatInterval = s.welcome.HeartbeatInterval()
	s.cfg.HeartbeatMisses = int(s.welcome.HeartbeatMisses)

	s.setState(StateRegions)
	switch {
	case s.welcome.Features&wire.FeatureInline != 0:
		if inlineWhy == "" {
			inlineWhy = "the kernel chose it (its configuration turns shared memory off, or creating the rings failed)"
		}
		s.inline = newInline(s, s.welcome.RxRingSize, inlineWhy)
	case hello.Features&wire.FeatureInlineOnly != 0:
		return protoErr("kernel did not grant INLINE, and the daemon maps no shared memory")
	default:
		f, files, err := s.readFrame()
		if err != nil {
			return err
		}
		if err := s.mapRegions(f, files, hello.BulkSize); err != nil {
			return err
		}
		if s.peerBulk != nil {
			if err := s.sendBulkRegion(); err != nil {
				return err
			}
		}
	}

	s.setState(StateToken)
	f, _, err = s.readFrame()
	if err != nil {
		return err
	}
	t, err := decodeToken(f)
	if err != nil {
		return err
	}
	s.setToken(t)
	return nil
}

// maxHeartbeatMs bounds a WELCOME's heartbeat interval (one hour) so that
// interval × misses cannot overflow a Duration.
const maxHeartbeatMs = 3_600_000

// checkWelcome holds the kernel to what the daemon offered and to the
// daemon's own limits.
func checkWelcome(w *wire.Welcome, h *wire.Hello, cfg *SessionConfig) error {
	switch {
	case w.Version < h.MinVersion || w.Version > h.MaxVersion:
		return &wire.Error{Code: wire.CodeVersion, Message: fmt.Sprintf("kernel chose version %d outside [%d, %d]", w.Version, h.MinVersion, h.MaxVersion)}
	case w.Features&^h.Features != 0:
		return protoErr("kernel granted features %#x, offered %#x", w.Features, h.Features)
	case w.Features&wire.FeatureBulk != 0 && w.Features&wire.FeatureInline != 0:
		return protoErr("kernel granted BULK with INLINE: bulk regions need the rings")
	case cfg.RequireFeatures&^w.Features != 0:
		return protoErr("kernel lacks required features %#x (granted %#x)", cfg.RequireFeatures&^w.Features, w.Features)
	case w.HeartbeatIntervalMs > maxHeartbeatMs:
		return protoErr("heartbeat interval %d ms above %d", w.HeartbeatIntervalMs, maxHeartbeatMs)
	case w.TxRingSize > cfg.MaxRingSize || w.RxRingSize > cfg.MaxRingSize:
		return &wire.Error{Code: wire.CodeTooLarge, Message: fmt.Sprintf("rings %d/%d above the daemon's cap %d", w.TxRingSize, w.RxRingSize, cfg.MaxRingSize)}
	case int(w.MaxPayload) > ring.MaxRecord(int(min(w.TxRingSize, w.RxRingSize)))-frame.MaxHeaderLen:
		return protoErr("max payload %d does not fit the rings", w.MaxPayload)
	}
	return nil
}

// mapRegions checks REGIONS against WELCOME and maps the two rings, and
// the kernel's bulk region when BULK is granted (bulkAsked: the HELLO's
// bulk_size). It owns files: each is either mapped (and then owned by a
// Region) or closed.
func (s *Session) mapRegions(f *frame.Frame, files []*os.File, bulkAsked uint32) (err error) {
	defer func() {
		if err != nil {
			closeFiles(files)
		}
	}()
	var m wire.Regions
	if err := m.Decode(f.Payload); err != nil {
		return protoErr("REGIONS: %v", err)
	}
	caps := map[wire.RegionRole]uint32{wire.RoleRingTx: s.welcome.TxRingSize, wire.RoleRingRx: s.welcome.RxRingSize}
	want := 2
	if s.bulkGranted() && len(m.Entries) == 3 {
		// Granted BULK with the rings only: a kernel that predates bulk
		// regions, when BULK meant none. The session has no bulk (§6.4).
		want = 3
	}
	if len(m.Entries) != want || m.Entries[0].Role != wire.RoleRingTx || m.Entries[1].Role != wire.RoleRingRx {
		return protoErr("REGIONS: want [RING_TX, RING_RX] (and BULK when granted), got %v", m.Entries)
	}
	if want == 3 {
		if err := s.checkBulkEntry(m.Entries[2], KernelBulkID, bulkAsked, 0); err != nil {
			return err
		}
	}
	for _, e := range m.Entries[:2] {
		if e.Flags != 0 || e.Size != regionSize(caps[e.Role]) {
			return protoErr("REGIONS: %v region flags %#x size %d, want 0 and %d", e.Role, e.Flags, e.Size, regionSize(caps[e.Role]))
		}
	}
	if err := distinctFiles(files, m.Entries); err != nil {
		return err
	}
	if want == 3 {
		err := s.openPeerBulk(m.Entries[2], files[2]) // closes files[2] on failure
		files[2] = nil
		if err != nil {
			return err
		}
	}
	for i, e := range m.Entries[:2] {
		r, err := ring.OpenRegion(files[i], int(caps[e.Role])) // closes files[i] on failure
		files[i] = nil
		if err != nil {
			return &wire.Error{Code: wire.CodeProto, Message: fmt.Sprintf("REGIONS: %v memfd refused", e.Role), Err: fmt.Errorf("%w: %w", errRingsUnusable, err)}
		}
		s.regions = append(s.regions, r)
	}
	if s.prod, err = s.regions[0].NewProducer(s.cfg.Ring); err != nil {
		return &wire.Error{Code: wire.CodeProto, Message: "RING_TX", Err: fmt.Errorf("%w: %w", errRingsUnusable, err)}
	}
	if s.cons, err = s.regions[1].NewConsumer(s.cfg.Ring); err != nil {
		return &wire.Error{Code: wire.CodeProto, Message: "RING_RX", Err: fmt.Errorf("%w: %w", errRingsUnusable, err)}
	}
	return nil
}

// distinctFiles refuses two descriptors for one file (same device and
// inode), naming the regions by entries. A kernel that passed one memfd for
// both rings would have each end overwrite the other's control words.
func distinctFiles(files []*os.File, entries []wire.Region) error {
	ids := make([]*syscall.Stat_t, len(files))
	for i, f := range files {
		st, err := statOf(f) // fstat(2)
		if err != nil {
			return protoErr("REGIONS: %v memfd: %v", entries[i].Role, err)
		}
		for j := range i {
			if ids[j].Dev == st.Dev && ids[j].Ino == st.Ino {
				return protoErr("REGIONS: %v and %v are the same memfd (device %#x, inode %d)",
					entries[j].Role, entries[i].Role, st.Dev, st.Ino)
			}
		}
		ids[i] = st
	}
	return nil
}
