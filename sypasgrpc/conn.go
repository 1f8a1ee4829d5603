package sypasgrpc

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sypas/go/wire"
)

// msgStream is what Conn needs of a gRPC stream: grpc.ClientStream and
// grpc.ServerStream both have it.
type msgStream interface {
	SendMsg(m any) error
	RecvMsg(m any) error
}

// Conn is a Session stream as a net.Conn: the byte stream that the control
// handshake and the inline data plane (docs/PROTOCOL.md §8.6) run on. Write
// sends its bytes as one or more messages (at most MaxChunk bytes each);
// Read hands out the bytes of received messages in order, whatever their
// boundaries. A background goroutine receives: at most two messages wait
// in memory (each bounded by grpc's receive limit), after which the peer's
// sends wait on HTTP/2 flow control, so a reader that stops reading holds
// back the sender rather than growing memory.
//
// Close may be called at any time from any goroutine: a Read or Write
// blocked in it returns an error matching net.ErrClosed. Closing the
// client's end half-closes the stream after what was written (nothing
// written before Close is lost) and cancels it once the server has ended
// its side, or after Linger. A read deadline that passes makes Read
// return os.ErrDeadlineExceeded and leaves the Conn usable; a write
// deadline that passes while a Write waits for flow control breaks the
// Conn (the message may or may not have gone: the stream's bytes are no
// longer known), as crypto/tls does: the stream is ended, and every later
// Write and Read fails.
type Conn struct {
	s         msgStream
	end       func()       // ends the stream at once (client: cancel; server: the handler returns)
	closeSend func() error // the client's half-close, for an orderly Close; nil on the server
	local     net.Addr
	remote    net.Addr

	closed    chan struct{}
	closeOnce sync.Once

	// Receiving: the receiver goroutine fills chunks from free and queues
	// them on in; Read takes them and gives them back once consumed.
	in    chan *chunk
	free  chan *chunk
	rerr  error         // why the receiver stopped; written before in is closed
	rdone chan struct{} // the receiver stopped
	rmu   sync.Mutex    // one Read at a time
	cur   *chunk        // the chunk Read is consuming; rmu
	off   int           // bytes of cur already read; rmu
	rdl   deadline

	// Sending.
	wmu     sync.Mutex // one Write at a time: SendMsg is not for concurrent use
	out     chunk
	werr    atomic.Pointer[error] // a broken write's error, returned from then on
	wdlMu   sync.Mutex
	wdl     time.Time   // the write deadline; wdlMu
	writing bool        // a Write is in SendMsg; wdlMu
	wtimer  *time.Timer // breaks the Write in progress at its deadline; wdlMu
}

// MaxChunk bounds the bytes one message of Write carries. It is below
// grpc's default receive limit (4 MiB) with room to spare, and large
// enough that a burst of frames goes as one message.
const MaxChunk = 1 << 20

// Linger bounds how long a closed client Conn waits for the server to end
// the stream before cancelling it.
const Linger = 5 * time.Second

// newConn starts the receiver of s. end must make s's blocked SendMsg and
// RecvMsg return; closeSend (nil on a server) half-closes the stream.
func newConn(s msgStream, end func(), closeSend func() error, local, remote net.Addr) *Conn {
	c := &Conn{
		s: s, end: end, closeSend: closeSend, local: local, remote: remote,
		closed: make(chan struct{}),
		in:     make(chan *chunk, 2),
		free:   make(chan *chunk, 2),
		rdone:  make(chan struct{}),
		rdl:    makeDeadline(),
	}
	c.free <- new(chunk)
	c.free <- new(chunk)
	go c.receive()
	return c
}

// receive moves messages from the stream to in until the stream ends.
func (c *Conn) receive() {
	defer close(c.rdone)
	defer close(c.in)
	for {
		var ch *chunk
		select {
		case ch = <-c.free:
		case <-c.closed:
			c.rerr = net.ErrClosed
			c.discard()
			return
		}
		if err := c.s.RecvMsg(ch); err != nil {
			c.rerr = err
			return
		}
		if len(ch.b) == 0 {
			c.free <- ch
			continue
		}
		c.in <- ch // never waits: in has room for both chunks
	}
}

// discard reads and drops what the peer still sends after Close, so that
// the server sees the client's orderly end (client Conns, until Linger).
func (c *Conn) discard() {
	var ch chunk
	for c.s.RecvMsg(&ch) == nil {
	}
}

