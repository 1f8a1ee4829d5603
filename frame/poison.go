//go:build !race

package frame

// poison is a no-op outside -race builds (see poison_race.go).
func poison([]byte) {}
