package control

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sypas/go/frame"
	"github.com/sypas/go/futex"
	"github.com/sypas/go/wire"
)

// DataStream is the stream id of the data-plane frames on a control socket
// whose data plane is inline (docs/PROTOCOL.md §8.6); control frames keep
// stream 0.
const DataStream = 1

// Inline is the data plane of a session that carries it on the control
// socket instead of the rings (WELCOME granted wire.FeatureInline): the
// frames of docs/PROTOCOL.md §8 travel on stream 1, interleaved with the
// control frames and numbered in the socket's one sequence.
//
// Next is the socket's reader: it serves the control frames it meets
// (heartbeats, TOKEN_REFRESH, GOAWAY) and returns each data-plane frame in
// place, with no copy and no goroutine hand-off. On a Unix socket, which
// the session has taken out of the Go runtime's poller (pollConn), it
// first polls the socket for a while (the session's Ring.Idle policy:
// spin, then yield; futex.Poller) before it sleeps in ppoll(2): a call
// answered within that while costs no sleep and no wake-up on either
// side.
//
// On the kernel there is nothing else: its owner MUST keep calling Next
// for as long as the session lives, as sypas.Server's reader does; while
// it does not, the daemon's control frames wait in the socket. A daemon
// may read nothing between calls while heartbeats, GOAWAY and refreshed
// tokens still need reading, so when no Next has been reading for
// idleRead an idle reader goroutine reads the socket instead, copying the
// data-plane frames into a queue bounded in bytes by the ring the session
// would have had (WELCOME's rx size; one frame is always admitted): a full
// queue stops the reading, the backpressure of a full ring. Next returns
// the queued frames first, stopping the idle reader if it waits for
// bytes. The same holds on any stream (TLS, gRPC): the session is inline
// there from the handshake on, and the control socket of these comments
// is that stream.
//
// Write appends frames to a buffer written to the socket by Flush, or by
// the session's next control frame, in sequence order.
type Inline struct {
	s      *Session
	reason string
	budget int // bytes queued and held admitted before the idle reader waits

	// The idle reader's queue (a daemon's): frames it read, copied.
	mu   sync.Mutex
	q    []*inlineFrame // received, not yet returned by Next
	head int            // q[head:] are waiting
	held []*inlineFrame // returned by Next, not yet released
	free []*inlineFrame
	// bytes of q[head:] and held
	bytes int
	room  chan struct{} // cap 1: bytes were released, or a Next came

	buf []byte // under Session.wmu: frames written, not yet flushed
	// backlog: a TryWrite left part of buf unwritten (the socket was
	// full); the next write sends it first. Under Session.wmu.
	backlog bool
	// writing is when the write under way began (UnixNano), 0 if none: a
	// write that has lasted stallAfter is waiting for a peer that does
	// not read (Stalled).
	writing atomic.Int64
	wfn     func(fd uintptr) bool // one non-blocking write(2) of buf: made once
	kick    chan struct{}         // off a Unix socket: wakes the flusher (under Session.wmu)
	wn      int
	werr    error

	// The reader. On the kernel nothing but Next reads (no idle reader).
	peekBuf [1]byte
	peek    func(fd uintptr) bool // whether the socket has bytes (or an end) to read
	// poller polls the socket before Next parks (nil off a Unix socket);
	// polled runs peek through the socket's Control (no read lock, and
	// the descriptor stays open meanwhile), and says whether to stop.
	poller  *futex.Poller
	polled  func() bool
	ctlPeek func(fd uintptr)
	peekOK  bool

	dmu       sync.Mutex  // Wake and Next versus a reader's deadline
	woken     atomic.Bool // Wake was called; set under dmu, taken by Next
	peeking   bool        // under dmu: Next waits for bytes (Wake may interrupt it)
	idlePeeks bool        // under dmu: the idle reader waits for bytes (Next interrupts it)

	// Daemon: active counts Next calls in progress, plus a frame returned
	// in place and not yet released (inPlace); lastRead is when the last
	// of them ended (since base). The idle reader reads only while
	// active is 0 and lastRead is idleRead old. While one Next (or hold)
	// lasts, the idle reader parks (parked) until the leave that brings
	// active to 0 signals idle, rather than look again every idleRead.
	base     time.Time
	active   atomic.Int32
	lastRead atomic.Int64
	inPlace  atomic.Bool
	parked   atomic.Bool
	idle     chan struct{} // cap 1
}

