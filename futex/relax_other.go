//go:build !amd64 && !arm64

package futex

// cpuRelax is a no-op where we have no spin-wait hint instruction.
func cpuRelax() {}
