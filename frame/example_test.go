package frame_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"

	"github.com/sypas/go/frame"
)

func Example() {
	f := frame.Frame{
		Header: frame.Header{
			Type:        frame.TypeRequest,
			Flags:       frame.FlagChecksum,
			StreamID:    1,
			Sequence:    7,
			Correlation: 42,
			CapRef:      0x5eed,
		},
		Payload: []byte("hello"),
	}
	buf := make([]byte, 0, f.Len())
	buf, err := f.Append(buf)
	if err != nil {
		panic(err)
	}

	var got frame.Frame // views into buf: valid while buf is
	n, err := got.Decode(buf, frame.Config{})
	if err != nil {
		panic(err)
	}
	fmt.Println(n, got.Header)
	fmt.Printf("%q\n", got.Payload)

	buf[len(buf)-1] ^= 1 // corruption is caught by the CRC32C
	_, err = got.Decode(buf, frame.Config{})
	fmt.Println(errors.Is(err, frame.ErrChecksum))
	// Output:
	// 53 REQUEST flags=CHECKSUM stream=1 seq=7 corr=42 cap=0x5eed len=48+5
	// "hello"
	// true
}

func ExampleReader() {
	var stream bytes.Buffer
	w := frame.NewWriter(&stream, frame.Config{})
	for i := range 3 {
		err := w.WriteFrame(&frame.Frame{
			Header:  frame.Header{Type: frame.TypeEvent, Sequence: uint64(i)},
			Payload: []byte{'a' + byte(i)},
		})
		if err != nil {
			panic(err)
		}
	}

	r := frame.NewReader(&stream, frame.Config{})
	for {
		f, err := r.ReadFrame() // f is valid until the next ReadFrame
		if err == io.EOF {
			break
		}
		if err != nil {
			panic(err)
		}
		fmt.Println(f.Type, f.Sequence, string(f.Payload))
	}
	// Output:
	// EVENT 0 a
	// EVENT 1 b
	// EVENT 2 c
}

// A frame assembled in place in a reserved ring slot: the payload is written
// first, then the header, then the checksum.
func ExampleHeader_Put() {
	payload := "in place"
	slot := make([]byte, frame.HeaderSize+len(payload)) // e.g. a reserved ring record
	copy(slot[frame.HeaderSize:], payload)
	h := frame.Header{Type: frame.TypeResponse, Flags: frame.FlagChecksum | frame.FlagEndStream, PayloadLen: uint32(len(payload))}
	if err := h.Put(slot); err != nil {
		panic(err)
	}
	if err := frame.SetChecksum(slot); err != nil {
		panic(err)
	}
	var f frame.Frame
	_, err := f.Decode(slot, frame.Config{})
	fmt.Println(err, f.Type, f.Flags, string(f.Payload))
	// Output:
	// <nil> RESPONSE CHECKSUM|END_STREAM in place
}

func ExampleType_String() {
	fmt.Println(frame.TypeTokenRefresh, frame.Type(0x7f), frame.FlagAck|0x100)
	// Output:
	// TOKEN_REFRESH Type(0x7f) ACK|0x0100
}
