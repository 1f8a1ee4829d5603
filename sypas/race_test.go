//go:build race

package sypas

// raceEnabled: the race detector makes sync.Pool drop what is put in it
// at random, so crypto/tls's pooled buffers are allocated again.
const raceEnabled = true
