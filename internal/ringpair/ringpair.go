// Package ringpair attaches a child process to the two rings its parent
// passed it as inherited files 3 (parent to child) and 4 (child to parent),
// as the benchmarks' echo peer is started. The control
// plane passes regions over its socket instead; this is the short way for a
// parent that starts its own peer.
package ringpair

import (
	"fmt"
	"os"

	"github.com/sypas/go/ring"
)

// Inherited maps both regions (checking seals and size) and attaches a
// consumer to fd 3's ring and a producer to fd 4's. The returned function
// closes both regions, and with them the ends (ring.Region.Close).
func Inherited(capacity int, cfg ring.Config) (*ring.Consumer, *ring.Producer, func(), error) {
	in, err := ring.OpenRegion(os.NewFile(3, "ring-from-parent"), capacity)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("fd 3: %w", err)
	}
	out, err := ring.OpenRegion(os.NewFile(4, "ring-to-parent"), capacity)
	if err != nil {
		in.Close()
		return nil, nil, nil, fmt.Errorf("fd 4: %w", err)
	}
	closeAll := func() {
		out.Close()
		in.Close()
	}
	c, err := in.NewConsumer(cfg)
	if err != nil {
		closeAll()
		return nil, nil, nil, err
	}
	p, err := out.NewProducer(cfg)
	if err != nil {
		closeAll()
		return nil, nil, nil, err
	}
	return c, p, closeAll, nil
}