// idleRead is how long a daemon's socket goes unread by Next before the
// idle reader reads it: far below any heartbeat deadline, and far above
// the pause between two calls of a busy daemon, which therefore never
// meets the idle reader on its way.
const idleRead = time.Millisecond

type inlineFrame struct {
	h   frame.Header
	ext int    // length of the extension at the start of b
	b   []byte // extension, then payload: private copies
}

// maxKeptFrame bounds the buffer a released frame keeps for reuse, and
// maxKeptWrite the write buffer kept after a flush.
const (
	maxKeptFrame = 64 << 10
	maxKeptWrite = 256 << 10
	// flushAt is the size at which Write flushes even when asked not to:
	// a burst held back for one write stays bounded.
	flushAt = 64 << 10
)

func newInline(s *Session, budget uint32, reason string) *Inline {
	d := &Inline{
		s: s, reason: reason, budget: int(budget),
		room: make(chan struct{}, 1), idle: make(chan struct{}, 1), base: time.Now(),
	}
	d.wfn = func(fd uintptr) bool {
		for {
			d.wn, d.werr = unix.Write(int(fd), d.buf)
			if d.werr != unix.EINTR {
				return true // never wait: EAGAIN is a full socket
			}
		}
	}
	d.peek = func(fd uintptr) bool {
		for {
			_, _, _, err := recvmsg(int(fd), d.peekBuf[:], nil, unix.MSG_PEEK|unix.MSG_DONTWAIT)
			switch err {
			case unix.EINTR:
				continue
			case unix.EAGAIN:
				return false // wait for the socket, then again
			}
			return true // bytes, the end, or an error that readFrame will meet
		}
	}
	if s.fdr.c != nil {
		d.poller = futex.NewPoller(s.cfg.Ring.Idle)
		d.ctlPeek = func(fd uintptr) { d.peekOK = d.peek(fd) }
		d.polled = func() bool {
			if d.woken.Load() {
				return true
			}
			d.peekOK = false
			if s.fdr.rc.Control(d.ctlPeek) != nil {
				return true // closed: the read meets it
			}
			return d.peekOK
		}
	}
	// Data frames carry up to max_payload; control frames are still held
	// to the control limit (readFrame).
	s.fr.SetConfig(frame.Config{MaxPayload: max(controlMaxPayload, int(s.welcome.MaxPayload))})
	s.fdr.fds = false // no REGIONS will come: descriptors are refused
	s.fdr.raw = true  // a read per data frame: none may allocate
	return d
}

// Reason says why the session's data plane is inline rather than on the
// rings: whose configuration turned shared memory off, or what failed.
func (d *Inline) Reason() string { return d.reason }

// MaxPayload is the session's max_payload, which both directions obey.
func (d *Inline) MaxPayload() int { return int(d.s.welcome.MaxPayload) }

// push queues a data-plane frame the idle reader read, waiting while the
// queue is over its budget and no Next waits.
func (d *Inline) push(f *frame.Frame) error {
	n := len(f.Extension) + len(f.Payload)
	for {
		d.mu.Lock()
		if d.bytes == 0 || d.bytes+n <= d.budget || d.active.Load() != 0 {
			break
		}
		d.mu.Unlock()
		select {
		case <-d.room:
		case <-d.s.done:
			return d.endErr()
		}
	}
	var fr *inlineFrame
	if k := len(d.free); k > 0 {
		fr, d.free = d.free[k-1], d.free[:k-1]
	} else {
		fr = new(inlineFrame)
	}
	fr.h, fr.ext = f.Header, len(f.Extension)
	fr.b = append(append(fr.b[:0], f.Extension...), f.Payload...)
	if d.head > 0 && d.head == len(d.q) {
		d.q, d.head = d.q[:0], 0
	} else if d.head > 64 && d.head > len(d.q)/2 {
		d.q = d.q[:copy(d.q, d.q[d.head:])]
		d.head = 0
	}
	d.q = append(d.q, fr)
	d.bytes += n
	d.mu.Unlock()
	return nil
}

