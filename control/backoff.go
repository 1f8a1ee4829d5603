package control

import (
	"math"
	"time"
)

// Backoff is an exponential backoff with jitter, gRPC's connection-backoff
// algorithm (doc/connection-backoff.md). The zero value is gRPC's defaults:
// 1 s base, ×1.6 per attempt, ±20 % jitter, 120 s cap.
type Backoff struct {
	Base       time.Duration // zero: 1 s
	Multiplier float64       // zero (or < 1): 1.6
	Jitter     float64       // zero: 0.2; negative: none; 1 or more is refused (ErrConfig)
	Max        time.Duration // zero: 120 s
}

func (b Backoff) withDefaults() Backoff {
	if b.Base <= 0 {
		b.Base = time.Second
	}
	if b.Multiplier < 1 {
		b.Multiplier = 1.6
	}
	if b.Jitter == 0 {
		b.Jitter = 0.2
	}
	if b.Jitter < 0 {
		b.Jitter = 0
	}
	if b.Max <= 0 {
		b.Max = 120 * time.Second
	}
	return b
}

// Delay is how long to wait after a failure when retries failures came
// before it in a row (0 after the first): min(Base×Multiplier^retries, Max),
// then scaled by a factor uniform in [1-Jitter, 1+Jitter) drawn from rnd,
// which returns values in [0, 1). As in gRPC the jitter applies after the
// cap, so a delay can reach Max×(1+Jitter) (144 s by default). It is a pure
// function so tests can inject rnd; jitter keeps daemons that lost the same
// kernel from redialing in lockstep.
func (b Backoff) Delay(retries int, rnd func() float64) time.Duration {
	b = b.withDefaults()
	d := float64(b.Base) * math.Pow(b.Multiplier, float64(max(retries, 0)))
	d = min(d, float64(b.Max))
	d *= 1 + b.Jitter*(2*rnd()-1)
	if d < 0 {
		return 0
	}
	return time.Duration(d)
}

func sleep(d time.Duration) <-chan time.Time { return time.After(d) }
