package fuzz

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"slices"
	"sync"
	"testing"

	"github.com/sypas/go/bulk"
	"github.com/sypas/go/frame"
	"github.com/sypas/go/internal/closetest"
	"github.com/sypas/go/wire"
)

// FuzzBulk runs a program of operations against a real bulk region and the
// peer's mapping of it: honest allocations, sends and acknowledgements
// mixed with arbitrary descriptors to view and arbitrary (or forged) ACKs
// to release, as a hostile peer would send them. A model of the spans held
// and sent says what must succeed; the checks: a view never leaves the
// region, an ACK releases only a span that is outstanding (and exactly
// that one), every refusal is an ErrLease or ErrDescriptor and counted,
// and at the end every span comes back and the region is whole again.

const fuzzBulkSize, fuzzBulkBlock = 1 << 16, 4096

// The ops of a FuzzBulk program, one byte each, followed by their operands.
const (
	opAlloc      = iota // u16 size-1
	opSend              // u8 which held span, u8 flags (bit 0 checksum, then inner type)
	opAck               // u8 which sent span: its honest ACK
	opAckRaw            // 40 bytes: a BULK payload, decoded, or taken field by field if it does not decode
	opAckForged         // u8 which sent span, u8 field, u64 xor: its ACK with one field changed
	opViewRaw           // u32 region, u64 offset, u64 length
	opViewSent          // u8 which sent span: View and ReadInto of its descriptor
	opFree              // u8 which held span
	opFreeStale         // u8 which released span: Free again
	opReleaseAll        //
	opScribble          // u16 offset, u8 value: the peer writes the region
	numOps
)

// bulkPair is one region and its peer mapping per fuzzing process, reset to
// empty after each input: mapping one per input would pile up mappings
// faster than the garbage collector unmaps them.
var bulkPair = sync.OnceValues(func() (*bulk.Region, *bulk.PeerRegion) {
	r, err := bulk.CreateRegion(bulk.Config{Size: fuzzBulkSize, BlockSize: fuzzBulkBlock, ID: 5})
	if err != nil {
		panic(err)
	}
	f, err := closetest.PeerFile(r.File())
	if err != nil {
		panic(err)
	}
	p, err := bulk.OpenRegion(f, 5, fuzzBulkSize)
	if err != nil {
		panic(err)
	}
	return r, p
})

// program reads operands from the fuzzer's bytes; past the end it yields
// zeros.
type program []byte

func (p *program) u8() byte {
	if len(*p) == 0 {
		return 0
	}
	b := (*p)[0]
	*p = (*p)[1:]
	return b
}

func (p *program) bytes(n int) []byte {
	b := make([]byte, n)
	copy(b, *p)
	*p = (*p)[min(n, len(*p)):]
	return b
}

func (p *program) u16() uint16 { return binary.LittleEndian.Uint16(p.bytes(2)) }
func (p *program) u32() uint32 { return binary.LittleEndian.Uint32(p.bytes(4)) }
func (p *program) u64() uint64 { return binary.LittleEndian.Uint64(p.bytes(8)) }

type sentSpan struct {
	span bulk.Span
	desc wire.Bulk
}

