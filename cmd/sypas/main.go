// Command sypas runs an example SYPAS kernel, calls it from the shell, and
// demonstrates the bridge end to end.
//
//	sypas serve [-socket PATH]                 an example kernel: ops echo, time, whoami,
//	                                           kv.get, kv.put, kv.reset (admin); topics ticks, kv
//	sypas call  [-socket PATH] OP [BODY|-]     call an op, print the reply (exit 1 on error)
//	sypas watch [-socket PATH] [-n N] TOPIC    print the events published on a topic
//	sypas demo                                 a kernel and two daemon processes, then a
//	                                           benchmark against a Unix socket
//
// serve -tcp HOST:PORT and -grpc HOST:PORT also serve daemons of other
// hosts, with mutual TLS (-cert, -key, -ca) and the certificates -allow-uri
// admits: the control plane on TCP, and the gRPC service sypas.v1.Sypas
// (package sypasgrpc: with health checking and server reflection, for
// grpcurl). call and watch reach them at tcp:// and grpc:// addresses.
//
// The socket defaults to $SYPAS_SOCKET, else $XDG_RUNTIME_DIR/sypas.sock,
// else sypas.sock in a private directory under the temporary directory.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

func main() { os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr)) }

// Exit statuses.
const (
	exitOK    = 0
	exitError = 1 // the command failed: a call refused, no kernel...
	exitUsage = 2
)

// commands are the subcommands, by name; hidden ones have no usage line.
var commands = map[string]func(args []string, stdin io.Reader, stdout, stderr io.Writer) error{
	"serve": serveCmd,
	"call":  callCmd,
	"watch": watchCmd,
	"demo":  demoCmd,
	// The demo's own processes (re-executions of this binary).
	demoKernelCmd: demoKernel,
	demoDaemonCmd: demoDaemon,
}

const usage = `usage:
  sypas serve [-socket PATH]               run an example kernel (-tcp, -grpc: for other hosts)
  sypas call  [-socket PATH] OP [BODY|-]   call an op (BODY "-" reads stdin)
  sypas watch [-socket PATH] [-n N] TOPIC  print the events published on TOPIC
  sypas demo                               a kernel and two daemons, then a benchmark
Run "sypas CMD -h" for a command's flags.
`

func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	if len(args) == 0 || commands[args[0]] == nil {
		fmt.Fprint(stderr, usage)
		return exitUsage
	}
	err := commands[args[0]](args[1:], stdin, stdout, stderr)
	switch {
	case err == nil:
		return exitOK
	case errors.Is(err, flag.ErrHelp):
		return exitOK
	case errors.Is(err, errUsage):
		return exitUsage
	}
	fmt.Fprintf(stderr, "sypas %s: %v\n", args[0], err)
	return exitError
}

// errUsage is a command line that does not parse; the flag package has
// already said why.
var errUsage = errors.New("usage")

// newFlags is a subcommand's flag set, writing its errors and usage to
// stderr.
func newFlags(name, args string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("sypas "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: sypas %s %s\n", name, args)
		fs.PrintDefaults()
	}
	return fs
}

// parse parses args into fs, wanting between min and max positional
// arguments (max < 0: any number).
func parse(fs *flag.FlagSet, args []string, min, max int) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	if n := fs.NArg(); n < min || max >= 0 && n > max {
		fs.Usage()
		return errUsage
	}
	return nil
}

// socketFlag adds -socket to fs.
func socketFlag(fs *flag.FlagSet) *string {
	return fs.String("socket", defaultSocket(), "the kernel's Unix socket, or tcp://HOST:PORT or grpc://HOST:PORT with -cert, -key and -ca")
}

// defaultSocket is where the kernel listens unless told otherwise: a place
// a user owns without root on a fresh machine.
func defaultSocket() string {
	if p := os.Getenv("SYPAS_SOCKET"); p != "" {
		return p
	}
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" {
		return filepath.Join(d, "sypas.sock")
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("sypas-%d", os.Geteuid()), "sypas.sock")
}
