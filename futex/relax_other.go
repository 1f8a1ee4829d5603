//go:build !amd64 && !arm64

package futex

import "sync/atomic"

// cpuRelax is a no-op where we have no spin-wait hint instruction.
func cpuRelax() {}

var fenceWord atomic.Uint32

// fullFence falls back to an atomic read-modify-write, which is a full
// barrier on the common architectures.
func fullFence() { fenceWord.Add(0) }