// pop takes the next queued frame, if any.
func (d *Inline) pop() (frame.Frame, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.head == len(d.q) {
		return frame.Frame{}, false
	}
	fr := d.q[d.head]
	d.q[d.head] = nil
	d.head++
	d.held = append(d.held, fr)
	return frame.Frame{Header: fr.h, Extension: fr.b[:fr.ext:fr.ext], Payload: fr.b[fr.ext:]}, true
}

// Next returns the next data-plane frame the peer sent, waiting until
// deadline (zero: none; a past one: only a frame already there) or Wake.
// Its Extension and Payload are valid until Release and the next call. On
// a daemon, frames received before the session ended are still returned;
// then Next fails with why it ended. One goroutine at a time.
func (d *Inline) Next(deadline time.Time) (frame.Frame, error) {
	s := d.s
	if d.s.kernel {
		s.rmu.Lock()
		defer s.rmu.Unlock()
		return d.read(deadline)
	}
	d.active.Add(1) // before the looks below: the idle reader stops for it
	if d.inPlace.Swap(false) {
		d.leave() // this call ends the hold of the frame the last one returned in place
	}
	if f, ok := d.pop(); ok {
		d.leave()
		return f, nil
	}
	d.dmu.Lock()
	if d.idlePeeks {
		s.conn.SetReadDeadline(time.Unix(1, 0)) // leave the socket to us
	}
	d.dmu.Unlock()
	select {
	case d.room <- struct{}{}: // or the queue's room, over budget if need be
	default:
	}
	s.rmu.Lock()
	f, queued := d.pop() // queued by the idle reader before it stopped
	var err error
	if !queued {
		f, err = d.read(deadline)
	}
	s.rmu.Unlock()
	if queued || err != nil {
		d.leave()
		return f, err
	}
	d.inPlace.Store(true) // in the reader's buffer: no reading until Release
	return f, nil
}

// leave ends a Next on a daemon, or the hold of the frame it returned in
// place.
func (d *Inline) leave() {
	d.lastRead.Store(int64(time.Since(d.base)))
	if d.active.Add(-1) == 0 && d.parked.Load() {
		select {
		case d.idle <- struct{}{}:
		default:
		}
	}
}

// read is Next reading the socket itself, under Session.rmu: it serves
// control frames as the session's reader, until a data-plane frame, which
// stays in the reader's buffer until the next read. The liveness deadline
// of the socket (heartbeat interval × misses) applies while it waits; a
// wait that ends at deadline or by Wake reads nothing, so the stream stays
// whole.
func (d *Inline) read(deadline time.Time) (frame.Frame, error) {
	s := d.s
	for {
		if err := s.Err(); err != nil {
			return frame.Frame{}, err
		}
		if s.fr.Buffered() == 0 {
			if err := d.await(deadline); err != nil {
				return frame.Frame{}, err
			}
		}
		f, err := s.readOne()
		if err != nil {
			return frame.Frame{}, err
		}
		if f != nil {
			return *f, nil
		}
	}
}

// await waits until the socket has bytes to read, polling it first (a
// Unix socket), then sleeping until they come; it fails at deadline, after
// Wake, or when the peer has been silent too long (ending the session).
func (d *Inline) await(deadline time.Time) error {
	s := d.s
	now := time.Now()
	if !deadline.IsZero() && !now.Before(deadline) {
		return os.ErrDeadlineExceeded
	}
	live := now.Add(s.deadAfter())
	wait := live
	if !deadline.IsZero() && deadline.Before(live) {
		wait = deadline
	}
	if d.poller != nil && !d.woken.Load() && d.poller.Poll(d.polled, wait) && !d.woken.Load() {
		return nil // bytes, or an end that the read meets
	}
	stopped, err := d.waitMarked(&d.peeking, wait, d.takeWoken)
	if stopped {
		return os.ErrDeadlineExceeded // woken before the wait
	}
	woken := d.takeWoken()
	if errors.Is(err, os.ErrDeadlineExceeded) && (woken || wait.Before(live)) {
		return os.ErrDeadlineExceeded
	}
	if err != nil {
		err = s.readErr(err)
		s.endRead(err)
	}
	return err
}

