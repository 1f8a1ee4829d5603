package control

import (
	"context"
	"encoding/hex"
	"errors"
	"log/slog"
	"os"
	"strconv"
	"strings"

	"github.com/sypas/go/control/token"
	"github.com/sypas/go/wire"
)

// Keys of audit records. They are stable: alerting and log processing may
// match them (docs/SECURITY.md §10). A record never holds token bytes or a
// key, only ids.
const (
	LogKeyEvent   = "event"    // the kind of record: one of the Event* names
	LogKeyReason  = "reason"   // why, in words (an error's text)
	LogKeyCode    = "code"     // the error code sent to the peer (E_AUTH...), if one was
	LogKeyLimit   = "limit"    // the ServerConfig.Limits field that refused (event limit)
	LogKeyPeerUID = "peer_uid" // the attested (kernel) or SO_PEERCRED uid of the peer
	LogKeyPeerGID = "peer_gid" //
	LogKeyPeerPID = "peer_pid" //
	LogKeyExe     = "exe"      // the peer's executable, as attested
	// A network peer (TCP, gRPC) has no uid, gid or pid; its records carry:
	LogKeyPeerAddr    = "peer_addr"    // the peer's network address
	LogKeyCertSubject = "cert_subject" // its verified client certificate's subject
	LogKeyCertURI     = "cert_uri"     // the certificate's URI SANs, comma-separated
	LogKeyCertSHA256  = "cert_sha256"  // the certificate's SHA-256, hex: what its tokens are bound to
	LogKeyTokenID     = "token_id"     // the session's current token id, hex
	LogKeySessionID   = "session_id"   // WELCOME's session id, hex
	// The bridge's records of one request (package sypas) add:
	LogKeyOp          = "op"          // the operation the request named, when known
	LogKeyCorrelation = "correlation" // the request's correlation (0: one-way, not answered)
	LogKeyDecision    = "decision"    // DecisionDeny or DecisionGrant
)

// Decisions: the LogKeyDecision values of the bridge's per-request records.
const (
	DecisionDeny  = "deny"
	DecisionGrant = "grant"
)

// Events: the LogKeyEvent values. Each names one kind of refusal, except
// EventGrant.
const (
	EventAttestation = "attestation" // peer identity refused: policy, pidfd (kernel); the kernel's uid (daemon)
	EventAuth        = "auth"        // a token or cap_ref refused, a bad TOKEN, or a session token expired
	EventPermission  = "permission"  // a valid token without the right (the bridge's per-operation check)
	EventRevocation  = "revocation"  // a session ended because its token was revoked
	EventFDPassing   = "fd_passing"  // descriptors against the fd-passing rules
	EventBadMemfd    = "bad_memfd"   // REGIONS or one of its memfds refused (daemon)
	EventLimit       = "limit"       // a resource limit refused a connection, a session or a frame
	EventProtocol    = "protocol"    // a malformed or unexpected frame, version or size
	EventTimeout     = "timeout"     // a handshake that did not finish in time
	EventInternal    = "internal"    // this side failed (E_INTERNAL sent)
	EventGrant       = "grant"       // a request admitted (the bridge, when grants are recorded)
)

// Audit writes one audit record: msg at level with the event, the reason
// and attrs (PeerAttrs, Session.AuditAttrs). A nil l means slog.Default(),
// so refusals are visible unless a Logger says otherwise (a
// slog.DiscardHandler silences them). Callers pass ids, never token bytes
// or keys. Records cost nothing when l's handler is not enabled for level.
func Audit(ctx context.Context, l *slog.Logger, level slog.Level, msg, event, reason string, attrs ...slog.Attr) {
	l = logger(l)
	if !l.Enabled(ctx, level) {
		return
	}
	l.LogAttrs(ctx, level, msg, append([]slog.Attr{slog.String(LogKeyEvent, event), slog.String(LogKeyReason, reason)}, attrs...)...)
}

// logger is l, or slog.Default() for nil.
func logger(l *slog.Logger) *slog.Logger {
	if l == nil {
		return slog.Default()
	}
	return l
}

