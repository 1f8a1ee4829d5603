package control

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// sockPollInterval is how often waitSocket checks the socket path when it
// cannot watch the directory: an lstat(2), so 100 a second cost nothing.
const sockPollInterval = 10 * time.Millisecond

// nobodyListening reports whether a dial failed because no server listens
// at the path (no socket file, or a stale one: ENOENT, ECONNREFUSED), as
// opposed to a server that is there and failing.
func nobodyListening(err error) bool {
	return !errors.Is(err, ErrHandshake) &&
		(errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ENOENT))
}

// fileID identifies what is at a path: a new socket is a new inode, with a
// new ctime even if the inode number is reused.
type fileID struct {
	exists   bool
	dev, ino uint64
	ctime    unix.Timespec
}

func idOf(path string) fileID {
	var st unix.Stat_t
	if unix.Lstat(path, &st) != nil {
		return fileID{}
	}
	return fileID{true, st.Dev, st.Ino, st.Ctim}
}

// waitSocket returns when a server may have started listening at path since
// it was before (a file created or moved in under its name, which Listen's
// rename is), when d has passed, or when ctx ends. It watches path's
// directory with inotify; where it cannot (no directory yet, no inotify),
// it polls path's identity every sockPollInterval. A spurious return costs
// the caller one cheap dial.
func waitSocket(ctx context.Context, path string, before fileID, d time.Duration) {
	deadline := time.Now().Add(d)
	in, err := watchDir(filepath.Dir(path))
	if err == nil {
		defer in.Close()
	}
	// Anything that happened between the dial and the watch.
	if idOf(path) != before {
		return
	}
	if err == nil && waitCreated(ctx, in, filepath.Base(path), deadline) {
		return
	}
	t := time.NewTicker(sockPollInterval)
	defer t.Stop()
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
			return
		case <-t.C:
			if idOf(path) != before {
				return
			}
		}
	}
}

// watchDir returns an inotify instance, in the runtime's poller, that
// reports files created or moved into dir and the end of the watch.
func watchDir(dir string) (*os.File, error) {
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		return nil, os.NewSyscallError("inotify_init1", err)
	}
	const mask = unix.IN_CREATE | unix.IN_MOVED_TO | unix.IN_ONLYDIR | unix.IN_DELETE_SELF | unix.IN_MOVE_SELF
	if _, err := unix.InotifyAddWatch(fd, dir, mask); err != nil {
		unix.Close(fd)
		return nil, os.NewSyscallError("inotify_add_watch", err)
	}
	return os.NewFile(uintptr(fd), "inotify:"+dir), nil
}

// inotifyHeader is the fixed part of struct inotify_event: wd, mask,
// cookie, len.
const inotifyHeader = 16

// waitCreated reads in's events until one names name, the watch ends (the
// directory went away or events were lost: the caller had better look
// again), the deadline passes or ctx ends, and then reports true. It
// reports false if in cannot be read: the caller polls instead (returning
// at once would have it redial in a tight loop).
func waitCreated(ctx context.Context, in *os.File, name string, deadline time.Time) bool {
	if in.SetReadDeadline(deadline) != nil {
		return false // not in the poller: a read could block for ever
	}
	stop := context.AfterFunc(ctx, func() { in.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	buf := make([]byte, 4096)
	for {
		n, err := in.Read(buf)
		if err != nil {
			return errors.Is(err, os.ErrDeadlineExceeded)
		}
		for b := buf[:n]; len(b) >= inotifyHeader; {
			mask := binary.NativeEndian.Uint32(b[4:])
			l := int(binary.NativeEndian.Uint32(b[12:]))
			if l > len(b)-inotifyHeader {
				return false // the kernel's own format; never seen
			}
			ev := bytes.TrimRight(b[inotifyHeader:inotifyHeader+l], "\x00")
			b = b[inotifyHeader+l:]
			switch {
			case mask&(unix.IN_IGNORED|unix.IN_DELETE_SELF|unix.IN_MOVE_SELF|unix.IN_Q_OVERFLOW) != 0:
				return true
			case mask&(unix.IN_CREATE|unix.IN_MOVED_TO) != 0 && string(ev) == name:
				return true
			}
		}
	}
}
