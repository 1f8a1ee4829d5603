package ring

import "github.com/sypas/go/futex"

// Config tunes an endpoint. The zero value is the recommended default.
type Config struct {
	// Idle is how a consumer waits on an empty ring and a producer on a full
	// one: spin, yield, then park on a futex. The zero value picks defaults
	// from the machine (no spinning where only one CPU is usable).
	Idle futex.Config
}
