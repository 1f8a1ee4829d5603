package frame

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

const (
	minReadBuf    = 4 << 10 // first buffer; also the read granularity
	maxEmptyReads = 100     // consecutive (0, nil) reads before io.ErrNoProgress
)

// Reader decodes frames from a byte stream (Unix socket, TCP). Frames may
// arrive split at any byte. It holds one buffer, grown on demand up to the
// largest frame the Config admits and then reused: the Frame returned by
// ReadFrame, and the Extension and Payload views inside it, are only valid
// until the next call to ReadFrame. Callers that keep a payload must copy
// it. (Builds with -race overwrite the previous frame's bytes on the next
// call, so that code violating this rule fails its tests.)
//
// A Reader is not safe for concurrent use. After any error other than a
// clean io.EOF the framing is lost: every later call returns the same
// error and the connection should be closed.
type Reader struct {
	r    io.Reader
	cfg  Config
	buf  []byte
	head int // first unconsumed byte of buf
	tail int // end of the bytes read so far
	prev int // start of the frame returned last; buf[prev:head] is its bytes
	f    Frame
	err  error
}

// NewReader returns a Reader of frames from r limited by cfg. An invalid
// cfg makes the first ReadFrame fail with ErrConfig.
func NewReader(r io.Reader, cfg Config) *Reader {
	fr := &Reader{r: r, cfg: cfg}
	if err := cfg.Validate(); err != nil {
		fr.err = err
	}
	return fr
}

// ReadFrame reads the next frame. It returns io.EOF when the stream ends
// cleanly between frames and io.ErrUnexpectedEOF when it ends inside a
// frame. Garbage fails with the decoding sentinel (ErrBadMagic,
// ErrVersion, ErrTooLarge, ...) as soon as the fixed header is complete,
// before the announced payload is read or any buffer is grown for it.
//
// The returned Frame is owned by the Reader and valid until the next call.
func (r *Reader) ReadFrame() (*Frame, error) {
	if r.err != nil {
		return nil, r.err
	}
	poison(r.buf[r.prev:r.head]) // the previous frame is no longer valid
	r.prev = r.head
	r.f = Frame{}

	// Check the magic as soon as it is there: garbage shorter than a
	// header (a stray HTTP request, say) fails with ErrBadMagic, not with
	// a wait for bytes that never come.
	if err := r.fill(4); err != nil {
		return nil, r.fail(err)
	}
	if m := binary.LittleEndian.Uint32(r.buf[r.head:]); m != Magic {
		return nil, r.fail(fmt.Errorf("%w: %#08x", ErrBadMagic, m))
	}
	if err := r.fill(HeaderSize); err != nil {
		return nil, r.fail(err)
	}
	var h Header
	if err := h.Decode(r.buf[r.head:r.tail], r.cfg); err != nil {
		return nil, r.fail(err)
	}
	n := h.FrameLen() // validated: at most MaxHeaderLen + cfg.Limit()
	if err := r.fill(n); err != nil {
		return nil, r.fail(err)
	}
	if _, err := r.f.Decode(r.buf[r.head:r.head+n], r.cfg); err != nil {
		return nil, r.fail(err)
	}
	r.prev = r.head
	r.head += n
	return &r.f, nil
}

// Buffered is the number of bytes read from the stream and not yet
// returned in a frame: a frame may be complete among them without a read.
func (r *Reader) Buffered() int { return r.tail - r.head }

// SetConfig replaces the limits of the frames read from now on (a control
// socket whose data plane is negotiated inline accepts larger payloads
// after its handshake). Bytes already buffered are kept. An invalid cfg
// is refused with ErrConfig and changes nothing.
func (r *Reader) SetConfig(cfg Config) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	r.cfg = cfg
	return nil
}

func (r *Reader) fail(err error) error {
	r.f = Frame{}
	r.err = err
	return err
}

// fill makes at least n bytes available in buf[head:tail]. n has been
// validated against the Config, so growing the buffer to n is bounded.
func (r *Reader) fill(n int) error {
	if r.tail-r.head >= n {
		return nil
	}
	if len(r.buf)-r.head < n {
		if len(r.buf) < n {
			size := max(2*len(r.buf), minReadBuf, n)
			size = min(size, max(n, MaxHeaderLen+r.cfg.Limit()))
			nb := make([]byte, size)
			r.tail = copy(nb, r.buf[r.head:r.tail])
			r.buf = nb
		} else {
			r.tail = copy(r.buf, r.buf[r.head:r.tail])
		}
		r.head, r.prev = 0, 0
	}
	for empty := 0; r.tail-r.head < n; {
		m, err := r.r.Read(r.buf[r.tail:])
		if m < 0 || m > len(r.buf)-r.tail {
			return errors.New("frame: reader returned invalid count")
		}
		r.tail += m
		if r.tail-r.head >= n {
			return nil
		}
		switch {
		case errors.Is(err, io.EOF):
			if r.tail == r.head {
				return io.EOF
			}
			return io.ErrUnexpectedEOF
		case err != nil:
			return err
		case m == 0:
			if empty++; empty >= maxEmptyReads {
				return io.ErrNoProgress
			}
		default:
			empty = 0
		}
	}
	return nil
}

// Writer encodes frames onto a byte stream, one Write call per frame, with
// one reused buffer. It is not safe for concurrent use.
type Writer struct {
	w   io.Writer
	cfg Config
	buf []byte
	err error
}

// NewWriter returns a Writer to w. cfg is the peer's receiving limit:
// WriteFrame refuses larger payloads with ErrTooLarge instead of sending a
// frame the peer would reject. An invalid cfg makes WriteFrame fail with
// ErrConfig.
func NewWriter(w io.Writer, cfg Config) *Writer {
	fw := &Writer{w: w, cfg: cfg}
	if err := cfg.Validate(); err != nil {
		fw.err = err
	}
	return fw
}

// WriteFrame encodes f and writes it with a single Write call. A frame that
// cannot be encoded is reported without writing anything; the Writer
// remains usable. A failed or short Write is sticky: the stream is corrupt
// and every later call returns the same error.
func (w *Writer) WriteFrame(f *Frame) error {
	if w.err != nil {
		return w.err
	}
	if lim := w.cfg.Limit(); len(f.Payload) > lim {
		return fmt.Errorf("%w: %d bytes, peer limit %d", ErrTooLarge, len(f.Payload), lim)
	}
	b, err := f.Append(w.buf[:0])
	if err != nil {
		return err
	}
	w.buf = b
	n, err := w.w.Write(b)
	if err == nil && n != len(b) {
		err = io.ErrShortWrite
	}
	if err != nil {
		w.err = err
	}
	return err
}
