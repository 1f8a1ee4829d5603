package control

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A Client with an invalid DialConfig says so at once. Before, it redialed
// in the background forever and Session reported the error only after its
// context ended.
func TestClientRefusesInvalidConfig(t *testing.T) {
	c := NewClient("/nonexistent", DialConfig{SessionConfig: SessionConfig{HeartbeatInterval: -time.Second}})
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	_, err := c.Session(ctx)
	require.ErrorIs(t, err, ErrConfig)
	assert.Contains(t, err.Error(), "DialConfig.HeartbeatInterval")
	assert.NoError(t, ctx.Err(), "returned before the context ended")
	assert.Less(t, time.Since(start), 5*time.Second)
	assert.NoError(t, c.Close())
}
