package control

import (
	"fmt"
	"io"
	"net"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// MaxFDs bounds the descriptors one message may carry (SCM_MAX_FD is 253;
// SYPAS needs a handful of regions per message).
const MaxFDs = 16

// SendFDs writes payload with files attached as one SCM_RIGHTS message.
// The payload must not be empty: a stream socket delivers the rights with
// the first payload byte, and a receiver blocked in recvmsg waits for data.
// The files stay open and owned by the caller. Honours conn's write deadline.
func SendFDs(conn *net.UnixConn, payload []byte, files ...*os.File) error {
	if len(payload) == 0 {
		return fmt.Errorf("%w: empty payload", ErrFDPassing)
	}
	if len(files) == 0 || len(files) > MaxFDs {
		return fmt.Errorf("%w: %d files, want 1..%d", ErrFDPassing, len(files), MaxFDs)
	}
	return withFDs(files, make([]int, 0, len(files)), func(fds []int) error {
		n, oobn, err := conn.WriteMsgUnix(payload, unix.UnixRights(fds...), nil)
		if err != nil {
			return err
		}
		if n != len(payload) || oobn == 0 {
			return io.ErrShortWrite
		}
		return nil
	})
}

// withFDs calls fn with the descriptors of files, holding each one through
// its SyscallConn.Control so a concurrent Close cannot recycle a number
// mid-send. (File.Fd would also switch the file to blocking mode.)
func withFDs(files []*os.File, fds []int, fn func([]int) error) error {
	if len(files) == 0 {
		return fn(fds)
	}
	rc, err := files[0].SyscallConn()
	if err != nil {
		return err
	}
	var inner error
	if err := rc.Control(func(fd uintptr) {
		inner = withFDs(files[1:], append(fds, int(fd)), fn)
	}); err != nil {
		return err
	}
	return inner
}

// RecvFDs reads one message into buf and expects exactly want descriptors
// (0..MaxFDs) with it, in a single SCM_RIGHTS control message. The stdlib
// receives with MSG_CMSG_CLOEXEC on Linux (net/unixsock_readmsg_cmsg_cloexec.go),
// so no descriptor can leak into a concurrently forked child. Truncated
// control data (MSG_CTRUNC), a different count, or any other control
// message fail with ErrFDPassing; every descriptor received is closed on
// every error path. n bytes of buf hold the payload; io.EOF when the peer
// has closed. Honours conn's read deadline.
func RecvFDs(conn *net.UnixConn, buf []byte, want int) (n int, files []*os.File, err error) {
	if want < 0 || want > MaxFDs {
		return 0, nil, fmt.Errorf("%w: want %d fds, at most %d", ErrFDPassing, want, MaxFDs)
	}
	// Room for one fd more than wanted, so an extra one shows up as a count
	// mismatch; beyond that the kernel truncates (MSG_CTRUNC) and closes the
	// rest itself.
	return recvFDs(conn, buf, want, unix.CmsgSpace((want+1)*4))
}

func recvFDs(conn *net.UnixConn, buf []byte, want, oobSize int) (int, []*os.File, error) {
	if len(buf) == 0 {
		return 0, nil, fmt.Errorf("%w: empty buffer", ErrFDPassing)
	}
	oob := make([]byte, oobSize)
	n, oobn, flags, _, rerr := conn.ReadMsgUnix(buf, oob)
	fds, perr := parseRights(oob[:oobn])
	fail := func(err error) (int, []*os.File, error) {
		for _, fd := range fds {
			unix.Close(fd)
		}
		return 0, nil, err
	}
	switch {
	case rerr != nil:
		return fail(rerr)
	case perr != nil:
		return fail(perr)
	case flags&unix.MSG_CTRUNC != 0:
		return fail(fmt.Errorf("%w: control data truncated", ErrFDPassing))
	case n == 0 && oobn == 0:
		return fail(io.EOF)
	case len(fds) != want:
		return fail(fmt.Errorf("%w: got %d fds, want %d", ErrFDPassing, len(fds), want))
	}
	files := make([]*os.File, len(fds))
	for i, fd := range fds {
		files[i] = os.NewFile(uintptr(fd), "fd:"+strconv.Itoa(fd))
	}
	return n, files, nil
}

// parseRights walks the control messages. It collects the descriptors of
// every SCM_RIGHTS message, even ones it will reject, so the caller can
// close them; it fails on anything but exactly one SCM_RIGHTS message (or
// none). The kernel wrote oob, but it is read as untrusted all the same.
func parseRights(oob []byte) (fds []int, err error) {
	count := 0
	for len(oob) > 0 {
		if len(oob) < unix.SizeofCmsghdr {
			return fds, fmt.Errorf("%w: short control header", ErrFDPassing)
		}
		h := (*unix.Cmsghdr)(unsafePointer(oob))
		if h.Len < unix.SizeofCmsghdr || uint64(h.Len) > uint64(len(oob)) {
			return fds, fmt.Errorf("%w: control length %d", ErrFDPassing, h.Len)
		}
		data := oob[unix.CmsgLen(0):h.Len]
		count++
		switch {
		case h.Level != unix.SOL_SOCKET || h.Type != unix.SCM_RIGHTS:
			err = fmt.Errorf("%w: unexpected control message level %d type %d", ErrFDPassing, h.Level, h.Type)
		case count > 1:
			err = fmt.Errorf("%w: more than one control message", ErrFDPassing)
		}
		if h.Level == unix.SOL_SOCKET && h.Type == unix.SCM_RIGHTS {
			for i := 0; i+4 <= len(data); i += 4 {
				fds = append(fds, int(int32(nativeUint32(data[i:]))))
			}
		}
		next := unix.CmsgSpace(int(h.Len) - unix.CmsgLen(0))
		if next > len(oob) {
			break
		}
		oob = oob[next:]
	}
	return fds, err
}
