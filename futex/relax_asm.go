//go:build amd64 || arm64

package futex

// cpuRelax tells the CPU we are in a spin-wait loop (PAUSE on amd64, YIELD on
// arm64): it saves power, frees execution resources for an SMT sibling and
// avoids the memory-order mis-speculation penalty when the awaited line
// changes.
//
//go:noescape
func cpuRelax()

// fullFence orders every earlier load and store before every later one
// (MFENCE, DMB ISH). See raceFence for the one place it is needed.
//
//go:noescape
func fullFence()
