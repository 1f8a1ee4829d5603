package sypas_test

import (
	"errors"
	"fmt"

	"github.com/sypas/sypas/frame"
	"github.com/sypas/sypas/sypas"
)

func Example() {
	// Encode a REQUEST frame straight into a buffer (a ring slot would do).
	req := sypas.Request{Method: []byte("kv.get"), Body: []byte("key=a")}
	h := frame.Header{Flags: frame.FlagChecksum, StreamID: 1, Correlation: 42, CapRef: 0x8badf00d}
	buf, err := sypas.AppendFrame(make([]byte, 0, 128), h, &req)
	if err != nil {
		panic(err)
	}

	// Decode: frame first, then the payload; both are views into buf.
	var f frame.Frame
	if _, err := f.Decode(buf, frame.Config{}); err != nil {
		panic(err)
	}
	var got sypas.Request
	if err := sypas.DecodeFrame(&f, &got); err != nil {
		panic(err)
	}
	fmt.Printf("%v corr=%d method=%s body=%s\n", f.Type, f.Correlation, got.Method, got.Body)
	// Output:
	// REQUEST corr=42 method=kv.get body=key=a
}

func ExampleError() {
	// An ERROR payload as received from the peer...
	wire := sypas.ErrorMsg{Code: sypas.CodeResource, RetryAfterMs: 20, Message: []byte("ring full")}
	var err error = wire.Err()

	// ...is an ordinary Go error.
	fmt.Println(err)
	fmt.Println(errors.Is(err, sypas.ErrResource), errors.Is(err, sypas.ErrAuth))
	fmt.Println(sypas.Retryable(err), sypas.ClassOf(err))
	var e *sypas.Error
	if errors.As(err, &e) {
		fmt.Println(e.Code, e.RetryAfter)
	}
	// Output:
	// sypas: E_RESOURCE: ring full
	// true false
	// true transient
	// E_RESOURCE 20ms
}

func ExampleCode_Class() {
	for _, c := range []sypas.Code{sypas.CodeAuth, sypas.CodeTimeout, sypas.CodeProto, 0x1234} {
		fmt.Println(c, c.Class())
	}
	// Output:
	// E_AUTH reauthenticate
	// E_TIMEOUT transient
	// E_PROTO fatal
	// Code(0x1234) fatal
}

func ExampleRegions_Decode() {
	announce := sypas.Regions{Entries: []sypas.Region{
		{Role: sypas.RoleControl, ID: 0, Size: 4096},
		{Role: sypas.RoleBulk, ID: 1, Size: 1 << 20, Flags: sypas.RegionReadOnly},
	}}
	p, err := announce.Append(nil)
	if err != nil {
		panic(err)
	}
	// Reuse one Regions value to decode without allocating.
	got := sypas.Regions{Entries: make([]sypas.Region, 0, sypas.MaxRegions)}
	if err := got.Decode(p); err != nil {
		panic(err)
	}
	for i, r := range got.Entries {
		fmt.Printf("fd %d: %v id=%d size=%d\n", i, r.Role, r.ID, r.Size)
	}
	// Output:
	// fd 0: CONTROL id=0 size=4096
	// fd 1: BULK id=1 size=1048576
}
