package bulk_test

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/sypas/go/bulk"
	"github.com/sypas/go/frame"
	"github.com/sypas/go/internal/closetest"
	"github.com/sypas/go/wire"
)

// A sender fills a span in place and sends its 40-byte descriptor; the
// receiver reads the span where it lies and acknowledges it, which returns
// it to the sender. Both sides live in one process here; across processes
// the memfd travels with REGIONS (role BULK) and the descriptors in BULK
// frames on the rings.
func Example() {
	sender, err := bulk.CreateRegion(bulk.Config{Size: 1 << 20, ID: 3})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer sender.Close()
	f, _ := closetest.PeerFile(sender.File()) // the peer's own descriptor
	receiver, err := bulk.OpenRegion(f, 3, 1<<20)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer receiver.Close()

	// Sender: allocate (waiting at most a second for room), fill, send.
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	span, err := sender.Alloc(ctx, 200<<10)
	if err != nil {
		fmt.Println(err) // matches bulk.ErrFull and wire.ErrResource when full
		return
	}
	n := copy(span.Bytes(), "a large payload, written in place")
	span = span.Trim(n)
	desc, _ := sender.Send(span, frame.TypeRequest, wire.BulkChecksum)
	payload, _ := desc.Append(nil) // the BULK frame's payload

	// Receiver: decode the descriptor once, check it against the region,
	// copy what must be validated, then acknowledge.
	var got wire.Bulk
	if err := got.Decode(payload); err != nil {
		fmt.Println(err)
		return
	}
	view, err := receiver.View(&got) // valid until the ACK is sent
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Printf("%d bytes in place: %q\n", len(view), view[:15])
	buf := make([]byte, got.Length)
	if _, err := receiver.ReadInto(buf, &got); err != nil { // checksum verified on the copy
		fmt.Println(err)
		return
	}

	// Sender, on the BULK frame with flag ACK: the span is free again.
	fmt.Println(sender.Ack(&got), sender.Stats().Spans)
	err = sender.Ack(&got) // a second ACK releases nothing
	fmt.Println(errors.Is(err, bulk.ErrLease), wire.CodeOf(err))
	// Output:
	// 33 bytes in place: "a large payload"
	// <nil> 0
	// true E_PROTO
}