// idleReader reads a daemon's socket while no Next does (see Inline),
// until the session ends.
func (d *Inline) idleReader() {
	s := d.s
	defer s.wg.Done()
	t := time.NewTimer(idleRead)
	defer t.Stop()
	seen := int64(-1) // lastRead at the previous look, while active
	for {
		wait := idleRead
		if d.active.Load() == 0 {
			wait -= time.Since(d.base) - time.Duration(d.lastRead.Load())
		} else if last := d.lastRead.Load(); last != seen {
			seen = last // Nexts come and go: look again in idleRead
		} else {
			// One Next (or a frame held in place) has lasted idleRead:
			// a subscriber waiting for events, a caller for a slow
			// reply. Park until it ends: a look every idleRead would
			// wake this process a thousand times a second for nothing.
			d.parked.Store(true)
			if d.active.Load() != 0 { // after parked: leave sees one or the other
				select {
				case <-d.idle:
				case <-s.done:
					return
				}
			}
			d.parked.Store(false)
			continue
		}
		if wait > 0 {
			t.Reset(wait)
			select {
			case <-t.C:
			case <-s.done:
				return
			}
			continue
		}
		if err := d.readIdle(); err != nil {
			return // the session has ended
		}
	}
}

// readIdle reads frames, queueing the data-plane ones, until a Next
// comes; an error has ended the session.
func (d *Inline) readIdle() error {
	s := d.s
	s.rmu.Lock()
	defer s.rmu.Unlock()
	for {
		if s.fr.Buffered() == 0 {
			stopped, err := d.waitMarked(&d.idlePeeks, time.Now().Add(s.deadAfter()), d.nextCame)
			if stopped {
				return nil
			}
			if err != nil {
				if errors.Is(err, os.ErrDeadlineExceeded) && d.nextCame() {
					return nil // a Next stopped us
				}
				err = s.readErr(err)
				s.endRead(err)
				return err
			}
		} else if d.nextCame() {
			return nil
		}
		f, err := s.readOne()
		if err != nil {
			return err
		}
		if f != nil {
			if err := d.push(f); err != nil {
				s.endRead(err)
				return err
			}
		}
	}
}

// waitMarked is waitBytes until until, unless stop (looked at under dmu
// first) says not to wait at all: meanwhile *mark (peeking, idlePeeks) is
// set under dmu, so that the goroutine that may interrupt this wait (Wake,
// a Next) knows to move the read deadline into the past.
func (d *Inline) waitMarked(mark *bool, until time.Time, stop func() bool) (stopped bool, err error) {
	d.dmu.Lock()
	if stop() {
		d.dmu.Unlock()
		return true, nil
	}
	*mark = true
	d.s.conn.SetReadDeadline(until)
	d.dmu.Unlock()
	err = d.waitBytes()
	d.dmu.Lock()
	*mark = false
	d.dmu.Unlock()
	return false, err
}

// takeWoken reports whether Wake was called since the last look, and
// forgets it.
func (d *Inline) takeWoken() bool { return d.woken.Swap(false) }

// nextCame reports whether a Next is under way or holds a frame: the idle
// reader leaves the socket to it.
func (d *Inline) nextCame() bool { return d.active.Load() != 0 }

// waitBytes waits, within the socket's read deadline, until the stream
// has a byte to read (or has ended) without taking part of a frame: a
// deadline or Wake that ends the wait leaves the stream whole. A Unix
// socket is peeked at (MSG_PEEK); another stream is read one byte, which
// the session's reader hands back first (fdReader.peekByte).
func (d *Inline) waitBytes() error {
	if d.s.fdr.c == nil {
		return d.s.fdr.peekByte()
	}
	return d.s.fdr.rc.Read(d.peek)
}

