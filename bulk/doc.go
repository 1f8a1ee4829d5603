// Package bulk moves payloads too large for a ring through shared memory by
// descriptor: the bytes sit in a bulk region, a sealed memfd the sender
// owns, and only a 40-byte BULK descriptor (wire.Bulk, docs/PROTOCOL.md
// §3.8) travels on the ring. The receiver reads the bytes in place and
// acknowledges the span, which returns it to the sender.
//
// # The two sides
//
// The sender makes a [Region] with [CreateRegion] and passes its memfd
// (File) to the peer, which maps it with [OpenRegion] as a [PeerRegion]. Each
// side of a session owns one region for what it sends. For one payload:
//
//	sender:   s, err := region.Alloc(ctx, n)        // wait for room until ctx ends
//	          fill s.Bytes() in place               // e.g. read a file into it
//	          d, err := region.Send(s, inner, 0)    // the descriptor: the peer's now
//	          send a BULK frame carrying d
//	receiver: v, err := peer.View(&d)               // checked against the region
//	          use v (or peer.ReadInto a private copy)
//	          send a BULK frame with flag ACK carrying d
//	sender:   region.Ack(&ack)                      // checked; the span is free again
//
// # Allocation
//
// A Region is a buddy allocator whose tables live in the sender's private
// memory: the peer, which can write every byte of the region, cannot
// corrupt them. Each block size has a lock-free free list, so concurrent
// senders allocate and release without a lock while blocks of their size
// are free; splitting larger blocks and merging free ones (done lazily, when
// an allocation finds nothing large enough) take a mutex. A span takes less
// than twice its length, and an empty region holds one span of its whole
// size. docs/DESIGN.md §9 says why.
//
// The region is bounded: when it is full, Alloc waits for a release until
// its context ends, then fails with [ErrFull], which matches
// wire.ErrResource. A peer that never acknowledges cannot hold the memory
// beyond its session: [Region.ReleaseAll] takes back every span it holds.
//
// # A hostile peer
//
// A descriptor is untrusted on both sides. [PeerRegion.View] returns a
// slice only when the span lies inside the mapped region, and fails with
// [ErrDescriptor] otherwise. [Region.Ack] releases a span only when the
// acknowledgement names this region, a lease it sent and has not released
// since, and that span's offset and length; a lease never sent, a second
// ACK, a lease of another region or an ACK after ReleaseAll fail with
// [ErrLease] and change nothing. Both match wire.ErrProto and are counted.
//
// # Lifetime of a view
//
// A view is valid until the span is released (its ACK is sent); the sender
// may then reuse the memory. While it is valid the sender can still change
// its bytes: copy before validating ([PeerRegion.ReadInto] copies, and
// verifies the descriptor's optional CRC32C on the copy), and never read a
// length from shared memory twice. After Close, views and span slices still
// in use read private zero pages and never fault, as long as their region is
// reachable.
package bulk
