package ring

import (
	"encoding/binary"
	"fmt"
	"math/bits"
)

// Byte offsets and sizes of the region layout (docs/PROTOCOL.md, section 5).
const (
	HeaderSize = 128 // region header: magic, version, capacity

	ProducerSlotOffset = 128 // producer control slot
	ConsumerSlotOffset = 256 // consumer control slot
	SlotSize           = 128 // two 64-byte lines: the index, then the wake-up words
	DataOffset         = 384 // first byte of the data area

	// Within a control slot.
	slotIndex  = 0  // uint64: tail (producer slot) or head (consumer slot)
	slotSleep  = 64 // uint32: 1 while this side is parked on the futex
	slotClosed = 68 // uint32: 1 once this side has closed

	RecordHeaderSize = 8 // uint32 length, uint32 type
	RecordAlign      = 8 // records start and end on 8-byte boundaries

	MinCapacity = 64      // smallest data area
	MaxCapacity = 1 << 30 // largest data area: 1 GiB

	Magic   uint64 = 0x474e525341505953 // the bytes "SYPASRNG" read as a little-endian uint64
	Version uint32 = 1
)

// Record types. Any other value in a record header is corruption.
const (
	recordData    uint32 = 1
	recordPadding uint32 = 2
)

// Header field offsets.
const (
	hdrMagic      = 0  // uint64
	hdrVersion    = 8  // uint32
	hdrDataOffset = 12 // uint32, always DataOffset in version 1
	hdrCapacity   = 16 // uint64, power of two in [MinCapacity, MaxCapacity]
)

// Size is the number of bytes a region needs for a ring whose data area holds
// capacity bytes.
func Size(capacity int) int { return DataOffset + capacity }

// MaxRecord is the largest payload a ring of the given capacity carries: one
// record filling the whole data area.
func MaxRecord(capacity int) int { return capacity - RecordHeaderSize }

// Init lays out an empty ring in mem, which must be 8-byte aligned and at least
// Size(capacity) bytes long; capacity must be a power of two between
// MinCapacity and MaxCapacity. It zeroes the control slots. Call it once, before
// either side attaches (the creator of a shared region does this).
func Init(mem []byte, capacity int) error {
	if err := checkCapacity(uint64(capacity)); err != nil {
		return err
	}
	if err := checkMem(mem, capacity); err != nil {
		return err
	}
	clear(mem[:DataOffset])
	binary.LittleEndian.PutUint64(mem[hdrMagic:], Magic)
	binary.LittleEndian.PutUint32(mem[hdrVersion:], Version)
	binary.LittleEndian.PutUint32(mem[hdrDataOffset:], DataOffset)
	binary.LittleEndian.PutUint64(mem[hdrCapacity:], uint64(capacity))
	return nil
}

func checkCapacity(c uint64) error {
	if c < MinCapacity || c > MaxCapacity || bits.OnesCount64(c) != 1 {
		return fmt.Errorf("%w: capacity %d is not a power of two in [%d, %d]", ErrInvalid, c, MinCapacity, MaxCapacity)
	}
	return nil
}

func checkMem(mem []byte, capacity int) error {
	if len(mem) < Size(capacity) {
		return fmt.Errorf("%w: region is %d bytes, a ring of capacity %d needs %d", ErrInvalid, len(mem), capacity, Size(capacity))
	}
	if !alignedForAtomics(mem) {
		return fmt.Errorf("%w: region is not 8-byte aligned", ErrInvalid)
	}
	return nil
}

// readHeader validates the header once and returns the capacity; the caller
// keeps it as its private copy and never reads the header again.
func readHeader(mem []byte) (int, error) {
	if len(mem) < DataOffset {
		return 0, fmt.Errorf("%w: region is %d bytes, shorter than the %d-byte header and slots", ErrInvalid, len(mem), DataOffset)
	}
	if !alignedForAtomics(mem) {
		return 0, fmt.Errorf("%w: region is not 8-byte aligned", ErrInvalid)
	}
	magic := binary.LittleEndian.Uint64(mem[hdrMagic:])
	version := binary.LittleEndian.Uint32(mem[hdrVersion:])
	dataOff := binary.LittleEndian.Uint32(mem[hdrDataOffset:])
	capacity := binary.LittleEndian.Uint64(mem[hdrCapacity:])
	switch {
	case magic != Magic:
		return 0, fmt.Errorf("%w: bad magic %#016x", ErrCorrupt, magic)
	case version != Version:
		return 0, fmt.Errorf("%w: layout version %d, want %d", ErrCorrupt, version, Version)
	case dataOff != DataOffset:
		return 0, fmt.Errorf("%w: data offset %d, want %d", ErrCorrupt, dataOff, DataOffset)
	}
	if err := checkCapacity(capacity); err != nil {
		return 0, fmt.Errorf("%w: header: %v", ErrCorrupt, err)
	}
	if uint64(len(mem)) < DataOffset+capacity {
		return 0, fmt.Errorf("%w: header claims capacity %d but the region holds %d data bytes", ErrCorrupt, capacity, len(mem)-DataOffset)
	}
	return int(capacity), nil
}

// maxIndex bounds the free-running indices: they never come near 2^64 (that
// would take 2^63 bytes of traffic), so a larger one is corruption and all
// index arithmetic stays free of wrap-around.
const maxIndex = 1 << 63

// validIndexPair checks a head and tail read from the region at attach time.
func validIndexPair(head, tail, capacity uint64) bool {
	return head&(RecordAlign-1) == 0 && tail&(RecordAlign-1) == 0 &&
		tail < maxIndex && head <= tail && tail-head <= capacity
}

// align rounds a record size up to RecordAlign.
func align(n uint64) uint64 { return (n + RecordAlign - 1) &^ (RecordAlign - 1) }

func packRecordHeader(length, typ uint32) uint64 { return uint64(length) | uint64(typ)<<32 }
