package shm

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync/atomic"

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

// Region is a memfd mapped shared read-write. Its methods may be called
// concurrently, Close included, and Close more than once.
//
// Closing never unmaps memory a goroutine may still touch: Close replaces the
// shared mapping with private zero pages over the same addresses, and the
// address range is unmapped only once the Region is unreachable. Whatever
// keeps using the memory must therefore keep the Region reachable (the ring
// ends attached through a ring.Region do).
type Region struct {
	f      *os.File
	mem    []byte // the mapping, exactly size bytes; never reassigned
	span   *span  // its address range, unmapped by the cleanup
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
	if ferr := fault(&createFault); ferr != nil && err == nil {
		unix.Close(fd)
		err = ferr
	}
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
	if err := fault(&openFault); err != nil {
		return nil, fmt.Errorf("shm: mmap %s (%d bytes): %w", f.Name(), size, err)
	}
	return mapFile(f, size)
}

// mapFile maps f shared read-write. The caller closes f if it fails.
func mapFile(f *os.File, size int) (*Region, error) {
	sp, mem, err := mapShared(f, size)
	if err != nil {
		return nil, fmt.Errorf("shm: mmap %s (%d bytes): %w", f.Name(), size, err)
	}
	r := &Region{f: f, mem: mem, span: sp, size: size}
	runtime.AddCleanup(r, (*span).release, sp)
	return r, nil
}

// closeOnError closes f if *err is set when a constructor returns.
func closeOnError(err *error, f *os.File) {
	if *err != nil {
		_ = f.Close()
	}
}

// Bytes returns the mapping: page-aligned, exactly Size bytes long, shared
// with every process that mapped the same memfd; nil after Close. A slice
// obtained before Close stays safe to touch while the Region is reachable,
// but is then private zero pages, no longer shared.
func (r *Region) Bytes() []byte {
	if r.closed.Load() {
		return nil
	}
	return r.mem
}

// File returns the memfd, to hand to a peer (exec.Cmd.ExtraFiles,
// SCM_RIGHTS). The region still owns it: do not close it.
func (r *Region) File() *os.File { return r.f }

// Size returns the region's size in bytes.
func (r *Region) Size() int { return r.size }

// Close releases the shared memory and closes the file, while goroutines may
// still be touching the mapping: it replaces the mapping, in one step, with
// private zero pages at the same addresses (they read zeros and write to
// memory nobody else sees, and never fault), and the addresses are unmapped
// once the Region is unreachable. Only the first call does anything; later
// calls return nil.
func (r *Region) Close() error {
	if !r.closed.CompareAndSwap(false, true) {
		return nil
	}
	var retireErr, closeErr error
	if err := r.span.retire(); err != nil {
		// The shared pages stay mapped until the Region is unreachable.
		retireErr = fmt.Errorf("shm: replace the mapping of %s: %w", r.f.Name(), err)
	}
	if err := r.f.Close(); err != nil {
		closeErr = fmt.Errorf("shm: close: %w", err)
	}
	return errors.Join(retireErr, closeErr)
}

// Mapped is the number of regions this process has mapped and not unmapped
// yet: those open, and those closed but still reachable. Leak tests watch it.
func Mapped() int { return int(mapped.Load()) }
