package sypas_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/sypas/go/control"
	"github.com/sypas/go/control/token"
	"github.com/sypas/go/sypas"
)

// A kernel with two operations: greet, which any daemon may call, and
// admin.reboot, which needs a right its daemons' tokens do not grant. The
// refusal is answered E_PERMISSION and written to the audit log (here
// stdout, trimmed to its stable keys).
func ExampleServer() {
	dir, err := os.MkdirTemp("", "sypas-example-")
	if err != nil {
		panic(err)
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "kernel.sock")

	keys := token.NewKeyring()
	if _, err := keys.Rotate(); err != nil { // a fresh random signing key
		panic(err)
	}
	audit := slog.New(slog.NewTextHandler(os.Stdout, &slog.HandlerOptions{ReplaceAttr: stableKeys}))
	srv, err := sypas.NewServer(sypas.ServerConfig{ServerConfig: control.ServerConfig{
		Keys:          keys, // tokens grant request, subscribe, publish and bulk: the default rights
		SessionConfig: control.SessionConfig{Logger: audit},
	}})
	if err != nil {
		panic(err)
	}
	srv.Handle("greet", sypas.RightRequest, func(ctx context.Context, req *sypas.Request) ([]byte, error) {
		// req.Body is valid until the handler returns; the reply is copied.
		return fmt.Appendf(nil, "hello, %s", req.Body), nil
	})
	srv.Handle("admin.reboot", sypas.RightAdmin, func(context.Context, *sypas.Request) ([]byte, error) {
		return nil, errors.New("not reached: the enforcer refuses first")
	})
	l, err := control.Listen(path, control.Config{})
	if err != nil {
		panic(err)
	}
	defer l.Close()
	served := make(chan error)
	go func() { served <- srv.Serve(l) }()

	// A daemon, here in the same process.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := sypas.Dial(ctx, path, sypas.ClientConfig{})
	if err != nil {
		panic(err)
	}
	reply, err := c.Call(ctx, "greet", []byte("netd"))
	fmt.Printf("%s %v\n", reply, err)
	_, err = c.Call(ctx, "admin.reboot", nil)
	fmt.Println(errors.Is(err, sypas.ErrPermission), sypas.ClassOf(err))
	c.Close()

	// Health answers NOT_SERVING, sessions drain, then Serve returns.
	fmt.Println(srv.Shutdown(ctx), <-served)
	// Output:
	// hello, netd <nil>
	// level=WARN msg="sypas: refused" event=permission reason="the token lacks the operation's rights" code=E_PERMISSION
	// true fatal
	// <nil> <nil>
}

// stableKeys keeps the audit keys that are the same on every run.
func stableKeys(_ []string, a slog.Attr) slog.Attr {
	if slices.Contains([]string{slog.LevelKey, slog.MessageKey, control.LogKeyEvent, control.LogKeyReason, control.LogKeyCode}, a.Key) {
		return a
	}
	return slog.Attr{}
}

// A daemon calls the kernel, reads a reply into its own buffer, and
// follows a topic. The kernel here is in the same process (exampleKernel);
// in production it is another process, and the Client reconnects to it by
// itself when it restarts.
func ExampleClient() {
	srv, path, stop := exampleKernel()
	defer stop()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	c, err := sypas.Dial(ctx, path, sypas.ClientConfig{}) // waits for the first session
	if err != nil {
		panic(err)
	}
	defer c.Close()

	reply, err := c.Call(ctx, "greet", []byte("netd")) // safe from many goroutines
	fmt.Printf("%s %v\n", reply, err)

	buf := make([]byte, 0, 64)
	buf, err = c.CallInto(ctx, "greet", []byte("again"), buf[:0]) // no allocation
	fmt.Printf("%s %v\n", buf, err)

	_, err = c.Call(ctx, "no.such.op", nil)
	fmt.Println(errors.Is(err, sypas.ErrNotFound), sypas.CodeOf(err), sypas.Retryable(err))

	sub, err := c.Subscribe(ctx, "news", sypas.SubscribeOptions{})
	if err != nil {
		panic(err)
	}
	if err := srv.Publish(ctx, "news", []byte("kernel ready")); err != nil { // the kernel's side
		panic(err)
	}
	ev := <-sub.Events()
	fmt.Printf("%s: %s (%d dropped)\n", ev.Topic, ev.Body, sub.Dropped())

	health, err := c.Health(ctx)
	fmt.Println(health, err)
	// Output:
	// hello, netd <nil>
	// hello, again <nil>
	// true E_NOT_FOUND false
	// news: kernel ready (0 dropped)
	// SERVING <nil>
}

// exampleKernel serves greet on a socket in a fresh directory; stop shuts
// it down and removes the directory.
func exampleKernel() (srv *sypas.Server, path string, stop func()) {
	dir, err := os.MkdirTemp("", "sypas-example-")
	if err != nil {
		panic(err)
	}
	path = filepath.Join(dir, "kernel.sock")
	keys := token.NewKeyring()
	if _, err := keys.Rotate(); err != nil {
		panic(err)
	}
	srv, err = sypas.NewServer(sypas.ServerConfig{ServerConfig: control.ServerConfig{Keys: keys,
		SessionConfig: control.SessionConfig{Logger: slog.New(slog.DiscardHandler)}}}) // no audit records here
	if err != nil {
		panic(err)
	}
	srv.Handle("greet", sypas.RightRequest, func(_ context.Context, req *sypas.Request) ([]byte, error) {
		return fmt.Appendf(nil, "hello, %s", req.Body), nil
	}, sypas.Inline) // never blocks: runs on the session's reader
	l, err := control.Listen(path, control.Config{})
	if err != nil {
		panic(err)
	}
	served := make(chan error)
	go func() { served <- srv.Serve(l) }()
	return srv, path, func() {
		srv.Close()
		<-served
		l.Close()
		os.RemoveAll(dir)
	}
}