// Read reads the next bytes of the stream into p.
func (c *Conn) Read(p []byte) (int, error) {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	if c.isClosed() {
		return 0, c.opErr("read", net.ErrClosed)
	}
	if len(p) == 0 {
		return 0, nil
	}
	if c.cur == nil {
		select {
		case ch, ok := <-c.in:
			if !ok {
				return 0, c.readErr()
			}
			c.cur, c.off = ch, 0
		default:
			select {
			case ch, ok := <-c.in:
				if !ok {
					return 0, c.readErr()
				}
				c.cur, c.off = ch, 0
			case <-c.rdl.wait():
				return 0, c.opErr("read", os.ErrDeadlineExceeded)
			case <-c.closed:
				return 0, c.opErr("read", net.ErrClosed)
			}
		}
	}
	n := copy(p, c.cur.b[c.off:])
	if c.off += n; c.off == len(c.cur.b) {
		if cap(c.cur.b) > MaxChunk {
			// Our peers' messages are at most MaxChunk: a larger one
			// (another implementation's) is not kept for the stream's
			// life, so two chunks hold at most 2 × MaxChunk.
			c.cur.b = nil
		}
		c.free <- c.cur // room: free holds both chunks
		c.cur = nil
	}
	return n, nil
}

// readErr is what Read returns once the receiver stopped: io.EOF for the
// peer's orderly end.
func (c *Conn) readErr() error {
	if c.isClosed() {
		return c.opErr("read", net.ErrClosed)
	}
	if err := c.broken(); err != nil {
		return err
	}
	if c.rerr == io.EOF {
		return io.EOF
	}
	return c.opErr("read", streamErr(c.rerr))
}

// Write sends p, in messages of at most MaxChunk bytes.
func (c *Conn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	n := 0
	for {
		if c.isClosed() {
			return n, c.opErr("write", net.ErrClosed)
		}
		if err := c.broken(); err != nil {
			return n, err
		}
		k := min(len(p)-n, MaxChunk)
		if err := c.send(p[n : n+k]); err != nil {
			return n, err
		}
		if n += k; n == len(p) {
			return n, nil
		}
	}
}

// send sends one message under the write deadline: a deadline that passes
// while SendMsg waits ends the stream (break), which makes SendMsg return.
func (c *Conn) send(b []byte) error {
	c.wdlMu.Lock()
	if !c.wdl.IsZero() && !time.Now().Before(c.wdl) {
		c.wdlMu.Unlock()
		return c.opErr("write", os.ErrDeadlineExceeded)
	}
	if c.isClosed() { // Close looks at writing under wdlMu: it ends the stream, or we stop here
		c.wdlMu.Unlock()
		return c.opErr("write", net.ErrClosed)
	}
	c.writing = true
	c.armWrite()
	c.wdlMu.Unlock()

	c.out.b = b
	err := c.s.SendMsg(&c.out)
	c.out.b = nil

	c.wdlMu.Lock()
	c.writing = false
	if c.wtimer != nil {
		c.wtimer.Stop()
	}
	c.wdlMu.Unlock()
	if broken := c.broken(); broken != nil {
		return broken
	}
	if err != nil {
		if c.isClosed() {
			return c.opErr("write", net.ErrClosed)
		}
		if errors.Is(err, io.EOF) {
			err = c.endStatus()
		}
		return c.opErr("write", streamErr(err))
	}
	return nil
}

// endStatus is why the stream ended, when SendMsg says only that it did
// (io.EOF): grpc gives the status to RecvMsg, so the receiver has it soon
// (unless it waits for Read to take what it holds: then io.EOF it stays).
func (c *Conn) endStatus() error {
	t := time.NewTimer(100 * time.Millisecond)
	defer t.Stop()
	select {
	case <-c.rdone:
		if c.rerr != nil && c.rerr != net.ErrClosed {
			return c.rerr
		}
	case <-t.C:
	}
	return io.EOF
}

// armWrite sets the timer that breaks the Write in progress at the write
// deadline; under wdlMu. One timer serves every Write: writeExpired looks
// at the deadline itself, so a late run of it cannot break a Write whose
// deadline has not passed.
func (c *Conn) armWrite() {
	switch {
	case c.wdl.IsZero():
		if c.wtimer != nil {
			c.wtimer.Stop()
		}
	case c.wtimer == nil:
		c.wtimer = time.AfterFunc(time.Until(c.wdl), c.writeExpired)
	default:
		c.wtimer.Reset(time.Until(c.wdl))
	}
}

// writeExpired breaks the Conn if a Write is in SendMsg past the write
// deadline.
func (c *Conn) writeExpired() {
	c.wdlMu.Lock()
	hit := c.writing && !c.wdl.IsZero() && !time.Now().Before(c.wdl)
	c.wdlMu.Unlock()
	if !hit {
		return
	}
	err := c.opErr("write", os.ErrDeadlineExceeded)
	if c.werr.CompareAndSwap(nil, &err) {
		c.end()
	}
}

