package ring

import (
	"sync/atomic"
	"unsafe"
)

// unsafeBytes views an aligned []uint64 as bytes, for tests that need an
// 8-byte aligned region without mmap.
func unsafeBytes(words []uint64) []byte {
	return unsafe.Slice((*byte)(unsafe.Pointer(&words[0])), len(words)*8)
}

// SleepWord is the sleep word of the control slot at slot
// (ProducerSlotOffset or ConsumerSlotOffset) of the region mem, for tests
// that play a Notify step by step.
func SleepWord(mem []byte, slot int) *atomic.Uint32 { return u32At(mem, slot+slotSleep) }
