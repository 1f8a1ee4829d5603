package sypas

import (
	"context"
	"fmt"
	"net"

	"github.com/sypas/go/control"
)

// ServeConn runs the kernel handshake on conn, a reliable byte stream
// whose transport has already attested its peer (a gRPC Session stream:
// the verified client certificate, control.AttestTLS), then serves the
// session as Serve serves one from a Listener: same enforcer, tokens bound
// to peer's Subject, audit records, Shutdown and Close. The data plane is
// inline on conn (docs/PROTOCOL.md §8.6). ServeConn owns conn from the
// start, returns when the session ends (the error is the handshake's, or
// nil), and may be called from many goroutines at once, with or without
// Serve. peer must be a network peer (control.Server.HandshakeConn).
func (s *Server) ServeConn(ctx context.Context, conn net.Conn, peer control.PeerIdentity) error {
	cs, err := s.streamServer()
	if err != nil {
		conn.Close()
		return err
	}
	s.mu.Lock()
	if s.stopping {
		s.mu.Unlock()
		conn.Close()
		return fmt.Errorf("sypas: ServeConn: %w: the server is shutting down", ErrClosed)
	}
	s.streams.Add(1) // Shutdown and Close wait for it, as for Serve's sessions
	s.mu.Unlock()
	defer s.streams.Done()
	hctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(s.base, cancel) // Close cancels a handshake in progress
	defer stop()
	sess, err := cs.HandshakeConn(hctx, conn, peer)
	if err != nil {
		return err
	}
	defer sess.Close()
	s.serveSession(sess)
	return nil
}

// streamServer is the control plane's Server for ServeConn, made on first
// use from the Server's configuration (its own Limits: streams are
// admitted apart from the Listener's connections).
func (s *Server) streamServer() (*control.Server, error) {
	s.streamOnce.Do(func() {
		s.stream, s.streamErr = control.NewStreamServer(s.cfg.ServerConfig)
		if s.streamErr != nil {
			s.streamErr = fmt.Errorf("sypas: ServeConn: %w", s.streamErr)
		}
	})
	return s.stream, s.streamErr
}

// Stopping is closed when Shutdown or Close begins: a transport that
// serves the Server its own way (package sypasgrpc's health service, its
// Subscribe streams) stops then.
func (s *Server) Stopping() <-chan struct{} { return s.quit }
