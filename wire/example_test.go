package wire_test

import (
	"errors"
	"fmt"

	"github.com/sypas/go/frame"
	"github.com/sypas/go/wire"
)

func Example() {
	// Encode a REQUEST frame straight into a buffer (a ring slot would do).
	req := wire.Request{Method: []byte("kv.get"), Body: []byte("key=a")}
	h := frame.Header{Flags: frame.FlagChecksum, StreamID: 1, Correlation: 42, CapRef: 0x8badf00d}
	buf, err := wire.AppendFrame(make([]byte, 0, 128), h, &req)
	if err != nil {
		panic(err)
	}

	// Decode: frame first, then the payload; both are views into buf.
	var f frame.Frame
	if _, err := f.Decode(buf, frame.Config{}); err != nil {
		panic(err)
	}
	var got wire.Request
	if err := wire.DecodeFrame(&f, &got); err != nil {
		panic(err)
	}
	fmt.Printf("%v corr=%d method=%s body=%s\n", f.Type, f.Correlation, got.Method, got.Body)
	// Output:
	// REQUEST corr=42 method=kv.get body=key=a
}

func ExampleError() {
	// An ERROR payload as received from the peer...
	msg := wire.ErrorMsg{Code: wire.CodeResource, RetryAfterMs: 20, Message: []byte("ring full")}
	var err error = msg.Err()

	// ...is an ordinary Go error.
	fmt.Println(err)
	fmt.Println(errors.Is(err, wire.ErrResource), errors.Is(err, wire.ErrAuth))
	fmt.Println(wire.Retryable(err), wire.ClassOf(err))
	var e *wire.Error
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
	for _, c := range []wire.Code{wire.CodeAuth, wire.CodeTimeout, wire.CodeProto, 0x1234} {
		fmt.Println(c, c.Class())
	}
	// Output:
	// E_AUTH reauthenticate
	// E_TIMEOUT transient
	// E_PROTO fatal
	// Code(0x1234) fatal
}

func ExampleRegions_Decode() {
	announce := wire.Regions{Entries: []wire.Region{
		{Role: wire.RoleControl, ID: 0, Size: 4096},
		{Role: wire.RoleBulk, ID: 1, Size: 1 << 20, Flags: wire.RegionReadOnly},
	}}
	p, err := announce.Append(nil)
	if err != nil {
		panic(err)
	}
	// Reuse one Regions value to decode without allocating.
	got := wire.Regions{Entries: make([]wire.Region, 0, wire.MaxRegions)}
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
