package bulk

import (
	"errors"
	"fmt"
	"os"

	"github.com/sypas/go/wire"
)

var (
	// ErrFull reports that the region had no free span of the size asked
	// for until Alloc's context ended (at once for a context already done).
	// It matches wire.ErrResource: the sender may retry later; and, when a
	// deadline ended the wait, context.DeadlineExceeded.
	ErrFull error = &codedError{"bulk: region full", wire.ErrResource}

	// ErrTooLarge reports an Alloc larger than the region: it can never
	// succeed. It matches wire.ErrTooLarge.
	ErrTooLarge error = &codedError{"bulk: span larger than the region", wire.ErrTooLarge}

	// ErrDescriptor reports a descriptor that does not fit the region it
	// is checked against: another region id, an empty span, or a span
	// running past the region's end. The peer wrote it: it matches
	// wire.ErrProto.
	ErrDescriptor error = &codedError{"bulk: bad descriptor", wire.ErrProto}

	// ErrLease reports an acknowledgement that releases nothing: a lease
	// never sent, already released (a double ACK), released at session end,
	// minted by another region, or echoed with an offset or length other
	// than the ones sent. The allocator is unchanged. It matches
	// wire.ErrProto.
	ErrLease error = &codedError{"bulk: lease not outstanding", wire.ErrProto}

	// ErrRegion reports a memfd offered by the peer as a bulk region that
	// is not sealed against shrinking and growing, or not of the announced
	// size: mapping it could fault. It matches wire.ErrProto.
	ErrRegion error = &codedError{"bulk: peer's region refused", wire.ErrProto}

	// ErrChecksum reports a span whose copy does not match the CRC32C its
	// descriptor carries. It matches wire.ErrProto.
	ErrChecksum error = &codedError{"bulk: span checksum mismatch", wire.ErrProto}

	// ErrInvalid reports a bad argument: a Config field, a size, or a span
	// this side does not hold (freed twice, sent twice). It matches
	// os.ErrInvalid: no retry can fix it.
	ErrInvalid = fmt.Errorf("bulk: %w", os.ErrInvalid)

	// ErrClosed reports use of a region after Close, and ends an Alloc
	// that was waiting when Close ran.
	ErrClosed = os.ErrClosed
)

// codedError is a sentinel that matches the wire sentinel of its code, so
// that wire.CodeOf and wire.Retryable say what it means. Like control's
// sentinels it is not a *wire.Error: the bridge decides what to answer.
type codedError struct {
	msg  string
	code error // a wire sentinel: wire.ErrProto, ...
}

func (e *codedError) Error() string        { return e.msg }
func (e *codedError) Is(target error) bool { return target == e.code }

// errNoWait is why a TryAlloc found no span: it does not wait.
var errNoWait = errors.New("TryAlloc does not wait")

// fullError is what a waiting Alloc returns when its context ends, or
// TryAlloc when no span is free: it matches ErrFull and cause.
func fullError(n int, cause error) error {
	return fmt.Errorf("%w: no span of %d bytes free: %w", ErrFull, n, cause)
}
