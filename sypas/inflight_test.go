package sypas

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
)

// More callers than max_in_flight wait for a slot on the client: the
// kernel never sees more than max_in_flight requests outstanding, so it
// refuses none, even when a reply and the next request cross (the kernel
// must count a request out of flight before its answer can reach the
// daemon). max_in_flight 1 makes that crossing as likely as it gets: it
// failed most runs without -race, and some with it, before the fix.
func TestMaxInFlightCallersWait(t *testing.T) {
	cfg := ServerConfig{}
	cfg.MaxInFlight = 1
	k := startKernel(t, cfg, func(s *Server) {
		s.Handle("echo", RightRequest, echo, Inline)
		s.Handle("echo.pool", RightRequest, echo)
		s.Handle("slow", RightRequest, func(_ context.Context, r *Request) ([]byte, error) {
			time.Sleep(50 * time.Microsecond)
			return r.Body, nil
		})
	})
	c := dialT(t, k.path, ClientConfig{MaxAttempts: 1}) // a refusal would surface
	echoes(t, c, 16, 200, func(g int) string { return []string{"echo", "echo.pool", "slow"}[g%3] })
	assert.Zero(t, k.srv.Stats().Denied, "the kernel refused requests of a well-behaved client")
}
