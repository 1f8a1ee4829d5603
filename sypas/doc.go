// Package sypas is the bridge between a kernel and its daemons: the
// package a SYPAS user imports. A Server (kernel side) accepts daemons on
// a control.Listener, checks every frame they send against their session's
// capability token, runs the Handler registered for each operation, and
// publishes events to subscribers. A Client (daemon side) keeps a session
// with the kernel, reconnecting when it goes away, and makes calls,
// one-way sends and subscriptions on it. The rules both follow on the
// rings are docs/PROTOCOL.md §8; the sessions themselves (attestation,
// tokens, heartbeats, GOAWAY) are package control's.
//
// # Transport
//
// Server and Client speak only through one seam, a transport that carries
// the data-plane frames of one session: send a frame (safe for concurrent
// callers; the transport numbers it and stamps the session's token id),
// receive the next frame (one reader at a time), release what was
// received. The shared-memory rings of a control.Session are the first
// implementation: a frame is one ring record, written in place and read
// in place. Frames inline on a socket, over TCP or over gRPC are each
// another implementation of the same seam, not another client.
//
// # Lifetimes
//
// What the bridge hands out is valid for a stated time, and no longer:
//
//   - A Handler's *Request, its Body and its context are valid until the
//     handler returns. The body of an Inline handler is a view into the
//     shared ring, which the daemon can rewrite while the handler reads
//     it: copy what you validate before acting on it. Other handlers get a
//     private copy. The reply a handler returns is copied before its caller
//     returns, so it may be the handler's reusable memory; except a slice
//     from Request.AllocReply, a span of the kernel's bulk region that is
//     sent in place and is the daemon's once the handler has returned it.
//   - A Span from AllocSpan is the caller's until CallSpan or Free; its
//     bytes are then the kernel's, and must not be touched.
//   - Call returns a reply the caller owns; CallInto appends it to the
//     caller's buffer; CallFunc hands a view to its callback, valid only
//     until the callback returns. An Event's Body is the receiver's own.
//
// # Errors
//
// An error the kernel answers is an *Error carrying a Code; match it with
// errors.Is against the sentinels (ErrNotFound, ErrPermission...) or read
// it with CodeOf. A handler's *Error travels with its code and message;
// any other handler error, or a panic, is answered E_INTERNAL without its
// text, which only the kernel's log sees. ClassOf says what a caller may
// do about an error, and the Client acts on it by itself:
//
//   - Transient (E_RESOURCE, E_INTERNAL, E_TIMEOUT, E_UNAVAILABLE): retried
//     with backoff (the kernel's retry_after when longer) up to
//     ClientConfig.MaxAttempts, but only when the request never reached the
//     kernel or the call is marked Idempotent;
//   - Reauthenticate (E_AUTH): the Client reconnects once, with a fresh
//     attestation and token, and tries again;
//   - Fatal (E_NOT_FOUND, E_PERMISSION, E_TOO_LARGE, E_PROTO...): returned.
//
// A call whose session ended under it, or that finds none, returns an
// error matching ErrUnavailable (unless the session ended with a code of
// its own, such as E_AUTH for a revoked token), or waits for the next
// session if it is WaitForReady. A body above the session's max_payload
// fails with ErrTooLarge before anything is sent, unless it goes in bulk
// (below). A call whose context
// ends returns at once, but its request stays counted against
// max_in_flight until the kernel answers (there is no cancel frame), so
// give calls deadlines: the kernel's handler sees the deadline, and
// nothing else tells it to stop.
//
// # The enforcer
//
// The Server checks every frame it reads from a daemon's ring before
// anything else sees it: the frame must parse and carry the ring's next
// sequence number and a type a daemon may send, or the session ends with
// ERROR E_PROTO on the control socket, whose reason the daemon reads; then
// its cap_ref must name the session's current token (or the one the last
// refresh replaced) and no revoked one (E_AUTH), its payload must fit
// max_payload (E_TOO_LARGE), the operation must exist (E_NOT_FOUND), the
// token's rights must include the operation's (E_PERMISSION), and no more
// than max_in_flight requests may be unanswered (E_RESOURCE). A refused
// request is answered with its correlation (a one-way one is not), counted
// in ServerStats.Denied and written to ServerConfig.Logger as one audit
// record with the keys of package control. The token is verified once per
// session and its rights cached, so the per-frame check is a few atomic
// loads, a map lookup and an atomic add: no allocation, no system call.
// docs/SECURITY.md §12 has the details.
//
// # Large payloads: bulk
//
// On the rings, a request body, a reply or an event over the session's
// max_payload (64 KiB by default) travels by itself through shared memory:
// its bytes go into a span of the sender's bulk region (a sealed memfd of
// 64 MiB by default, ClientConfig.BulkSize), and only a 40-byte
// descriptor crosses the ring (docs/PROTOCOL.md §8.7). Call copies the body
// into the span once; AllocSpan and CallSpan let the caller write it there
// in place, with no copy, and a handler's Request.AllocReply does the same
// for its reply. The kernel's handler reads the span where it
// lies (Request.Body) and the span is released when the handler returns;
// the daemon copies a reply for Call, or hands CallFunc's callback a view
// until it returns. A payload larger than the region fails with
// ErrTooLarge; a region that stays full makes the sender wait until its
// deadline, then fail with an error matching ErrResource: there is no
// fallback to another path. A bulk request needs the token's bulk right
// (RightBulk, in the default rights). The inline transport has no bulk
// regions: there a body over max_payload fails with ErrTooLarge.
// BulkStats and ServerStats.BulkSpans say how many spans are in use.
// An event over max_payload is encoded into a span of each subscriber's
// session: one copy per subscriber, since every session has a region of
// its own (docs/DESIGN.md §9.1 says why there is no zero-copy Publish).
package sypas
