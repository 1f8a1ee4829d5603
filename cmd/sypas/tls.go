package main

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
)

// tlsFiles are the PEM files of a side that speaks TCP with TLS: its own
// certificate and key, and the CA that signs the other side's.
type tlsFiles struct{ cert, key, ca *string }

// tlsFlags adds -cert, -key and -ca to fs, for tcp:// and grpc://.
func tlsFlags(fs *flag.FlagSet, signs string) tlsFiles {
	return tlsFiles{
		cert: fs.String("cert", "", "PEM certificate of this side, for tcp:// and grpc:// (TLS 1.3)"),
		key:  fs.String("key", "", "PEM private key of -cert"),
		ca:   fs.String("ca", "", "PEM CA certificates that sign "+signs),
	}
}

func (f tlsFiles) set() bool { return *f.cert != "" || *f.key != "" || *f.ca != "" }

// load reads the three files; all are needed: the kernel verifies the
// daemon's certificate, and the daemon the kernel's.
func (f tlsFiles) load() (tls.Certificate, *x509.CertPool, error) {
	if *f.cert == "" || *f.key == "" || *f.ca == "" {
		return tls.Certificate{}, nil, errors.New("tcp:// or grpc:// needs -cert, -key and -ca (mutual TLS)")
	}
	cert, err := tls.LoadX509KeyPair(*f.cert, *f.key)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("-cert/-key: %w", err)
	}
	pem, err := os.ReadFile(*f.ca)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("-ca: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return tls.Certificate{}, nil, fmt.Errorf("-ca %s: no PEM certificate in it", *f.ca)
	}
	return cert, pool, nil
}

// client is the daemon's TLS configuration: its certificate, and the CA
// of the kernel's.
func (f tlsFiles) client() (*tls.Config, error) {
	cert, pool, err := f.load()
	if err != nil {
		return nil, err
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool, MinVersion: tls.VersionTLS13}, nil
}

// server is the kernel's TLS configuration: its certificate, and the CA
// of the daemons', whose certificates it requires and verifies (as
// control.ListenTLS would anyway; the gRPC server needs to be told).
func (f tlsFiles) server() (*tls.Config, error) {
	cert, pool, err := f.load()
	if err != nil {
		return nil, err
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}, ClientCAs: pool,
		ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS13}, nil
}

// isTCP reports whether addr names a kernel on TCP, with TLS: tcp:// or
// the gRPC service at grpc://.
func isTCP(addr string) bool {
	return strings.HasPrefix(addr, "tcp://") || strings.HasPrefix(addr, "grpc://")
}
