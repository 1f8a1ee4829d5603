// Package affinity pins the calling goroutine's thread to one CPU, for the
// busy-polling parts of benchmarks: spinning only pays when each
// side has a CPU of its own.
package affinity
