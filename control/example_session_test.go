package control_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/sypas/go/control"
	"github.com/sypas/go/control/token"
)

// A kernel and a daemon in one process: the daemon dials, the handshake
// sets up two rings and a token, a record crosses the daemon→kernel ring,
// and a GOAWAY exchange ends the session. In real use the two sides are
// separate processes; nothing else changes.
func Example_session() {
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "sypas-example-")
	if err != nil {
		panic(err)
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "kernel.sock")

	// Kernel side.
	l, err := control.Listen(path, control.Config{})
	if err != nil {
		panic(err)
	}
	defer l.Close()
	keys := token.NewKeyring()
	if _, err := keys.Rotate(); err != nil {
		panic(err)
	}
	srv, err := control.NewServer(l, control.ServerConfig{Keys: keys})
	if err != nil {
		panic(err)
	}
	accepted := make(chan *control.Session, 1)
	go func() {
		k, err := srv.Accept(ctx)
		if err != nil {
			panic(err)
		}
		accepted <- k
	}()

	// Daemon side.
	d, err := control.Dial(ctx, path, control.DialConfig{SessionConfig: control.SessionConfig{Name: "example"}})
	if err != nil {
		panic(err)
	}
	k := <-accepted

	if _, err := d.Producer().Write([]byte("hello, kernel")); err != nil {
		panic(err)
	}
	buf := make([]byte, 64)
	n, err := k.Consumer().ReadInto(buf)
	if err != nil {
		panic(err)
	}
	fmt.Println(string(buf[:n]))
	fmt.Println("same token:", d.Token().ID == k.Token().ID, "attested pid:", k.Peer().PID == os.Getpid())

	kernelDone := make(chan error)
	go func() {
		<-k.GoAway() // the daemon is leaving: finish in-flight work, then agree
		kernelDone <- k.Shutdown(ctx)
	}()
	fmt.Println(d.Shutdown(ctx), <-kernelDone, d.State(), k.State())
	// Output:
	// hello, kernel
	// same token: true attested pid: true
	// <nil> <nil> closed closed
}
