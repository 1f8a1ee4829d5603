package futex

import (
	"testing"
	"time"
)

func TestPollerReady(t *testing.T) {
	p := NewPoller(Config{Spin: time.Millisecond, Yield: time.Millisecond})
	n := 0
	if !p.Poll(func() bool { n++; return n == 5 }, time.Time{}) {
		t.Fatal("Poll gave up before ready reported true")
	}
	if n != 5 {
		t.Fatalf("ready polled %d times after it reported true at 5", n)
	}
}

func TestPollerGivesUp(t *testing.T) {
	p := NewPoller(Config{Spin: 200 * time.Microsecond, Yield: 200 * time.Microsecond})
	polls := 0
	start := time.Now()
	if p.Poll(func() bool { polls++; return false }, time.Time{}) {
		t.Fatal("Poll reported a ready that never was")
	}
	// The budgets bound the wait (a loaded machine may stretch it; no
	// upper bound on time is asserted, only that it ended).
	if took := time.Since(start); took < 200*time.Microsecond && polls < 2 {
		t.Fatalf("Poll gave up after %v and %d polls", took, polls)
	}
}

func TestPollerPark(t *testing.T) {
	p := NewPoller(Config{Policy: PolicyPark})
	polls := 0
	if p.Poll(func() bool { polls++; return false }, time.Time{}) || polls != 1 {
		t.Fatalf("PolicyPark: Poll polled %d times, want 1 and false", polls)
	}
}

func TestPollerSpinEndsAtDeadline(t *testing.T) {
	p := NewPoller(Config{Policy: PolicySpin})
	if p.Poll(func() bool { return false }, time.Now().Add(2*time.Millisecond)) {
		t.Fatal("PolicySpin: Poll reported a ready that never was")
	}
	if p.Poll(func() bool { return false }, time.Now().Add(-time.Second)) {
		t.Fatal("a past deadline: Poll reported a ready that never was")
	}
}

func TestPollerAllocs(t *testing.T) {
	p := NewPoller(Config{})
	n := 0
	ready := func() bool { n++; return n%3 == 0 }
	if a := testing.AllocsPerRun(100, func() { p.Poll(ready, time.Time{}) }); a != 0 {
		t.Fatalf("Poll allocates %v times", a)
	}
}
