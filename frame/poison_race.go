//go:build race

package frame

// poison overwrites the bytes of a frame the Reader no longer owns, so that
// code keeping a view past the next ReadFrame reads garbage under -race.
func poison(b []byte) {
	for i := range b {
		b[i] = 0xdb
	}
}
