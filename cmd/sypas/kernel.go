package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/sypas/go/control"
	"github.com/sypas/go/control/token"
	"github.com/sypas/go/sypas"
	"github.com/sypas/go/sypasgrpc"
)

// The example kernel's topics.
const (
	topicTicks = "ticks" // "tick N HH:MM:SS.mmm", every tick period
	topicKV    = "kv"    // "key=value", on every kv.put
)

// Limits of the example's key-value map: a kernel never lets daemons grow
// its memory without bound.
const (
	maxKeys     = 1024
	maxKeyLen   = 64
	maxValueLen = 1024
)

// ops lists the example kernel's operations and the rights each needs, for
// the usage text and the log.
const ops = "echo time whoami kv.get (request); kv.put (request+publish); kv.reset (admin)"

// exampleKernel is the example's state, served by a sypas.Server.
type exampleKernel struct {
	srv *sypas.Server

	mu sync.Mutex
	kv map[string]string
}

// newExampleKernel returns a Server with the example's operations. Its
// tokens are signed with a fresh random key: they are worth nothing to
// another kernel, or to this one after a restart.
func newExampleKernel(log *slog.Logger) (*exampleKernel, error) {
	keys := token.NewKeyring()
	if _, err := keys.Rotate(); err != nil {
		return nil, err
	}
	cfg := sypas.ServerConfig{}
	cfg.Keys, cfg.Logger = keys, log
	srv, err := sypas.NewServer(cfg)
	if err != nil {
		return nil, err
	}
	k := &exampleKernel{srv: srv, kv: make(map[string]string)}
	srv.Handle("echo", sypas.RightRequest, echo, sypas.Inline)
	srv.Handle("time", sypas.RightRequest, now, sypas.Inline)
	srv.Handle("whoami", sypas.RightRequest, whoami, sypas.Inline)
	srv.Handle("kv.get", sypas.RightRequest, k.get)
	srv.Handle("kv.put", sypas.RightRequest|sypas.RightPublish, k.put)
	srv.Handle("kv.reset", sypas.RightAdmin, k.reset)
	return k, nil
}

// echo answers the body itself: a view into the ring, copied into the
// reply before the ring space is released.
func echo(_ context.Context, req *sypas.Request) ([]byte, error) { return req.Body, nil }

func now(context.Context, *sypas.Request) ([]byte, error) {
	return time.Now().AppendFormat(nil, time.RFC3339Nano), nil
}

// whoami answers the caller's identity as the kernel attested it when the
// daemon connected, and the token its request was checked against.
func whoami(_ context.Context, req *sypas.Request) ([]byte, error) {
	p := req.Peer
	return fmt.Appendf(nil, "uid=%d gid=%d pid=%d exe=%s token=%#x", p.UID, p.GID, p.PID, p.Exe, req.TokenID), nil
}

func (k *exampleKernel) get(_ context.Context, req *sypas.Request) ([]byte, error) {
	key := string(req.Body)
	k.mu.Lock()
	v, ok := k.kv[key]
	k.mu.Unlock()
	if !ok {
		return nil, &sypas.Error{Code: sypas.CodeNotFound, Message: fmt.Sprintf("no key %q", clip(key))}
	}
	return []byte(v), nil
}

// put stores "key=value" and publishes it on topic kv.
func (k *exampleKernel) put(ctx context.Context, req *sypas.Request) ([]byte, error) {
	key, value, ok := bytes.Cut(req.Body, []byte("="))
	switch {
	case !ok || len(key) == 0:
		return nil, &sypas.Error{Code: sypas.CodeProto, Message: `the body must be "key=value"`}
	case len(key) > maxKeyLen || len(value) > maxValueLen:
		return nil, &sypas.Error{Code: sypas.CodeTooLarge, Message: fmt.Sprintf("key above %d bytes or value above %d", maxKeyLen, maxValueLen)}
	}
	k.mu.Lock()
	_, exists := k.kv[string(key)]
	full := !exists && len(k.kv) >= maxKeys
	if !full {
		k.kv[string(key)] = string(value)
	}
	k.mu.Unlock()
	if full {
		return nil, &sypas.Error{Code: sypas.CodeResource, Message: fmt.Sprintf("the map holds %d keys, its limit", maxKeys)}
	}
	// Subscribers that have no room lose the event (counted): a put never
	// waits for a slow reader.
	k.srv.Publish(ctx, topicKV, req.Body)
	return nil, nil
}

