package futex

import (
	"sync/atomic"
	"testing"
)

func BenchmarkNotifyNoWaiter(b *testing.B) {
	var word atomic.Uint32
	b.ReportAllocs()
	for b.Loop() {
		Notify(&word)
	}
}

func BenchmarkNotifyWake(b *testing.B) {
	var word atomic.Uint32
	b.ReportAllocs()
	for b.Loop() {
		word.Store(parked)
		Notify(&word) // a FUTEX_WAKE with nobody asleep: the syscall's cost
	}
}

func BenchmarkWaitReady(b *testing.B) {
	var word atomic.Uint32
	w := NewWaiter(&word, Config{})
	ready := func() bool { return true }
	b.ReportAllocs()
	for b.Loop() {
		_ = w.Wait(ready)
	}
}

// BenchmarkPingPong measures a round trip between two goroutines, each
// waiting on its own sleep word, per policy.
func BenchmarkPingPong(b *testing.B) {
	for _, p := range []struct {
		name string
		cfg  Config
	}{
		{"auto", Config{}},
		{"auto-no-yield", Config{Yield: Off}},
		{"auto-no-spin", Config{Spin: Off}},
		{"spin", Config{Policy: PolicySpin}},
		{"park", Config{Policy: PolicyPark}},
	} {
		b.Run(p.name, func(b *testing.B) {
			var ping, pong, pingWord, pongWord atomic.Uint32
			a, c := NewWaiter(&pongWord, p.cfg), NewWaiter(&pingWord, p.cfg)
			defer c.Close()
			go func() {
				var i uint32
				ready := func() bool { return ping.Load() > i }
				for c.Wait(ready) == nil {
					i++
					pong.Store(i)
					Notify(&pongWord)
				}
			}()
			var i uint32
			ready := func() bool { return pong.Load() >= i }
			b.ReportAllocs()
			for b.Loop() {
				i++
				ping.Store(i)
				Notify(&pingWord)
				if err := a.Wait(ready); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
