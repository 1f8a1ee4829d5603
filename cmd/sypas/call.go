package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/sypas/go/sypas"
)

// dial connects to the kernel at socket (a Unix socket's path, or
// tcp://host:port or grpc://host:port with the TLS files; the grpc
// transport is registered by the import of sypasgrpc) within timeout. A socket that is not
// there fails at once, rather than after the reconnect backoff.
func dial(ctx context.Context, socket string, files tlsFiles, timeout time.Duration, stderr io.Writer) (*sypas.Client, error) {
	cfg := sypas.ClientConfig{}
	if isTCP(socket) {
		var err error
		if cfg.TLS, err = files.client(); err != nil {
			return nil, err
		}
	} else if files.set() {
		return nil, errors.New("-cert, -key and -ca are for a tcp:// or grpc:// kernel")
	} else if _, err := os.Stat(strings.TrimPrefix(socket, "unix://")); err != nil {
		return nil, fmt.Errorf("no kernel at %s (start one with \"sypas serve\"): %w", socket, err)
	}
	// The daemon side's audit records (a kernel refused, say) go to stderr.
	cfg.Logger = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	return sypas.Dial(ctx, socket, cfg)
}

// callCmd is "sypas call": one call, its reply on stdout.
func callCmd(args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	fs := newFlags("call", "[-socket PATH|tcp://HOST:PORT|grpc://HOST:PORT -cert F -key F -ca F] [-timeout D] OP [BODY|-]", stderr)
	socket := socketFlag(fs)
	files := tlsFlags(fs, "the kernel's certificate")
	timeout := fs.Duration("timeout", 5*time.Second, "bound on connecting, and on the call")
	if err := parse(fs, args, 1, 2); err != nil {
		return err
	}
	op, body := fs.Arg(0), []byte(fs.Arg(1))
	if fs.Arg(1) == "-" {
		var err error
		if body, err = io.ReadAll(io.LimitReader(stdin, 16<<20)); err != nil {
			return err
		}
	}
	ctx := context.Background()
	c, err := dial(ctx, *socket, files, *timeout, stderr)
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	reply, err := c.Call(ctx, op, body)
	if err != nil {
		return fmt.Errorf("%s: %s", op, describe(err))
	}
	if len(reply) > 0 && !bytes.HasSuffix(reply, []byte("\n")) {
		reply = append(reply, '\n')
	}
	_, err = stdout.Write(reply)
	return err
}

// describe is err as a shell user reads it: the code, then the kernel's
// message.
func describe(err error) string {
	var e *sypas.Error
	if errors.As(err, &e) && e.Err == nil {
		if e.Message == "" {
			return e.Code.String()
		}
		return e.Code.String() + ": " + e.Message
	}
	return err.Error()
}

// watchCmd is "sypas watch": the events of one topic, one a line.
func watchCmd(args []string, _ io.Reader, stdout, stderr io.Writer) error {
	fs := newFlags("watch", "[-socket PATH|tcp://HOST:PORT|grpc://HOST:PORT -cert F -key F -ca F] [-n N] TOPIC", stderr)
	socket := socketFlag(fs)
	files := tlsFlags(fs, "the kernel's certificate")
	n := fs.Int("n", 0, "stop after N events (0: until interrupted)")
	if err := parse(fs, args, 1, 1); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	c, err := dial(ctx, *socket, files, 5*time.Second, stderr)
	if err != nil {
		return err
	}
	defer c.Close()
	sub, err := c.Subscribe(ctx, fs.Arg(0), sypas.SubscribeOptions{})
	if err != nil {
		return fmt.Errorf("%s: %s", fs.Arg(0), describe(err))
	}
	var dropped uint64
	for i := 0; *n <= 0 || i < *n; i++ {
		select {
		case ev, ok := <-sub.Events():
			if !ok {
				return errors.New("the subscription ended")
			}
			fmt.Fprintf(stdout, "%s %s %s\n", ev.Time.Format("15:04:05.000"), ev.Topic, ev.Body)
			if d := sub.Dropped(); d != dropped {
				fmt.Fprintf(stderr, "%d events dropped so far\n", d)
				dropped = d
			}
		case <-ctx.Done():
			return nil
		}
	}
	return nil
}
