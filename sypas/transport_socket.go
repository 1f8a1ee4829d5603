package sypas

import (
	"context"
	"errors"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/sypas/go/control"
	"github.com/sypas/go/frame"
	"github.com/sypas/go/wire"
)

// socketTransport carries the data plane inline on the session's control
// socket (docs/PROTOCOL.md §8.6), when shared memory is off or could not be
// set up. control.Inline does the work: recv (Inline.Next) reads the
// socket itself, serving the control frames it meets, and returns each
// data-plane frame in place, valid until release; between recvs a
// daemon's idle reader reads instead, into a bounded queue of private
// copies that recv takes first. send appends to a buffer that Flush
// writes, in the socket's one sequence with the control frames.
//
// Senders take turns (turns) and write once per burst, as on the rings.
// The write itself is bounded by the control
// plane's write timeout (heartbeat interval × misses), not by a context: a
// frame half written would break the stream, so a write that fails ends
// the session. A noWait send (an event under DropNewest) never waits for
// the peer: it gives up (errFull) when the lock's holder is writing to a
// full socket, and writes with control.Inline.TryWrite, which drops the
// frame rather than wait for a socket that has not taken the last one.
type socketTransport struct {
	sess *control.Session
	in   *control.Inline

	turns
	stopped atomic.Bool // stop was called
}

// newTransport returns the transport the session negotiated: inline on the
// socket, or the rings (writeTimeout: see ringTransport).
func newTransport(s *control.Session, writeTimeout time.Duration) transport {
	if in := s.Inline(); in != nil {
		t := &socketTransport{sess: s, in: in}
		t.turns.init(in.Flush, t.sessionErr)
		return t
	}
	return newRingTransport(s, writeTimeout)
}

// Transport names, for TransportInfo.
const (
	TransportRings  = "shm"     // shared-memory rings beside a Unix socket
	TransportInline = "inline"  // frames inline on the Unix socket (§8.6)
	TransportTLS    = "tcp+tls" // frames on TCP with TLS 1.3 and client certificates (§9)
	TransportTCP    = "tcp"     // frames on plain TCP, loopback only
)

// TransportInfo says how a session carries its frames.
type TransportInfo struct {
	// Name is TransportRings (shared memory), TransportInline (frames on
	// the control socket, the fallback), TransportTLS or TransportTCP, or
	// the name of a transport a package registered ("grpc"). Only
	// TransportRings uses shared memory.
	Name string
	// Address is the address the session was dialed at: the one asked
	// for, or the fallback taken (Daemon side; empty on a Server).
	Address string
	// Reason says why the frames are not in shared memory: whose
	// configuration turned it off, what failed setting it up, or that the
	// connection is not a Unix socket. Empty on the rings.
	Reason string
	// Fallback says why the better addresses of the preference order
	// (control.DialConfig.Fallbacks) were passed over; empty when the
	// first one was used.
	Fallback string
}

func transportInfo(s *control.Session) TransportInfo {
	info := TransportInfo{Name: TransportRings, Address: s.Address(), Fallback: s.Fallback()}
	if in := s.Inline(); in != nil {
		info.Name, info.Reason = TransportInline, in.Reason()
		if n := s.Network(); n != control.NetworkUnix {
			info.Name = n
		}
	}
	return info
}

// Transport describes the current session's transport. With no session it
// fails with an error matching ErrUnavailable.
func (c *Client) Transport() (TransportInfo, error) {
	cc, err := c.conn(context.Background(), false)
	if err != nil {
		return TransportInfo{}, err
	}
	return transportInfo(cc.sess), nil
}

// fellBack is the inline data plane of a session whose frames could have
// been in shared memory (a Unix socket) and are not, else nil. A session on
// TCP or gRPC is inline by nature, not by a fallback.
func fellBack(s *control.Session) *control.Inline {
	if s.Network() != control.NetworkUnix {
		return nil
	}
	return s.Inline()
}

// logInline logs, once per Client or Server (once), that a session's data
// plane fell back to the socket, and why: never a silent fallback.
func logInline(log *slog.Logger, once *atomic.Bool, side string, s *control.Session) {
	in := fellBack(s)
	if in == nil || once.Swap(true) {
		return
	}
	if log == nil {
		log = slog.Default()
	}
	log.LogAttrs(context.Background(), slog.LevelWarn, "sypas: frames travel inline on the control socket, not in shared memory",
		slog.String("side", side), slog.String(control.LogKeyReason, in.Reason()))
}