// Release hands back every frame Next returned.
func (d *Inline) Release() {
	if d.s.kernel {
		return // the frame lives in the reader's buffer until the next Next
	}
	if d.inPlace.Swap(false) {
		d.leave()
	}
	d.mu.Lock()
	if len(d.held) == 0 {
		d.mu.Unlock()
		return
	}
	for i, fr := range d.held {
		d.bytes -= len(fr.b)
		if cap(fr.b) > maxKeptFrame {
			fr.b = nil
		}
		d.free = append(d.free, fr)
		d.held[i] = nil
	}
	d.held = d.held[:0]
	d.mu.Unlock()
	select {
	case d.room <- struct{}{}:
	default:
	}
}

// Buffered reports whether Next has a frame without waiting: a hint, as
// perhaps only part of a frame is there.
func (d *Inline) Buffered() bool {
	if d.s.kernel {
		return d.s.fr.Buffered() > 0
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.head < len(d.q)
}

// Drained reports whether every data-plane frame read from the socket so
// far has been returned by Next and released. Any goroutine may call it.
// On the kernel it is always true: a frame is read only by Next.
func (d *Inline) Drained() bool {
	if d.s.kernel {
		return true
	}
	if d.inPlace.Load() {
		return false
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.head == len(d.q) && len(d.held) == 0
}

// Wake makes a Next waiting in another goroutine return at once with
// os.ErrDeadlineExceeded (or the next call, if none waits and no frame is
// there). Only a wait for bytes is interrupted: a deadline landing inside
// a frame would break the stream.
func (d *Inline) Wake() {
	d.dmu.Lock()
	d.woken.Store(true)
	if d.peeking {
		d.s.conn.SetReadDeadline(time.Unix(1, 0))
	}
	d.dmu.Unlock()
}

// Write appends one data-plane frame carrying m, with ext (nil, or a
// multiple of 8 bytes) as its header extension, to the socket's write
// buffer: stream 1, the socket's next sequence, the current token's
// cap_ref; h gives Type, Flags and Correlation. With flush, or when the
// buffer has grown past 64 KiB, the buffer is written at once. A payload
// over max_payload fails with an error matching wire.ErrTooLarge and
// nothing is written. A write that fails (the peer does not read for the
// write timeout, or is gone) ends the session: the stream is broken.
func (d *Inline) Write(h frame.Header, ext []byte, m wire.Message, flush bool) error {
	d.s.wmu.Lock()
	defer d.s.wmu.Unlock()
	if err := d.appendLocked(h, ext, m); err != nil {
		return err
	}
	if flush || len(d.buf) >= flushAt {
		return d.flushLocked()
	}
	return nil
}

// appendLocked encodes one frame at the end of buf; under Session.wmu.
func (d *Inline) appendLocked(h frame.Header, ext []byte, m wire.Message) error {
	n := m.Len()
	if n > d.MaxPayload() {
		return &wire.Error{Code: wire.CodeTooLarge, Message: fmt.Sprintf("%v payload of %d bytes, the session's limit is %d", h.Type, n, d.MaxPayload())}
	}
	s := d.s
	if err := s.Err(); err != nil {
		return err
	}
	h.StreamID, h.Sequence, h.CapRef = DataStream, s.wseq+1, s.capRef()
	b, err := wire.AppendFrameExt(d.buf, h, ext, m)
	if err != nil {
		return fmt.Errorf("control: encode %v: %w", h.Type, err)
	}
	d.buf = b
	s.wseq++
	return nil
}

// stallAfter is how long a write lasts before Stalled says the socket is
// full: a write to a Unix socket with room takes microseconds.
// stallAfterStream is the same for a stream the session's flusher writes
// whole (TLS, gRPC): a TCP write runs the receiver's network stack and
// a record's encryption, which on a busy host can take milliseconds, and
// calling that a full socket dropped events a subscriber keeping up
// should have had.
const (
	stallAfter       = time.Millisecond
	stallAfterStream = 20 * time.Millisecond
)

// Stalled reports whether a write to the socket has been waiting for the
// peer to read for a while: a sender that must not wait gives up.
func (d *Inline) Stalled() bool {
	t := d.writing.Load()
	if t == 0 {
		return false
	}
	after := stallAfter
	if d.s.fdr.c == nil {
		after = stallAfterStream
	}
	return time.Now().UnixNano()-t > int64(after)
}

// ErrFull is a TryWrite that found the socket full.
var ErrFull = errors.New("control: the socket is full: the peer reads too slowly")

// TryWrite is Write for a sender that must not wait for the peer (an event
// under a drop policy): it fails with ErrFull, writing nothing, when
// another writer holds the socket or what was written before has not all
// left yet (the peer reads more slowly than we write). A frame it takes
// goes out at once, as far as the socket has room; the rest leaves with
// the next write, at the latest the next heartbeat.
func (d *Inline) TryWrite(h frame.Header, ext []byte, m wire.Message) error {
	s := d.s
	for !s.wmu.TryLock() {
		// Held: briefly by another writer, or by one that waits for a
		// full socket.
		if d.Stalled() {
			return ErrFull
		}
		runtime.Gosched()
	}
	defer s.wmu.Unlock()
	if d.backlog {
		if err := d.writeNow(); err != nil {
			return err
		}
		if d.backlog {
			return ErrFull
		}
	}
	if s.fdr.c == nil && len(d.buf) >= maxKeptWrite {
		return ErrFull // the flusher has not written what went before
	}
	if err := d.appendLocked(h, ext, m); err != nil {
		return err
	}
	return d.writeNow()
}

// kickFlusher has the session's flusher write buf (a stream other than
// a Unix socket), starting it at the first call; under Session.wmu.
func (d *Inline) kickFlusher() {
	if d.kick == nil {
		d.kick = make(chan struct{}, 1)
		go d.flusher()
	}
	select {
	case d.kick <- struct{}{}:
	default: // it has a kick pending, which writes everything
	}
}

// flusher writes what TryWrite left in buf, once per kick, until the
// session ends.
func (d *Inline) flusher() {
	for {
		select {
		case <-d.s.done:
			return
		case <-d.kick:
		}
		d.s.wmu.Lock()
		d.flushLocked()
		d.s.wmu.Unlock()
	}
}

// writeNow writes as much of buf as the socket takes without waiting;
// under Session.wmu.
func (d *Inline) writeNow() error {
	s := d.s
	if err := s.Err(); err != nil {
		return err
	}
	if len(d.buf) == 0 {
		d.backlog = false
		return nil
	}
	if s.fdr.c == nil {
		// A stream without a non-blocking write (TLS: a write cut short
		// breaks the connection): the session's flusher writes the
		// buffer whole, within the write timeout, so that TryWrite never
		// waits; while it waits for a full socket, TryWrite fails with
		// ErrFull (wmu is held: Stalled), and so does a buffer of
		// maxKeptWrite not yet written.
		d.kickFlusher()
		return nil
	}
	err := s.fdr.rc.Write(d.wfn)
	if err == nil && d.werr != nil && d.werr != unix.EAGAIN {
		err = d.werr
	}
	if err != nil {
		err = fmt.Errorf("%w: data-plane write: %w", ErrPeerGone, writeErr(err))
		s.fail(err)
		return err
	}
	n := max(d.wn, 0)
	d.buf = d.buf[:copy(d.buf, d.buf[n:])]
	d.backlog = len(d.buf) > 0
	return nil
}

// Flush writes the frames Write buffered.
func (d *Inline) Flush() error {
	d.s.wmu.Lock()
	defer d.s.wmu.Unlock()
	return d.flushLocked()
}

// flushLocked writes the buffer, under Session.wmu, within the write
// timeout. A failed write ends the session.
func (d *Inline) flushLocked() error {
	if len(d.buf) == 0 {
		return nil
	}
	s := d.s
	now := time.Now()
	s.conn.SetWriteDeadline(now.Add(s.deadAfter()))
	d.writing.Store(now.UnixNano())
	_, err := s.conn.Write(d.buf)
	d.writing.Store(0)
	d.buf, d.backlog = d.buf[:0], false
	if cap(d.buf) > maxKeptWrite {
		d.buf = nil
	}
	if err != nil {
		if e := s.Err(); e != nil {
			return e
		}
		err = fmt.Errorf("%w: data-plane write: %w", ErrPeerGone, writeErr(err))
		s.fail(err)
	}
	return err
}

// endErr is why the session ended.
func (d *Inline) endErr() error {
	if err := d.s.Err(); err != nil {
		return err
	}
	return ErrSessionClosed
}
