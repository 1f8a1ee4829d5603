package sypas_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/sypas/go/sypas"
)

// An 8 MiB reply sent without a copy: the handler reserves it with
// AllocReply in the kernel's bulk region, io.ReadFull fills it in place (a
// file would be read straight into it the same way), and returning that
// very slice sends only its 40-byte descriptor. Where the session has no
// bulk region (the inline transport), AllocReply fails with ErrTooLarge
// and the handler allocates its reply as usual.
func ExampleRequest_AllocReply() {
	srv, path, stop := exampleKernel()
	defer stop()
	srv.Handle("read", sypas.RightRequest, func(ctx context.Context, req *sypas.Request) ([]byte, error) {
		const size = 8 << 20
		b, err := req.AllocReply(ctx, size)
		if errors.Is(err, sypas.ErrTooLarge) {
			b = make([]byte, size)
		} else if err != nil {
			return nil, err // E_RESOURCE: the region stayed full until ctx ended
		}
		file := bytes.NewReader(bytes.Repeat([]byte("y"), size)) // a file, say
		n, err := io.ReadFull(file, b)
		if err != nil {
			return nil, err // the span goes back to the region
		}
		return b[:n], nil // b itself, or a prefix: sent in place
	})

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := sypas.Dial(ctx, path, sypas.ClientConfig{})
	if err != nil {
		panic(err)
	}
	defer c.Close()
	err = c.CallFunc(ctx, "read", nil, func(reply []byte) error { // a view of the kernel's span
		fmt.Printf("%d bytes, %d of them y\n", len(reply), bytes.Count(reply, []byte("y")))
		return nil
	})
	fmt.Println(err)
	// Output:
	// 8388608 bytes, 8388608 of them y
	// <nil>
}
