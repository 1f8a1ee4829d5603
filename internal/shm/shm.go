package shm

import (
	"errors"
	"fmt"
	"os"
	"sync/atomic"

	mmap "github.com/edsrzf/mmap-go"
	"golang.org/x/sys/unix"
)

var (
	// ErrNotSealed means a file offered to Open is not a memfd sealed with at
	// least F_SEAL_SHRINK|F_SEAL_GROW, so its peer could resize it under our
	// mapping.
	ErrNotSealed = errors.New("shm: file is not a sealed memfd")
	// ErrSize means a region's size is not the expected one (or not > 0).
	ErrSize = errors.New("shm: wrong region size")
)

// requiredSeals are the seals Open insists on: together they fix the size.
const requiredSeals = unix.F_SEAL_SHRINK | unix.F_SEAL_GROW

// Region is a memfd mapped shared read-write. Its methods other than Close
// may be called concurrently; Close may be called more than once.
type Region struct {
	f      *os.File
	mem    mmap.MMap // the original mapping, kept whole for munmap; never reassigned
	size   int
	closed atomic.Bool
}

// Create makes a new region of exactly size bytes (size is not rounded up to
// a page: the mapping covers whole pages but Bytes is exactly size long, and
// the peer must Open it with the same size).
//
// The memfd is named name (shown as /memfd:name in /proc/<pid>/fd and
// /proc/<pid>/maps, which helps when debugging), is close-on-exec, and is
// sealed with F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_SEAL before it is mapped.
func Create(name string, size int) (_ *Region, err error) {
	if size <= 0 {
		return nil, fmt.Errorf("shm: create %q: size %d must be > 0: %w", name, size, ErrSize)
	}
	if name == "" {
		name = "sypas"
	}
	fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, fmt.Errorf("shm: memfd_create %q: %w", name, err)
	}
	f := os.NewFile(uintptr(fd), "memfd:"+name)
	defer closeOnError(&err, f)

	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		return nil, fmt.Errorf("shm: ftruncate %q to %d: %w", name, size, err)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS,
		unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_SEAL); err != nil {
		return nil, fmt.Errorf("shm: seal %q: %w", name, err)
	}
	return mapFile(f, size)
}

// Open maps a region received from a peer, expecting exactly size bytes.
//
// Open always takes ownership of f: on success the Region owns it, on failure
// Open closes it, so a received descriptor never leaks on an error path.
// It fails with ErrNotSealed unless f is a memfd sealed with at least
// F_SEAL_SHRINK|F_SEAL_GROW (any file that does not support sealing fails the
// same way), and with ErrSize unless its size is exactly size.
func Open(f *os.File, size int) (_ *Region, err error) {
	if f == nil {
		return nil, errors.New("shm: open: nil file")
	}
	defer closeOnError(&err, f)

	if size <= 0 {
		return nil, fmt.Errorf("shm: open %s: size %d must be > 0: %w", f.Name(), size, ErrSize)
	}
	var (
		seals int
		st    unix.Stat_t
		opErr error
	)
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("shm: open %s: %w", f.Name(), err)
	}
	if err := rc.Control(func(fd uintptr) {
		seals, opErr = unix.FcntlInt(fd, unix.F_GET_SEALS, 0)
		if opErr != nil {
			// EINVAL: not a file that supports sealing (not shmem/hugetlbfs).
			opErr = fmt.Errorf("F_GET_SEALS: %w: %w", opErr, ErrNotSealed)
			return
		}
		if seals&requiredSeals != requiredSeals {
			opErr = fmt.Errorf("seals %#x lack F_SEAL_SHRINK|F_SEAL_GROW: %w", seals, ErrNotSealed)
			return
		}
		if opErr = unix.Fstat(int(fd), &st); opErr != nil {
			opErr = fmt.Errorf("fstat: %w", opErr)
			return
		}
		if st.Size != int64(size) {
			opErr = fmt.Errorf("size is %d bytes, want %d: %w", st.Size, size, ErrSize)
		}
	}); err != nil {
		return nil, fmt.Errorf("shm: open %s: %w", f.Name(), err)
	}
	if opErr != nil {
		return nil, fmt.Errorf("shm: open %s: %w", f.Name(), opErr)
	}
	return mapFile(f, size)
}

// mapFile maps f shared read-write. The caller closes f if it fails.
func mapFile(f *os.File, size int) (*Region, error) {
	mem, err := mmap.MapRegion(f, size, mmap.RDWR, 0, 0) // RDWR without COPY: MAP_SHARED
	if err != nil {
		return nil, fmt.Errorf("shm: mmap %s (%d bytes): %w", f.Name(), size, err)
	}
	return &Region{f: f, mem: mem, size: size}, nil
}

// closeOnError closes f if *err is set when a constructor returns.
func closeOnError(err *error, f *os.File) {
	if *err != nil {
		_ = f.Close()
	}
}

// Bytes returns the mapping: page-aligned, exactly Size bytes long, shared
// with every process that mapped the same memfd. It must not be used after
// Close.
func (r *Region) Bytes() []byte { return r.mem }

// File returns the memfd, to hand to a peer (exec.Cmd.ExtraFiles,
// SCM_RIGHTS). The region still owns it: do not close it.
func (r *Region) File() *os.File { return r.f }

// Size returns the region's size in bytes.
func (r *Region) Size() int { return r.size }

// Close unmaps the region and closes its file. Only the first call does
// anything; later calls return nil.
func (r *Region) Close() error {
	if !r.closed.CompareAndSwap(false, true) {
		return nil
	}
	var unmapErr, closeErr error
	mem := r.mem // Unmap nils its receiver; keep r.mem intact for racing readers
	if err := mem.Unmap(); err != nil {
		unmapErr = fmt.Errorf("shm: munmap: %w", err)
	}
	if err := r.f.Close(); err != nil {
		closeErr = fmt.Errorf("shm: close: %w", err)
	}
	return errors.Join(unmapErr, closeErr)
}
