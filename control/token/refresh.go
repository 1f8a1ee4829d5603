package token

import (
	"math/rand/v2"
	"time"
)

// Refresh schedule: a daemon asks for a new token at RefreshFraction of the
// lifetime, plus or minus RefreshJitter of the lifetime, drawn uniformly.
// The jitter spreads the refreshes of daemons started together so they do
// not hit the kernel in one burst; 70..80 % leaves a fifth of the lifetime
// to retry before the token expires.
const (
	RefreshFraction = 0.75
	RefreshJitter   = 0.05
)

// RefreshAt returns when a token valid from issued to expiry should be
// refreshed: issued + lifetime*(0.75 ± 0.05). rnd may be nil (the global
// source). A lifetime of zero or less returns issued: refresh now.
func RefreshAt(issued, expiry time.Time, rnd *rand.Rand) time.Time {
	life := expiry.Sub(issued)
	if life <= 0 {
		return issued
	}
	var u float64
	if rnd != nil {
		u = rnd.Float64()
	} else {
		u = rand.Float64()
	}
	f := RefreshFraction + RefreshJitter*(2*u-1) // in [0.70, 0.80)
	return issued.Add(time.Duration(float64(life) * f))
}
