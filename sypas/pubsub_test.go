package sypas

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/control"
	"github.com/sypas/go/frame"
	"github.com/sypas/go/wire"
)

// subscribeRaw subscribes the raw daemon to topic as id, and reads the
// kernel's acknowledgement.
func (d *rawDaemon) subscribe(corr, id uint64, topic string) {
	d.t.Helper()
	p, err := (&wire.Subscribe{SubscriptionID: id, Topic: []byte(topic)}).Append(nil)
	require.NoError(d.t, err)
	d.frame(frame.Header{Type: frame.TypeSubscribe, Correlation: corr}, p)
	d.expectResponse(corr)
}

// DropNewest never makes the publisher wait, not even for a subscriber
// whose ring is full of the answers the kernel is still trying to write
// (their writer holds the ring while it waits for room).
func TestPublishDropNewestNeverWaits(t *testing.T) {
	cfg := ServerConfig{WriteTimeout: time.Minute}
	k := startKernel(t, cfg, func(s *Server) {
		s.Handle("big", RightRequest, func(context.Context, *Request) ([]byte, error) {
			return make([]byte, 30<<10), nil
		}, Inline)
	})
	d := dialRaw(t, k.path, control.DialConfig{SessionConfig: control.SessionConfig{RxRingSize: 64 << 10}})
	d.subscribe(1, 7, "news")
	for corr := uint64(2); corr < 5; corr++ { // two answers fit, the third waits for room
		d.request(frame.Header{Correlation: corr}, "big", nil)
	}
	time.Sleep(50 * time.Millisecond) // let the third writer wait
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for i := range 3 {
		start := time.Now()
		require.NoError(t, k.srv.Publish(ctx, "news", []byte("e")), "DropNewest reports nothing")
		assert.Less(t, time.Since(start), promptly, "Publish %d waited for a full subscriber", i)
	}
	assert.Equal(t, uint64(3), k.srv.Stats().Dropped)
}
