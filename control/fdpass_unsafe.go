package control

import (
	"encoding/binary"
	"unsafe"

	"golang.org/x/sys/unix"
)

// unsafePointer views the start of a control buffer as a Cmsghdr. Safe:
// the caller checked that len(b) >= SizeofCmsghdr, and the buffer comes
// from make, so it is aligned for the header's fields (uint64, int32).
func unsafePointer(b []byte) unsafe.Pointer { return unsafe.Pointer(&b[0]) }

// nativeUint32 reads an fd from SCM_RIGHTS data, which the kernel writes
// as native-endian ints.
func nativeUint32(b []byte) uint32 { return binary.NativeEndian.Uint32(b) }

// recvmsg reads into p, and any control data into oob, with no address
// buffer: unix.Recvmsg would allocate the sender's Sockaddr on every call.
// Safe: msg and iov point into p and oob, which outlive the call, and the
// conversion to uintptr happens in the Syscall call expression, which
// keeps them alive until it returns.
func recvmsg(fd int, p, oob []byte, flags int) (n, oobn, recvflags int, err error) {
	var iov unix.Iovec
	if len(p) > 0 {
		iov.Base = &p[0]
		iov.SetLen(len(p))
	}
	var msg unix.Msghdr
	msg.Iov = &iov
	msg.SetIovlen(1)
	if len(oob) > 0 {
		msg.Control = &oob[0]
		msg.SetControllen(len(oob))
	}
	r, _, e := unix.Syscall(unix.SYS_RECVMSG, uintptr(fd), uintptr(unsafe.Pointer(&msg)), uintptr(flags))
	if e != 0 {
		return 0, 0, 0, e
	}
	return int(r), int(msg.Controllen), int(msg.Flags), nil
}
