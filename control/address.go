package control

import (
	"context"
	"net"
	"strings"
	"sync"
)

// ParseAddress splits a daemon's kernel address into a network and where
// to reach it on that network:
//
//	/run/sypas.sock, unix:///run/sypas.sock  → "unix", "/run/sypas.sock"
//	tcp://kernel.example:7070                → "tcp", "kernel.example:7070"
//	grpc://kernel.example:7443               → "grpc", "kernel.example:7443"
//
// Anything without a scheme is a Unix socket path, as before addresses
// existed. Another scheme names a transport that a package registers
// (RegisterTransport); whether one is registered is Dial's question. A
// malformed address is refused with ErrConfig.
func ParseAddress(addr string) (network, where string, err error) {
	scheme, rest, ok := strings.Cut(addr, "://")
	if !ok {
		if addr == "" {
			return "", "", configErr("address", "is empty")
		}
		return NetworkUnix, addr, nil
	}
	switch {
	case scheme == "":
		return "", "", configErr("address", "%q has an empty scheme", addr)
	case rest == "":
		return "", "", configErr("address", "%q names nothing after the scheme", addr)
	case scheme == NetworkUnix:
		if !strings.HasPrefix(rest, "/") {
			return "", "", configErr("address", "%q: a unix:// address is an absolute path (unix:///run/x.sock)", addr)
		}
		return NetworkUnix, rest, nil
	}
	if _, _, err := net.SplitHostPort(rest); err != nil {
		return "", "", configErr("address", "%q: want %s://host:port: %v", addr, scheme, err)
	}
	return scheme, rest, nil
}

// TransportDialer connects to a kernel at where (host:port) over a
// transport of its own, authenticating the kernel (cfg.TLS, say), and
// returns the stream as a net.Conn whose deadlines work as net.Conn's do.
// Dial then runs DialConn on it.
type TransportDialer func(ctx context.Context, where string, cfg DialConfig) (net.Conn, error)

var transports sync.Map // network → TransportDialer

// RegisterTransport makes Dial (and Client, and a sypas.Client) reach
// addresses network://host:port through dial: a package that builds a
// transport (gRPC) registers it when imported. Registering "unix", "tcp",
// an empty name or one twice panics: a mistake in the program.
func RegisterTransport(network string, dial TransportDialer) {
	if network == "" || network == NetworkUnix || network == "tcp" || dial == nil {
		panic("control: RegisterTransport(" + network + "): reserved or empty network, or nil dialer")
	}
	if _, dup := transports.LoadOrStore(network, dial); dup {
		panic("control: RegisterTransport(" + network + "): registered twice")
	}
}

func transportFor(network string) TransportDialer {
	if d, ok := transports.Load(network); ok {
		return d.(TransportDialer)
	}
	return nil
}

// ErrNoTransport: the address names a transport (grpc://) that is not
// built into this program: no package registered it. Dial tries the next
// fallback.
var ErrNoTransport = &noTransportError{}

type noTransportError struct{ network string }

func (e *noTransportError) Error() string {
	if e.network == "" {
		return "control: transport not built in this binary"
	}
	return "control: transport " + e.network + " is not built in this binary (import the package that registers it: RegisterTransport)"
}

func (e *noTransportError) Is(target error) bool { return target == ErrNoTransport }
