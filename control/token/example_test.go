package token_test

import (
	"bytes"
	"errors"
	"fmt"
	"time"

	"github.com/sypas/go/control/token"
)

// The kernel mints a token for an attested daemon; the daemon narrows it
// before handing it to a worker; the kernel verifies the narrowed token once
// per session and checks each operation against the cached Capability.
func Example() {
	keys := token.NewKeyring()
	if err := keys.Add(1, bytes.Repeat([]byte{0x42}, 32)); err != nil { // use Rotate() for a random key
		panic(err)
	}
	now := time.Unix(1_700_000_000, 0)
	daemon := token.Subject{UID: 1000, GID: 1000}

	tok, err := keys.Mint(token.Claims{
		ID:      7,
		Subject: daemon,
		Rights:  token.RightRequest | token.RightSubscribe | token.RightAdmin,
		Scope:   "svc/orders",
		Expiry:  now.Add(time.Hour),
	})
	if err != nil {
		panic(err)
	}

	// Any holder can attenuate, without the key.
	narrow, err := token.Attenuate(tok,
		token.RestrictRights(token.RightRequest),
		token.RestrictScope("svc/orders/eu"),
		token.RestrictExpiry(now.Add(10*time.Minute)))
	if err != nil {
		panic(err)
	}

	v := &token.Verifier{Keys: keys, Clock: func() time.Time { return now }}
	c, err := v.Verify(narrow, daemon)
	if err != nil {
		panic(err)
	}
	fmt.Println("id", c.ID, "rights", c.Rights, "scope", c.Scope, "valid for", c.Expiry.Sub(now))
	fmt.Println(c.Allows(token.RightRequest, "svc/orders/eu/checkout", now))
	fmt.Println(c.Allows(token.RightAdmin, "svc/orders/eu", now))
	fmt.Println(c.Allows(token.RightRequest, "svc/orders", now))
	err = c.Allows(token.RightRequest, "svc/orders/eu", now.Add(time.Hour))
	fmt.Println(err, errors.Is(err, token.ErrAuth))

	// Flipping one bit anywhere breaks the signature chain.
	narrow[len(narrow)-40] ^= 1
	_, err = v.Verify(narrow, daemon)
	fmt.Println(err)
	// Output:
	// id 7 rights request scope svc/orders/eu valid for 10m0s
	// <nil>
	// token: right not granted
	// token: scope not granted
	// token: expired true
	// token: signature mismatch
}

// A daemon schedules the refresh of its token at about three quarters of the
// lifetime.
func ExampleRefreshAt() {
	issued := time.Unix(1_700_000_000, 0)
	at := token.RefreshAt(issued, issued.Add(time.Hour), nil)
	d := at.Sub(issued)
	fmt.Println(d >= 42*time.Minute && d < 48*time.Minute)
	// Output: true
}