// newTransport is the Client's transport for a new session.
func (c *Client) newTransport(s *control.Session) transport {
	logInline(c.cfg.Logger, &c.inlineLogged, "daemon", s)
	logFallback(c.cfg.Logger, &c.fallbackAt, s)
	return newTransport(s, 0)
}

// newTransport is the Server's transport for a new session.
func (s *Server) newTransport(sess *control.Session) transport {
	if fellBack(sess) != nil {
		s.stats.inline.Add(1)
	}
	logInline(s.log, &s.inlineLogged, "kernel", sess)
	return newTransport(sess, s.cfg.WriteTimeout)
}

// logFallback logs a session dialed at a fallback address, and why the
// better ones were passed over: once per change of address (at stands
// for the last one logged), never silently.
func logFallback(log *slog.Logger, at *atomic.Pointer[string], s *control.Session) {
	addr := s.Address()
	if s.Fallback() == "" {
		at.Store(nil)
		return
	}
	if p := at.Swap(&addr); p != nil && *p == addr {
		return
	}
	if log == nil {
		log = slog.Default()
	}
	log.LogAttrs(context.Background(), slog.LevelWarn, "sypas: connected at a fallback address",
		slog.String("address", addr), slog.String("network", s.Network()), slog.String(control.LogKeyReason, s.Fallback()))
}

func (t *socketTransport) session() *control.Session { return t.sess }
func (t *socketTransport) maxPayload() int           { return t.in.MaxPayload() }

func (t *socketTransport) send(ctx context.Context, h frame.Header, ext []byte, m wire.Message, noWait bool) error {
	select {
	case t.lock <- struct{}{}:
	default:
		if err := t.queue(ctx, noWait); err != nil {
			return err
		}
	}
	live := t.sess.State() != control.StateClosed // one load; Err takes a lock
	var err error
	if noWait {
		err = t.in.TryWrite(h, ext, m)
	} else {
		err = t.in.Write(h, ext, m, false)
	}
	switch {
	case err == nil:
		if !noWait { // TryWrite wrote what the socket took; the rest goes with the next write
			t.dirty.Store(true)
		}
	case errors.Is(err, control.ErrFull):
		err = errFull
	case errors.Is(err, ErrTooLarge):
	case live:
		// The session ended in Write: a buffer flushed when full may have
		// taken our frame with it.
		err = &writtenErr{t.sessionErr(err)}
	default:
		err = t.sessionErr(err)
	}
	return t.unlock(err)
}

// queue waits for the lock, within ctx; with noWait, only while no write
// waits for a full socket (looked at every stallAfter).
func (t *socketTransport) queue(ctx context.Context, noWait bool) error {
	t.waiting.Add(1)
	var tick <-chan time.Time
	if noWait {
		tk := time.NewTicker(stallCheck)
		defer tk.Stop()
		tick = tk.C
	}
	for {
		if noWait && t.in.Stalled() {
			t.leave()
			return errFull
		}
		select {
		case t.lock <- struct{}{}:
			t.waiting.Add(-1)
			return nil
		case <-tick:
		case <-ctx.Done():
			t.leave()
			return ctx.Err()
		case <-t.sess.Done():
			t.leave()
			return t.sessionErr(nil)
		}
	}
}

// stallCheck is how often a queued noWait sender looks for a stalled write.
const stallCheck = time.Millisecond

func (t *socketTransport) recv(deadline time.Time) (frame.Frame, error) {
	if t.stopped.Load() {
		return frame.Frame{}, stoppedErr(t.sess)
	}
	f, err := t.in.Next(deadline)
	if err != nil {
		return f, recvErr(t.stopped.Load(), t.sess, err, t.sessionErr)
	}
	return f, nil
}

func (t *socketTransport) release()       { t.in.Release() }
func (t *socketTransport) buffered() bool { return t.in.Buffered() }

// drained: the socket is one ordered stream, so a peer's frames sent
// before its GOAWAY have all been read by the time the GOAWAY is seen:
// returned by recv already where Inline.Next read them (always on a
// kernel), else queued by a daemon's idle reader, and then drained once
// the queue is empty and released.
func (t *socketTransport) drained() bool { return t.in.Drained() }

func (t *socketTransport) nudge() { t.in.Wake() }

func (t *socketTransport) stop() {
	t.stopped.Store(true)
	t.in.Wake() // after: a recv that missed the flag is woken
}

func (t *socketTransport) sessionErr(err error) error { return endedErr(t.sess, err) }
