package control

import (
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"
)

// fdReader is the io.Reader under a session's frame.Reader. It reads with
// recvmsg and room for MaxFDs+1 descriptors, so that descriptors sent with
// a frame are never lost: a plain read(2) of the bytes that carry
// SCM_RIGHTS makes the kernel close the descriptors (scm_recv without a
// control buffer), and a buffered frame reader cannot know which read will
// reach the REGIONS frame. Each batch of descriptors is recorded with the
// stream offset where the read that delivered it ended; claim matches it to
// the frame whose bytes that read ended in.
//
// RecvFDs is not used here for that reason: it needs the count before the
// read, and its buffer would swallow the frames around REGIONS.
//
// Descriptors are bounded as they arrive, not when a frame is complete.
// recvmsg stops after every message that carries descriptors, so a peer
// that sends a frame one byte per sendmsg, each with MaxFDs descriptors,
// would otherwise make us hold MaxFDs descriptors per byte until the frame
// ends. Read therefore fails, closing everything it holds, as soon as a
// batch arrives while fds is false (the kernel, except for the daemon's
// REGIONS when BULK is granted; a daemon once REGIONS has been read), or a second batch arrives before
// the first was claimed, or a batch holds more than MaxFDs. At most MaxFDs
// descriptors are ever held.
//
// On a stream that is not a Unix socket (TLS, gRPC) c is nil and Read is
// a plain read of nc: no descriptor can come.
type fdReader struct {
	c       *net.UnixConn
	nc      net.Conn
	pb      [1]byte // nc only: a byte peekByte read, handed out first
	peeked  bool
	oob     []byte
	off     int64 // stream bytes read so far
	pending []fdBatch
	// fds: one batch of descriptors may still come (a daemon before
	// REGIONS; the kernel once it has sent REGIONS with BULK granted).
	// claim of a frame that may carry descriptors clears it.
	fds bool
	err error // sticky: the first fd-passing violation

	// recvmsg(2) through the runtime's poller, without asking for the
	// sender's address (ReadMsgUnix allocates it on every read: an
	// inline data plane reads here per frame). recv is made once, so a
	// read allocates nothing; it works on the fields below.
	raw               bool // read with recvmsg below, not ReadMsgUnix: inline sessions
	rc                syscall.RawConn
	recv              func(fd uintptr) bool
	rp                []byte
	rn, roobn, rflags int
	rerr              error
}

type fdBatch struct {
	end   int64 // stream offset just after the read that delivered files
	files []*os.File
}

// newFDReader reads conn; fds says whether one batch of descriptors may
// come (never on anything but a Unix socket).
func newFDReader(conn net.Conn, fds bool) *fdReader {
	c, ok := conn.(*net.UnixConn)
	if !ok {
		return &fdReader{nc: conn}
	}
	r := &fdReader{c: c, nc: conn, oob: make([]byte, unix.CmsgSpace((MaxFDs+1)*4)), fds: fds}
	r.rc, r.rerr = c.SyscallConn()
	r.recv = func(fd uintptr) bool {
		for {
			r.rn, r.roobn, r.rflags, r.rerr = recvmsg(int(fd), r.rp, r.oob, unix.MSG_CMSG_CLOEXEC)
			switch r.rerr {
			case unix.EINTR:
				continue
			case unix.EAGAIN:
				return false // wait for the socket, then again
			}
			return true
		}
	}
	return r
}

// readMsg is ReadMsgUnix without the sender's address: io.EOF at the end
// of the stream, os.ErrDeadlineExceeded and net.ErrClosed (wrapped) from
// the poller.
func (r *fdReader) readMsg(p []byte) (n, oobn, flags int, err error) {
	if r.rc == nil {
		return 0, 0, 0, r.rerr
	}
	if len(p) == 0 {
		return 0, 0, 0, nil
	}
	r.rp = p
	if err := r.rc.Read(r.recv); err != nil {
		r.rp = nil
		return 0, 0, 0, err
	}
	r.rp = nil
	if r.rerr != nil {
		return 0, 0, 0, r.rerr
	}
	if r.rn == 0 && r.roobn == 0 {
		return 0, 0, 0, io.EOF
	}
	return r.rn, r.roobn, r.rflags, nil
}

