package control

import (
	"encoding/binary"
	"unsafe"
)

// unsafePointer views the start of a control buffer as a Cmsghdr. Safe:
// the caller checked that len(b) >= SizeofCmsghdr, and the buffer comes
// from make, so it is aligned for the header's fields (uint64, int32).
func unsafePointer(b []byte) unsafe.Pointer { return unsafe.Pointer(&b[0]) }

// nativeUint32 reads an fd from SCM_RIGHTS data, which the kernel writes
// as native-endian ints.
func nativeUint32(b []byte) uint32 { return binary.NativeEndian.Uint32(b) }