func (k *exampleKernel) reset(context.Context, *sypas.Request) ([]byte, error) {
	k.mu.Lock()
	n := len(k.kv)
	clear(k.kv)
	k.mu.Unlock()
	return fmt.Appendf(nil, "removed %d keys", n), nil
}

// clip shortens s for a message.
func clip(s string) string {
	if len(s) > maxKeyLen {
		return s[:maxKeyLen] + "…"
	}
	return s
}

// ticks publishes on topicTicks every period until ctx ends.
func (k *exampleKernel) ticks(ctx context.Context, period time.Duration) {
	t := time.NewTicker(period)
	defer t.Stop()
	for n := 1; ; n++ {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			k.srv.Publish(ctx, topicTicks, fmt.Appendf(nil, "tick %d %s", n, now.Format("15:04:05.000")))
		}
	}
}

// kernelOptions says how runKernel serves.
type kernelOptions struct {
	socket string
	tick   time.Duration
	// baseline, if set, is where the Unix-socket echo the demo measures
	// against also listens.
	baseline string
	// stop ends the kernel (it drains first); nil means SIGINT or SIGTERM.
	stop <-chan struct{}
	// tcp, if set, is a TCP address ("host:port") the kernel also serves
	// daemons of other hosts on, with TLS 1.3 (tls) and client
	// certificates that policy admits.
	tcp string
	// grpc, if set, is a TCP address the kernel also serves the gRPC
	// service sypas.v1.Sypas on (package sypasgrpc, with health checking
	// and reflection), with the same TLS and policy as tcp.
	grpc   string
	tls    *tls.Config
	policy *control.Policy
}