// PeerAttrs are the audit attributes of an attested peer: uid, gid, pid
// and, when known, the executable; for a network peer its address and,
// when TLS verified one, its certificate's subject, URIs and digest.
func PeerAttrs(p PeerIdentity) []slog.Attr {
	if !p.Local() {
		a := []slog.Attr{slog.String(LogKeyPeerAddr, p.Remote)}
		if c := p.Cert; c != nil {
			a = append(a, slog.String(LogKeyCertSubject, c.Subject), slog.String(LogKeyCertURI, strings.Join(c.URIs, ",")),
				slog.String(LogKeyCertSHA256, hex.EncodeToString(c.SHA256[:])))
		}
		return a
	}
	a := []slog.Attr{slog.Uint64(LogKeyPeerUID, uint64(p.UID)), slog.Uint64(LogKeyPeerGID, uint64(p.GID)), slog.Int(LogKeyPeerPID, p.PID)}
	if p.Exe != "" {
		a = append(a, slog.String(LogKeyExe, p.Exe))
	}
	return a
}

// hexID is an id as audit records show it.
func hexID(id uint64) string { return "0x" + strconv.FormatUint(id, 16) }

// AuditAttrs are the audit attributes of the session: the peer (kernel
// side), the session id and the current token id, as far as they exist yet.
func (s *Session) AuditAttrs() []slog.Attr {
	var a []slog.Attr
	if s.kernel {
		a = PeerAttrs(s.peer)
	}
	if id := s.welcome.SessionID; id != 0 {
		a = append(a, slog.String(LogKeySessionID, hexID(id)))
	}
	if id := s.capRef(); id != 0 {
		a = append(a, slog.String(LogKeyTokenID, hexID(id)))
	}
	return a
}

// refusedMsg is the message of every refusal record.
const refusedMsg = "sypas: refused"

// audit records that this side refuses err's cause on the session: one
// record per refusal, with the event eventOf finds. Errors that are no
// refusal (a local close, a cancelled context) write nothing.
func (s *Session) audit(err error, attrs ...slog.Attr) {
	ev := eventOf(err, s.kernel, s.State())
	if ev == "" {
		return
	}
	level := slog.LevelWarn
	if ev == EventInternal {
		level = slog.LevelError
	}
	Audit(context.Background(), s.cfg.Logger, level, refusedMsg, ev, err.Error(), append(append(s.AuditAttrs(), attrs...), errAttrs(err)...)...)
}

// errAttrs are the audit attributes err carries: the code sent for it, and
// the limit that refused.
func errAttrs(err error) []slog.Attr {
	var a []slog.Attr
	var e *wire.Error
	if errors.As(err, &e) {
		a = append(a, slog.String(LogKeyCode, e.Code.String()))
	}
	var le *limitError
	if errors.As(err, &le) {
		a = append(a, slog.String(LogKeyLimit, le.field))
	}
	return a
}

// errBadToken marks a TOKEN the daemon refuses, for its audit event.
var errBadToken = errors.New("control: bad TOKEN")

// errLimit marks a refusal by one of ServerConfig.Limits.
var errLimit = errors.New("control: limit reached")

// eventOf is the audit event of a refusal err seen in state st, or "" if
// err is no refusal.
func eventOf(err error, kernel bool, st State) string {
	switch {
	case errors.Is(err, context.Canceled), errors.Is(err, ErrSessionClosed), isPeerError(err):
		return ""
	case errors.Is(err, errLimit):
		return EventLimit
	case errors.Is(err, ErrPeerRejected):
		return EventAttestation
	case errors.Is(err, ErrFDPassing):
		return EventFDPassing
	case errors.Is(err, token.ErrRevoked):
		return EventRevocation
	case errors.Is(err, errBadToken):
		return EventAuth
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, os.ErrDeadlineExceeded):
		return EventTimeout
	}
	switch wire.CodeOf(err) {
	case wire.CodeAuth:
		return EventAuth
	case wire.CodePermission:
		return EventPermission
	case wire.CodeInternal:
		return EventInternal
	}
	if !kernel && st == StateRegions {
		return EventBadMemfd
	}
	return EventProtocol
}
