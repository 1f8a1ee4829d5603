package ring

import (
	"errors"
	"fmt"
	"io"
	"os"
)

var (
	// ErrCorrupt reports that the peer broke the ring's invariants: a bad
	// header, an index out of range, or a malformed record; or, from
	// OpenRegion, passed a memfd that is not sealed or has the wrong size. It
	// is sticky: the endpoint stays broken.
	ErrCorrupt = errors.New("ring: corrupt")

	// ErrInvalid reports a bad argument: a capacity, region or size the ring
	// cannot use, or a call out of order. It matches os.ErrInvalid: no retry
	// can fix it.
	ErrInvalid = fmt.Errorf("ring: %w", os.ErrInvalid)

	// ErrTooLarge reports a reservation larger than MaxRecord.
	ErrTooLarge = errors.New("ring: record too large")

	// ErrPeerClosed reports that the consumer has closed: nothing written
	// any more will be read.
	ErrPeerClosed = errors.New("ring: peer closed")

	// ErrClosed reports use of an endpoint after Close (its own, or its
	// Region's), and ends a call that was in flight when Close ran.
	ErrClosed = os.ErrClosed

	// ErrShortBuffer reports a ReadInto buffer smaller than the next record;
	// the record stays in the ring.
	ErrShortBuffer = io.ErrShortBuffer

	// ErrNoReservation reports Commit without a matching Reserve. It
	// matches ErrInvalid.
	ErrNoReservation = fmt.Errorf("%w: commit without reservation", ErrInvalid)

	// ErrViewsHeld reports a Next or ReadInto that would wait forever: the
	// views returned by Next and not yet released cover the whole ring, so
	// the producer has no room for even an empty record. Release, then call
	// again. It matches ErrInvalid: the caller's misuse.
	ErrViewsHeld = fmt.Errorf("%w: unreleased views hold the whole ring", ErrInvalid)
)

// errCommitTooLong is static, without the sizes a formatted error would
// carry, so that Commit, which returns it, stays small enough to inline.
var errCommitTooLong = fmt.Errorf("%w: commit of a negative length or more than was reserved", ErrInvalid)
