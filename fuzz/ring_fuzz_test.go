package fuzz

import (
	"encoding/binary"
	"errors"
	"io"
	"os"
	"testing"
	"time"

	"github.com/sypas/go/futex"
	"github.com/sypas/go/ring"
)

// A hostile producer controls every byte of the region the consumer maps.
// These targets check that whatever it writes, the consumer never panics,
// never hands out a view outside the data area, always terminates, and fails
// only with the documented errors.

const fuzzCapacity = 256

var parkAtOnce = ring.Config{Idle: futex.Config{Policy: futex.PolicyPark}}

// alignedRegion returns an 8-byte aligned, initialised ring region.
func alignedRegion(t testing.TB) []byte {
	words := make([]uint64, ring.Size(fuzzCapacity)/8)
	mem := asBytes(words)
	if err := ring.Init(mem, fuzzCapacity); err != nil {
		t.Fatal(err)
	}
	return mem
}

// checkConsumerError accepts only the errors a consumer may return here.
func checkConsumerError(t *testing.T, err error) {
	switch {
	case errors.Is(err, ring.ErrCorrupt), errors.Is(err, os.ErrDeadlineExceeded), errors.Is(err, io.EOF),
		errors.Is(err, ring.ErrViewsHeld):
	default:
		t.Fatalf("unexpected error %v", err)
	}
}

// drain reads until an error, checking every view lies inside the data area.
func drain(t *testing.T, c *ring.Consumer, mem []byte) {
	data := mem[ring.DataOffset:]
	for i := 0; i < 4*fuzzCapacity; i++ {
		v, err := c.Next()
		if err != nil {
			checkConsumerError(t, err)
			return
		}
		if len(v) > ring.MaxRecord(fuzzCapacity) || !within(v, data) {
			t.Fatalf("view of %d bytes outside the data area", len(v))
		}
		if i%3 == 0 {
			c.Release()
		}
	}
	t.Fatal("consumer did not stop: more records than a ring can hold")
}

// FuzzRingConsumer: the producer slot and the data area are arbitrary bytes.
// The input is: tail (8 bytes), producer-closed flag (1 byte), then data.
func FuzzRingConsumer(f *testing.F) {
	valid := func(recs ...[]byte) []byte {
		mem := alignedRegion(f)
		p, err := ring.NewProducer(mem, parkAtOnce)
		if err != nil {
			f.Fatal(err)
		}
		for _, r := range recs {
			if _, err := p.Write(r); err != nil {
				f.Fatal(err)
			}
		}
		in := binary.LittleEndian.AppendUint64(nil, binary.LittleEndian.Uint64(mem[ring.ProducerSlotOffset:]))
		in = append(in, 0)
		return append(in, mem[ring.DataOffset:]...)
	}
	f.Add(valid())
	f.Add(valid([]byte("hello")))
	f.Add(valid(make([]byte, 100), make([]byte, 100), make([]byte, 20)))
	f.Add(valid(make([]byte, ring.MaxRecord(fuzzCapacity))))
	f.Add([]byte{8, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0})
	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) < 9 {
			return
		}
		mem := alignedRegion(t)
		tail := binary.LittleEndian.Uint64(in)
		binary.LittleEndian.PutUint64(mem[ring.ProducerSlotOffset:], tail)
		mem[ring.ProducerSlotOffset+68] = in[8] // producer closed flag
		copy(mem[ring.DataOffset:], in[9:])
		c, err := ring.NewConsumer(mem, parkAtOnce)
		if err != nil {
			if !errors.Is(err, ring.ErrCorrupt) {
				t.Fatalf("attach: %v", err)
			}
			return
		}
		c.SetDeadline(time.Now().Add(-time.Second))
		drain(t, c, mem)
	})
}

// FuzzRingHeader: the whole header and both slots are arbitrary bytes.
func FuzzRingHeader(f *testing.F) {
	f.Add(alignedRegion(f)[:ring.DataOffset])
	f.Fuzz(func(t *testing.T, in []byte) {
		mem := alignedRegion(t)
		copy(mem, in)
		if c, err := ring.NewConsumer(mem, parkAtOnce); err == nil {
			c.SetDeadline(time.Now().Add(-time.Second))
			drain(t, c, mem)
		} else if !errors.Is(err, ring.ErrCorrupt) {
			t.Fatalf("consumer attach: %v", err)
		}
		if p, err := ring.NewProducer(mem, parkAtOnce); err == nil {
			p.SetDeadline(time.Now().Add(-time.Second))
			_, err := p.Write([]byte("x"))
			if err != nil && !errors.Is(err, ring.ErrCorrupt) && !errors.Is(err, os.ErrDeadlineExceeded) && !errors.Is(err, ring.ErrPeerClosed) {
				t.Fatalf("producer write: %v", err)
			}
		} else if !errors.Is(err, ring.ErrCorrupt) {
			t.Fatalf("producer attach: %v", err)
		}
	})
}

// FuzzRingScribble: an honest producer and consumer exchange records while
// the input scribbles on the region between steps. Each 4-byte op is: kind,
// offset (2 bytes), value. Every record read before the first scribble must
// be exactly what was written.
func FuzzRingScribble(f *testing.F) {
	f.Add([]byte{0, 10, 0, 0, 1, 0, 0, 0, 0, 50, 0, 0, 1, 0, 0, 0})
	f.Add([]byte{0, 200, 0, 0, 2, 0x80, 0x01, 0xff, 1, 0, 0, 0})
	f.Add([]byte{0, 100, 0, 0, 0, 100, 0, 0, 2, 0x88, 0x01, 0x07, 1, 0, 0, 0, 1, 0, 0, 0})
	f.Fuzz(func(t *testing.T, ops []byte) {
		mem := alignedRegion(t)
		p, err := ring.NewProducer(mem, parkAtOnce)
		if err != nil {
			t.Fatal(err)
		}
		c, err := ring.NewConsumer(mem, parkAtOnce)
		if err != nil {
			t.Fatal(err)
		}
		past := time.Now().Add(-time.Second)
		p.SetDeadline(past)
		c.SetDeadline(past)
		var sent [][]byte
		read, scribbled := 0, false
		for i := 0; i+4 <= len(ops) && i < 4*512; i += 4 {
			kind, off, val := ops[i]%3, int(binary.LittleEndian.Uint16(ops[i+1:])), ops[i+3]
			switch kind {
			case 0: // write a record of off%200 bytes filled with val
				msg := make([]byte, off%200)
				for j := range msg {
					msg[j] = val
				}
				if _, err := p.Write(msg); err == nil {
					sent = append(sent, msg)
				} else if !errors.Is(err, ring.ErrCorrupt) && !errors.Is(err, os.ErrDeadlineExceeded) && !errors.Is(err, ring.ErrPeerClosed) {
					t.Fatalf("write: %v", err)
				}
			case 1: // read a record
				v, err := c.Next()
				if err != nil {
					checkConsumerError(t, err)
					continue
				}
				if !within(v, mem[ring.DataOffset:]) {
					t.Fatal("view outside the data area")
				}
				if !scribbled {
					if read >= len(sent) || string(v) != string(sent[read]) {
						t.Fatalf("record %d differs from what was written", read)
					}
				}
				read++
				c.Release()
			case 2: // scribble one byte anywhere in the region
				mem[off%len(mem)] = val
				scribbled = true
			}
		}
		drain(t, c, mem)
	})
}
