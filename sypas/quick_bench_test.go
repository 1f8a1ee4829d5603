package sypas

import (
	"context"
	"testing"
)

func BenchmarkQuickCall(b *testing.B) {
	k := startKernel(b, ServerConfig{}, func(s *Server) { s.Handle("echo", RightRequest, echo, Inline) })
	c := dialT(b, k.path, ClientConfig{})
	msg := make([]byte, 64)
	buf := make([]byte, 0, 64)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := c.CallInto(ctx, "echo", msg, buf[:0]); err != nil {
			b.Fatal(err)
		}
	}
}