// runKernel serves the example kernel until stop, logging audit records
// (and its start and end) to stderr as slog text.
func runKernel(o kernelOptions, stderr io.Writer) error {
	log := slog.New(slog.NewTextHandler(stderr, nil))
	k, err := newExampleKernel(log)
	if err != nil {
		return err
	}
	if err := privateDir(o.socket); err != nil {
		return err
	}
	l, err := control.Listen(o.socket, control.Config{Logger: log})
	if err != nil {
		return err
	}
	defer l.Close()
	if o.baseline != "" {
		b, err := listenEcho(o.baseline)
		if err != nil {
			return err
		}
		defer b.Close()
	}
	served := make(chan error, 3)
	listeners := 1
	// wait joins errs and the end of every listener's Serve. A Serve that
	// had not begun when the kernel was stopped (a stop at once, or a
	// listener that failed) returns only that it was stopped: no error.
	wait := func(errs ...error) error {
		for range listeners {
			if err := <-served; !errors.Is(err, sypas.ErrClosed) && !errors.Is(err, grpc.ErrServerStopped) {
				errs = append(errs, err)
			}
		}
		return errors.Join(errs...)
	}
	go func() { served <- k.srv.Serve(l) }()
	listening := []any{"socket", o.socket}
	if o.tcp != "" {
		tl, err := control.ListenTLS(o.tcp, o.tls, control.Config{Logger: log, Policy: o.policy})
		if err != nil {
			k.srv.Close()
			return wait(fmt.Errorf("-tcp %s: %w", o.tcp, err))
		}
		defer tl.Close()
		go func() { served <- k.srv.Serve(tl) }()
		listeners++
		listening = append(listening, "tcp", tl.Addr().String())
	}
	var gs *grpc.Server
	if o.grpc != "" {
		var gl net.Listener
		gs, gl, err = listenGRPC(o, k.srv, log)
		if err != nil {
			k.srv.Close()
			return wait(fmt.Errorf("-grpc %s: %w", o.grpc, err))
		}
		defer gs.Stop()
		go func() { served <- gs.Serve(gl) }()
		listeners++
		listening = append(listening, "grpc", gl.Addr().String())
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go k.ticks(ctx, o.tick)
	log.Info("sypas: serving", append(listening, "pid", os.Getpid(), "ops", ops,
		"topics", topicTicks+" (every "+o.tick.String()+"), "+topicKV+" (on kv.put)")...)

	stop := o.stop
	if stop == nil {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
		defer signal.Stop(sig)
		ch := make(chan struct{})
		go func() { <-sig; close(ch) }()
		stop = ch
	}
	select {
	case <-stop:
	case err := <-served:
		k.srv.Close() // the other listener's sessions too
		return err
	}
	sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer scancel()
	err = k.srv.Shutdown(sctx)
	if gs != nil {
		stopGRPC(sctx, gs)
	}
	st := k.srv.Stats()
	log.Info("sypas: stopped", "ok", st.OK, "failed", st.Failed, "denied", st.Denied,
		"panics", st.Panics, "published", st.Published, "dropped", st.Dropped)
	return wait(err)
}

// listenGRPC is the gRPC server of o.grpc, with sypas.v1.Sypas registered
// for srv, and its listener.
func listenGRPC(o kernelOptions, srv *sypas.Server, log *slog.Logger) (*grpc.Server, net.Listener, error) {
	gs := grpc.NewServer(grpc.Creds(credentials.NewTLS(o.tls)))
	if _, err := sypasgrpc.Register(gs, srv, sypasgrpc.ServerConfig{Policy: o.policy, Logger: log}); err != nil {
		return nil, nil, err
	}
	l, err := net.Listen("tcp", o.grpc)
	if err != nil {
		return nil, nil, err
	}
	return gs, l, nil
}

// stopGRPC stops gs once the sypas.Server's Shutdown has ended its
// streams: gracefully until ctx ends (a Subscribe client that stopped
// reading would hold GracefulStop), then at once.
func stopGRPC(ctx context.Context, gs *grpc.Server) {
	done := make(chan struct{})
	go func() { gs.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		gs.Stop()
		<-done
	}
}

// privateDir creates the directory of the default socket under the
// temporary directory, which other users can write to, and refuses it
// unless it is this user's alone; other directories must exist.
func privateDir(socket string) error {
	dir := filepath.Dir(socket)
	if !strings.HasPrefix(dir, filepath.Join(os.TempDir(), "sypas-")) {
		return nil
	}
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !fi.IsDir() || !ok || int(st.Uid) != os.Geteuid() || fi.Mode().Perm()&0o077 != 0 {
		return fmt.Errorf("refusing socket directory %s: not a directory of uid %d closed to others (mode %v)", dir, os.Geteuid(), fi.Mode())
	}
	return nil
}

// serveCmd is "sypas serve".
func serveCmd(args []string, _ io.Reader, _, stderr io.Writer) error {
	fs := newFlags("serve", "[-socket PATH] [-tick D] [-tcp HOST:PORT] [-grpc HOST:PORT] [-cert F -key F -ca F -allow-uri URI,...]", stderr)
	socket := fs.String("socket", defaultSocket(), "the kernel's Unix socket")
	tick := fs.Duration("tick", time.Second, "period of the events on topic "+topicTicks)
	tcp := fs.String("tcp", "", "also serve daemons of other hosts on this TCP address, with TLS 1.3 and client certificates")
	grpcAddr := fs.String("grpc", "", "also serve the gRPC service sypas.v1.Sypas (with health checking and reflection) on this TCP address, with the TLS flags and -allow-uri of -tcp")
	files := tlsFlags(fs, "the daemons' certificates")
	uris := fs.String("allow-uri", "", "comma-separated URI SANs of the daemon certificates -tcp and -grpc admit")
	if err := parse(fs, args, 0, 0); err != nil {
		return err
	}
	if *tick <= 0 {
		return fmt.Errorf("-tick %v: want a positive period", *tick)
	}
	o := kernelOptions{socket: *socket, tick: *tick}
	if *tcp != "" || *grpcAddr != "" {
		var err error
		if o.tls, err = files.server(); err != nil {
			return err
		}
		if *uris == "" {
			return errors.New("-tcp and -grpc need -allow-uri: the certificates they admit")
		}
		o.tcp, o.grpc, o.policy = *tcp, *grpcAddr, &control.Policy{CertURIs: strings.Split(*uris, ",")}
	} else if files.set() || *uris != "" {
		return errors.New("-cert, -key, -ca and -allow-uri go with -tcp or -grpc")
	}
	return runKernel(o, stderr)
}