func (r *fdReader) Read(p []byte) (int, error) {
	if r.err != nil {
		return 0, r.err
	}
	if r.c == nil {
		if r.peeked && len(p) > 0 {
			p[0], r.peeked = r.pb[0], false
			return 1, nil
		}
		return r.nc.Read(p)
	}
	var n, oobn, flags int
	var err error
	if r.raw {
		n, oobn, flags, err = r.readMsg(p)
	} else {
		n, oobn, flags, _, err = r.c.ReadMsgUnix(p, r.oob)
	}
	if n < 0 {
		n = 0
	}
	r.off += int64(n)
	if oobn == 0 && flags&unix.MSG_CTRUNC == 0 {
		return n, err
	}
	fds, perr := parseRights(r.oob[:oobn])
	switch {
	case perr != nil:
	case flags&unix.MSG_CTRUNC != 0:
		perr = fmt.Errorf("%w: control data truncated (more than %d fds)", ErrFDPassing, MaxFDs)
	case len(fds) > MaxFDs:
		perr = fmt.Errorf("%w: %d fds in one message, at most %d", ErrFDPassing, len(fds), MaxFDs)
	case !r.fds:
		perr = fmt.Errorf("%w: %d fds where none may come", ErrFDPassing, len(fds))
	case len(r.pending) > 0:
		perr = fmt.Errorf("%w: a second batch of %d fds before a frame claimed the first", ErrFDPassing, len(fds))
	}
	if perr != nil {
		for _, fd := range fds {
			unix.Close(fd)
		}
		r.close()
		// No bytes with the error: a frame.Reader ignores an error that
		// comes with the bytes it was waiting for.
		r.err = perr
		return 0, perr
	}
	files := make([]*os.File, len(fds))
	for i, fd := range fds {
		files[i] = os.NewFile(uintptr(fd), "fd:"+strconv.Itoa(fd))
	}
	r.pending = append(r.pending, fdBatch{end: r.off, files: files})
	return n, err
}

// peekByte waits for nc to have a byte (or an end) and reads it, to be
// handed out by the next Read: the kernel's inline reader waits for a
// frame this way on a stream that cannot be peeked at (TLS, gRPC). A
// deadline that ends the wait takes nothing: net.Conn and tls.Conn reads
// resume after a timeout. An error that comes with the byte waits for the
// next Read.
func (r *fdReader) peekByte() error {
	if r.peeked {
		return nil
	}
	n, err := r.nc.Read(r.pb[:])
	if n == 1 {
		r.peeked = true
		return nil
	}
	return err
}

// claim returns the descriptors that arrived with the frame occupying
// stream bytes [start, end) and checks that no earlier frame got any.
// want < 0 means the frame may carry none; want >= 0 (REGIONS) also means
// no descriptor may come after it. On a mismatch every descriptor involved
// is closed and the error wraps ErrFDPassing.
func (r *fdReader) claim(start, end int64, want int) ([]*os.File, error) {
	if want >= 0 {
		r.fds = false
	}
	if r.err != nil {
		return nil, r.err
	}
	var got []*os.File
	var stray, batches int
	keep := r.pending[:0]
	for _, b := range r.pending {
		switch {
		case b.end > end: // belongs to a later frame
			keep = append(keep, b)
		case b.end > start && want >= 0:
			got = append(got, b.files...)
			batches++
		default:
			stray += len(b.files)
			closeFiles(b.files)
		}
	}
	clear(r.pending[len(keep):])
	r.pending = keep
	switch {
	case stray > 0:
		closeFiles(got)
		return nil, fmt.Errorf("%w: %d fds arrived with a frame that carries none", ErrFDPassing, stray)
	case want < 0:
		return nil, nil
	case batches > 1 || len(got) != want:
		closeFiles(got)
		return nil, fmt.Errorf("%w: got %d fds in %d messages, REGIONS announces %d", ErrFDPassing, len(got), batches, want)
	}
	return got, nil
}

// close closes every descriptor not yet claimed.
func (r *fdReader) close() {
	for _, b := range r.pending {
		closeFiles(b.files)
	}
	r.pending = nil
}

func closeFiles(files []*os.File) {
	for _, f := range files {
		if f != nil {
			f.Close()
		}
	}
}