func FuzzBulk(f *testing.F) {
	for _, s := range bulkSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		r, peer := bulkPair()
		before := r.Stats()
		ctx, cancel := context.WithCancel(context.Background())
		cancel() // never wait: the region is this program's alone
		var (
			held    []bulk.Span
			sent    []sentSpan
			stale   []bulk.Span
			refused uint64
		)
		release := func(i int) {
			stale = append(stale, sent[i].span)
			sent = slices.Delete(sent, i, i+1)
		}
		ack := func(d *wire.Bulk) {
			err := r.Ack(d)
			i := slices.IndexFunc(sent, func(s sentSpan) bool {
				return s.desc.Region == d.Region && s.desc.Lease == d.Lease &&
					s.desc.Offset == d.Offset && s.desc.Length == d.Length
			})
			switch {
			case err == nil && i < 0:
				t.Fatalf("ACK %+v released a span that was not outstanding", *d)
			case err == nil:
				release(i)
			case i >= 0:
				t.Fatalf("ACK %+v of an outstanding span refused: %v", *d, err)
			case !errors.Is(err, bulk.ErrLease) || wire.CodeOf(err) != wire.CodeProto:
				t.Fatalf("ACK refused with %v, want ErrLease", err)
			default:
				refused++
			}
		}
		view := func(d *wire.Bulk) {
			v, err := peer.View(d)
			mem := peer.Size()
			if err != nil {
				if !errors.Is(err, bulk.ErrDescriptor) {
					t.Fatalf("View refused with %v, want ErrDescriptor", err)
				}
				return
			}
			if d.Offset > uint64(mem) || d.Offset+d.Length > uint64(mem) || d.Length == 0 || uint64(len(v)) != d.Length || cap(v) != len(v) {
				t.Fatalf("View of %d+%d accepted in a region of %d bytes (view of %d)", d.Offset, d.Length, mem, len(v))
			}
			whole, _ := peer.View(&wire.Bulk{Region: d.Region, Length: uint64(mem)})
			if !within(v, whole) {
				t.Fatalf("view of %d+%d outside the region", d.Offset, d.Length)
			}
		}
		pick := func(n int, b byte) int { return int(b) % n }

		p := program(in)
		for steps := 0; len(p) > 0 && steps < 256; steps++ {
			switch p.u8() % numOps {
			case opAlloc:
				n := 1 + int(p.u16())
				s, err := r.Alloc(ctx, n)
				switch {
				case err == nil:
					if s.Len() != n || s.Cap() < n || s.Offset()+uint64(s.Cap()) > fuzzBulkSize {
						t.Fatalf("Alloc(%d): span %d+%d, capacity %d", n, s.Offset(), s.Len(), s.Cap())
					}
					for _, h := range held {
						if overlap(h, s) {
							t.Fatalf("span %d+%d overlaps held span %d+%d", s.Offset(), s.Cap(), h.Offset(), h.Cap())
						}
					}
					for _, h := range sent {
						if overlap(h.span, s) {
							t.Fatalf("span %d+%d overlaps sent span %d+%d", s.Offset(), s.Cap(), h.span.Offset(), h.span.Cap())
						}
					}
					held = append(held, s)
				case !errors.Is(err, bulk.ErrFull):
					t.Fatalf("Alloc(%d): %v", n, err)
				}
			case opSend:
				k, flags := p.u8(), p.u8()
				if len(held) == 0 {
					continue
				}
				i := pick(len(held), k)
				inner := []frame.Type{frame.TypeRequest, frame.TypeResponse, frame.TypeEvent}[int(flags>>1)%3]
				d, err := r.Send(held[i], inner, wire.BulkFlags(flags&1))
				if err != nil {
					t.Fatalf("Send of a held span: %v", err)
				}
				sent = append(sent, sentSpan{held[i], d})
				held = slices.Delete(held, i, i+1)
			case opAck:
				k := p.u8()
				if len(sent) > 0 {
					d := sent[pick(len(sent), k)].desc
					ack(&d)
				}
			case opAckRaw:
				raw := p.bytes(40)
				var d wire.Bulk
				if d.Decode(raw) != nil {
					d = wire.Bulk{Region: binary.LittleEndian.Uint32(raw[4:]), Offset: binary.LittleEndian.Uint64(raw[8:]),
						Length: binary.LittleEndian.Uint64(raw[16:]), Lease: binary.LittleEndian.Uint64(raw[24:])}
				}
				ack(&d)
			case opAckForged:
				k, field, x := p.u8(), p.u8(), p.u64()
				if len(sent) == 0 {
					continue
				}
				d := sent[pick(len(sent), k)].desc
				switch field % 4 {
				case 0:
					d.Region ^= uint32(x)
				case 1:
					d.Offset ^= x
				case 2:
					d.Length ^= x
				case 3:
					d.Lease ^= x
				}
				ack(&d)
			case opViewRaw:
				d := wire.Bulk{Region: p.u32(), Offset: p.u64(), Length: p.u64()}
				view(&d)
			case opViewSent:
				k := p.u8()
				if len(sent) == 0 {
					continue
				}
				d := sent[pick(len(sent), k)].desc
				v, err := peer.View(&d)
				if err != nil || uint64(len(v)) != d.Length {
					t.Fatalf("View of a sent span: %d bytes, %v", len(v), err)
				}
				buf := make([]byte, d.Length)
				if _, err := peer.ReadInto(buf, &d); err != nil && !errors.Is(err, bulk.ErrChecksum) {
					t.Fatalf("ReadInto of a sent span: %v", err) // a scribble may spoil the checksum, nothing else
				}
				if _, err := peer.ReadInto(buf[:len(buf)-1], &d); !errors.Is(err, io.ErrShortBuffer) {
					t.Fatalf("ReadInto a short buffer: %v", err)
				}
			case opFree:
				k := p.u8()
				if len(held) == 0 {
					continue
				}
				i := pick(len(held), k)
				if err := r.Free(held[i]); err != nil {
					t.Fatalf("Free of a held span: %v", err)
				}
				stale = append(stale, held[i])
				held = slices.Delete(held, i, i+1)
			case opFreeStale:
				k := p.u8()
				if len(stale) == 0 {
					continue
				}
				if err := r.Free(stale[pick(len(stale), k)]); !errors.Is(err, bulk.ErrInvalid) {
					t.Fatalf("Free of a released span: %v, want ErrInvalid", err)
				}
			case opReleaseAll:
				if n := r.ReleaseAll(); n != len(sent) {
					t.Fatalf("ReleaseAll released %d spans, %d were sent", n, len(sent))
				}
				for len(sent) > 0 {
					release(0)
				}
			case opScribble:
				off, val := p.u16(), p.u8()
				whole, _ := peer.View(&wire.Bulk{Region: 5, Length: fuzzBulkSize})
				whole[off] = val
			}
		}

		// Everything comes back, and the allocator is whole.
		for _, s := range held {
			if err := r.Free(s); err != nil {
				t.Fatalf("Free at the end: %v", err)
			}
		}
		if n := r.ReleaseAll(); n != len(sent) {
			t.Fatalf("ReleaseAll at the end released %d spans, %d were sent", n, len(sent))
		}
		st := r.Stats()
		if st.Spans != 0 || st.FreeBytes != fuzzBulkSize {
			t.Fatalf("after the program: %d spans, %d bytes free", st.Spans, st.FreeBytes)
		}
		if st.Refused-before.Refused != refused {
			t.Fatalf("%d refusals counted, %d ACKs refused", st.Refused-before.Refused, refused)
		}
		whole, err := r.Alloc(ctx, fuzzBulkSize)
		if err != nil {
			t.Fatalf("the whole region after the program: %v", err)
		}
		if err := r.Free(whole); err != nil {
			t.Fatal(err)
		}
	})
}

