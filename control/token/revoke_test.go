package token

import (
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
)

// Watch functions see every later Revoke, with the id already in the set,
// before Revoke returns; cancel stops them at once.
func TestRevocationsWatch(t *testing.T) {
	r := NewRevocations()
	var mu sync.Mutex
	var got []uint64
	var inSet []bool
	cancel := r.Watch(func(id uint64) {
		mu.Lock()
		defer mu.Unlock()
		got = append(got, id)
		inSet = append(inSet, r.Contains(id))
	})
	assert.Equal(t, 1, r.Watching())
	r.Revoke(7, time.Now().Add(time.Hour))
	r.Revoke(9, time.Now().Add(time.Hour))
	mu.Lock()
	assert.Equal(t, []uint64{7, 9}, got, "called before Revoke returned")
	assert.Equal(t, []bool{true, true}, inSet)
	mu.Unlock()

	cancel()
	cancel() // idempotent
	assert.Zero(t, r.Watching())
	r.Revoke(11, time.Now().Add(time.Hour))
	mu.Lock()
	assert.Equal(t, []uint64{7, 9}, got, "not called after cancel")
	mu.Unlock()
}
