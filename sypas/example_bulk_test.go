package sypas_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/sypas/go/control"
	"github.com/sypas/go/control/token"
	"github.com/sypas/go/sypas"
)

// A 10 MiB body sent without a copy: AllocSpan reserves it in the
// session's bulk region, io.ReadFull fills it in place (a file would be
// read straight into it the same way), and CallSpan sends only its
// 40-byte descriptor. The kernel's handler reads the very same memory,
// until it returns; the reply is a view until the callback returns. A
// plain Call with a body over the 64 KiB inline limit takes this path by
// itself, with one copy.
func ExampleClient_AllocSpan() {
	dir, err := os.MkdirTemp("", "sypas-example-")
	if err != nil {
		panic(err)
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "kernel.sock")
	keys := token.NewKeyring()
	if _, err := keys.Rotate(); err != nil {
		panic(err)
	}
	srv, err := sypas.NewServer(sypas.ServerConfig{ServerConfig: control.ServerConfig{Keys: keys}})
	if err != nil {
		panic(err)
	}
	srv.Handle("count", sypas.RightRequest, func(_ context.Context, req *sypas.Request) ([]byte, error) {
		// req.Body is the daemon's span, in place: valid until we return.
		return strconv.AppendInt(nil, int64(bytes.Count(req.Body, []byte("z"))), 10), nil
	})
	l, err := control.Listen(path, control.Config{})
	if err != nil {
		panic(err)
	}
	defer l.Close()
	go srv.Serve(l)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := sypas.Dial(ctx, path, sypas.ClientConfig{})
	if err != nil {
		panic(err)
	}
	defer c.Close()

	span, err := c.AllocSpan(ctx, "count", 10<<20)
	if err != nil {
		panic(err)
	}
	src := bytes.NewReader(bytes.Repeat([]byte("z"), 10<<20)) // a file, say
	if _, err := io.ReadFull(src, span.Bytes()); err != nil {
		span.Free() // never sent: give it back
		panic(err)
	}
	err = c.CallSpan(ctx, span, func(reply []byte) error { // span is the kernel's now
		fmt.Printf("the kernel counted %s bytes\n", reply)
		return nil
	})
	fmt.Println(err)
	// Output:
	// the kernel counted 10485760 bytes
	// <nil>
}