func overlap(a, b bulk.Span) bool {
	return a.Offset() < b.Offset()+uint64(b.Cap()) && b.Offset() < a.Offset()+uint64(a.Cap())
}

// bulkSeeds are FuzzBulk programs: honest exchanges, double and forged
// ACKs, views in and out of the region, a full region, scribbles.
func bulkSeeds() [][]byte {
	u16 := func(v uint16) []byte { return binary.LittleEndian.AppendUint16(nil, v) }
	cat := func(parts ...[]byte) []byte { return slices.Concat(parts...) }
	op := func(o byte, args ...byte) []byte { return append([]byte{o}, args...) }
	honest := wire.Bulk{InnerType: frame.TypeRequest, Region: 5, Offset: 4096, Length: 100, Lease: 7}
	rawAck, _ := honest.Append(nil)
	view := func(region uint32, off, n uint64) []byte {
		b := binary.LittleEndian.AppendUint32([]byte{opViewRaw}, region)
		b = binary.LittleEndian.AppendUint64(b, off)
		return binary.LittleEndian.AppendUint64(b, n)
	}
	return [][]byte{
		// alloc 5000, send with checksum, view it, ack it
		cat(op(opAlloc), u16(4999), op(opSend, 0, 1), op(opViewSent, 0), op(opAck, 0)),
		// the same ACK twice; a stale Free; ReleaseAll with nothing sent
		cat(op(opAlloc), u16(99), op(opSend, 0, 2), op(opAck, 0), op(opAckRaw), rawAck, op(opFreeStale, 0), op(opReleaseAll)),
		// forged ACKs of each field, then the honest one
		cat(op(opAlloc), u16(8191), op(opSend, 0, 0),
			op(opAckForged, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0), op(opAckForged, 0, 1, 0, 16, 0, 0, 0, 0, 0, 0),
			op(opAckForged, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0), op(opAckForged, 0, 3, 0, 0, 0, 0, 1, 0, 0, 0), op(opAck, 0)),
		// fill the region with small spans, one more fails, free some, merge for a large one
		cat(op(opAlloc), u16(32767), op(opAlloc), u16(16383), op(opAlloc), u16(8191), op(opAlloc), u16(4095),
			op(opAlloc), u16(0), op(opAlloc), u16(0), op(opFree, 1), op(opFree, 2), op(opAlloc), u16(20000)),
		// views: inside, at the end, past it, overflowing, another region
		cat(view(5, 0, 1), view(5, fuzzBulkSize-1, 1), view(5, fuzzBulkSize, 1), view(5, 1<<63, 1<<63), view(4, 0, 1)),
		// the peer scribbles over a sent span, which is then viewed and released at session end
		cat(op(opAlloc), u16(3000), op(opSend, 0, 1), op(opScribble), u16(10), []byte{0xff}, op(opViewSent, 0), op(opReleaseAll), op(opAck, 0)),
	}
}
