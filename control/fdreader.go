package control

import (
	"fmt"
	"net"
	"os"
	"strconv"

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
type fdReader struct {
	c       *net.UnixConn
	oob     []byte
	off     int64 // stream bytes read so far
	pending []fdBatch
}

type fdBatch struct {
	end   int64 // stream offset just after the read that delivered files
	files []*os.File
}

func newFDReader(c *net.UnixConn) *fdReader {
	return &fdReader{c: c, oob: make([]byte, unix.CmsgSpace((MaxFDs+1)*4))}
}

func (r *fdReader) Read(p []byte) (int, error) {
	n, oobn, flags, _, err := r.c.ReadMsgUnix(p, r.oob)
	if n < 0 {
		n = 0
	}
	r.off += int64(n)
	if oobn == 0 && flags&unix.MSG_CTRUNC == 0 {
		return n, err
	}
	fds, perr := parseRights(r.oob[:oobn])
	if perr == nil && flags&unix.MSG_CTRUNC != 0 {
		perr = fmt.Errorf("%w: control data truncated (more than %d fds)", ErrFDPassing, MaxFDs)
	}
	if perr != nil {
		for _, fd := range fds {
			unix.Close(fd)
		}
		return n, perr
	}
	files := make([]*os.File, len(fds))
	for i, fd := range fds {
		files[i] = os.NewFile(uintptr(fd), "fd:"+strconv.Itoa(fd))
	}
	r.pending = append(r.pending, fdBatch{end: r.off, files: files})
	return n, err
}

// claim returns the descriptors that arrived with the frame occupying
// stream bytes [start, end) and checks that no earlier frame got any.
// want < 0 means the frame may carry none. On a mismatch every descriptor
// involved is closed and the error wraps ErrFDPassing.
func (r *fdReader) claim(start, end int64, want int) ([]*os.File, error) {
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