// broken is the error of a Write past its deadline, which broke the Conn;
// nil if none did.
func (c *Conn) broken() error {
	if p := c.werr.Load(); p != nil {
		return *p
	}
	return nil
}

// Close ends the Conn: see the type's comment. It is idempotent and never
// blocks on the peer.
func (c *Conn) Close() error {
	first := false
	c.closeOnce.Do(func() {
		first = true
		close(c.closed)
		c.rdl.close()
	})
	if !first {
		return nil
	}
	c.wdlMu.Lock()
	writing := c.writing
	c.wdlMu.Unlock()
	if writing || c.closeSend == nil {
		// A Write waits for flow control: its bytes are lost anyway, and
		// CloseSend may not run beside SendMsg.
		c.end()
		return nil
	}
	go c.linger()
	return nil
}

// linger ends a closed client Conn in order: it half-closes the stream
// after what was written (a Write that began just before Close is done:
// wmu), waits up to Linger for the server to end its side, then cancels.
// No Write waits for it: they fail at once on the closed Conn.
func (c *Conn) linger() {
	defer c.end()
	c.wmu.Lock()
	err := c.closeSend()
	c.wmu.Unlock()
	if err != nil {
		return
	}
	t := time.NewTimer(Linger)
	defer t.Stop()
	select {
	case <-c.rdone: // the server ended the stream
	case <-t.C:
	}
}

func (c *Conn) isClosed() bool { return isDone(c.closed) }

// LocalAddr and RemoteAddr are the gRPC connection's, when known.
func (c *Conn) LocalAddr() net.Addr  { return c.local }
func (c *Conn) RemoteAddr() net.Addr { return c.remote }

// SetDeadline sets both deadlines.
func (c *Conn) SetDeadline(t time.Time) error {
	c.SetReadDeadline(t)
	return c.SetWriteDeadline(t)
}

// SetReadDeadline bounds Read, as net.Conn says; a past time wakes a
// blocked Read.
func (c *Conn) SetReadDeadline(t time.Time) error {
	if c.isClosed() {
		return c.opErr("set deadline", net.ErrClosed)
	}
	c.rdl.set(t)
	return nil
}

// SetWriteDeadline bounds Write; one passing while a Write waits breaks
// the Conn (see the type's comment).
func (c *Conn) SetWriteDeadline(t time.Time) error {
	if c.isClosed() {
		return c.opErr("set deadline", net.ErrClosed)
	}
	c.wdlMu.Lock()
	defer c.wdlMu.Unlock()
	c.wdl = t
	if c.writing {
		c.armWrite()
	}
	return nil
}

func (c *Conn) opErr(op string, err error) error {
	return &net.OpError{Op: op, Net: "grpc", Source: c.local, Addr: c.remote, Err: err}
}

// streamErr turns a stream's end into the error a net.Conn user (the
// control plane) expects: a stream that broke (the connection lost, the
// peer's server stopped, a cancel) is a connection reset, which the
// session reports as the peer gone and a Client reconnects after; a
// refusal with a status of its own (PermissionDenied...) becomes the
// *wire.Error of the same meaning, keeping the status's message.
func streamErr(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	s, ok := status.FromError(err)
	if !ok {
		return err
	}
	switch s.Code() {
	case codes.Unavailable, codes.Canceled, codes.Internal, codes.Unknown, codes.Aborted:
		return fmt.Errorf("%w (%w)", syscall.ECONNRESET, err)
	}
	return &wire.Error{Code: wireCode(s.Code()), Message: s.Message(), Err: err}
}

// deadline is a settable point in time as a channel that is closed once
// it passes (the shape of net.Pipe's deadlines): Read selects on it.
type deadline struct {
	mu     sync.Mutex
	timer  *time.Timer
	cancel chan struct{} // closed when the deadline passes
}

func makeDeadline() deadline { return deadline{cancel: make(chan struct{})} }

// set sets the deadline; zero means none. A past t closes the channel now.
func (d *deadline) set(t time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.timer != nil && !d.timer.Stop() {
		<-d.cancel // the timer's func closed it, or is about to
	}
	d.timer = nil
	closed := isDone(d.cancel)
	if t.IsZero() {
		if closed {
			d.cancel = make(chan struct{})
		}
		return
	}
	if dur := time.Until(t); dur > 0 {
		if closed {
			d.cancel = make(chan struct{})
		}
		ch := d.cancel
		d.timer = time.AfterFunc(dur, func() { close(ch) })
		return
	}
	if !closed {
		close(d.cancel)
	}
}

// wait is the channel to select on.
func (d *deadline) wait() <-chan struct{} {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.cancel
}

// close stops the timer (the Conn is closed).
func (d *deadline) close() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.timer != nil {
		d.timer.Stop()
	}
}

func isDone(ch chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}
