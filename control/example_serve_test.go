package control_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/sypas/go/control"
	"github.com/sypas/go/control/token"
	"github.com/sypas/go/wire"
)

// A kernel that serves every daemon concurrently, within limits: each
// session's handler echoes what the daemon writes. The second daemon of
// the same uid is refused (MaxSessionsPerUID is 1 here) with an error the
// daemon can match and retry.
func ExampleServer_Serve() {
	dir, err := os.MkdirTemp("", "sypas-example-")
	if err != nil {
		panic(err)
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "kernel.sock")
	l, err := control.Listen(path, control.Config{})
	if err != nil {
		panic(err)
	}
	defer l.Close()
	keys := token.NewKeyring()
	if _, err := keys.Rotate(); err != nil {
		panic(err)
	}
	srv, err := control.NewServer(l, control.ServerConfig{
		Keys:          keys,
		Limits:        control.Limits{MaxSessionsPerUID: 1},
		SessionConfig: control.SessionConfig{Logger: slog.New(slog.DiscardHandler)}, // no audit records here
	})
	if err != nil {
		panic(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	served := make(chan error)
	go func() {
		served <- srv.Serve(ctx, func(k *control.Session) { // Serve closes k when this returns
			buf := make([]byte, 64)
			for {
				n, err := k.Consumer().ReadInto(buf)
				if err != nil {
					return // the session ended
				}
				if _, err := k.Producer().Write(buf[:n]); err != nil {
					return
				}
			}
		})
	}()

	quiet := control.DialConfig{SessionConfig: control.SessionConfig{Logger: slog.New(slog.DiscardHandler)}}
	d, err := control.Dial(ctx, path, quiet)
	if err != nil {
		panic(err)
	}
	if _, err := d.Producer().Write([]byte("echo me")); err != nil {
		panic(err)
	}
	buf := make([]byte, 64)
	n, err := d.Consumer().ReadInto(buf)
	if err != nil {
		panic(err)
	}
	fmt.Println(string(buf[:n]))

	_, err = control.Dial(ctx, path, quiet)
	fmt.Println("second session refused:", errors.Is(err, wire.ErrResource), wire.Retryable(err))

	d.Close() // the handler's ReadInto fails, it returns, Serve closes the kernel's end
	stop()
	fmt.Println(<-served)
	// Output:
	// echo me
	// second session refused: true true
	// context canceled
}
