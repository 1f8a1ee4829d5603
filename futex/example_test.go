package futex_test

import (
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"time"

	"github.com/sypas/go/futex"
)

// A consumer waits for items that a producer counts up. Here both are
// goroutines and the words are ordinary variables; between processes both
// words live in a shared memfd region, one 128-byte slot each.
func Example() {
	var (
		produced  atomic.Uint32 // written by the producer
		sleepWord atomic.Uint32 // the consumer's sleep word
	)
	w := futex.NewWaiter(&sleepWord, futex.Config{}) // spin, yield, then park
	defer w.Close()
	w.SetDeadline(time.Now().Add(10 * time.Second))

	go func() {
		for range 3 {
			time.Sleep(time.Millisecond) // long enough for the consumer to park
			produced.Add(1)              // publish with an atomic write...
			futex.Notify(&sleepWord)     // ...then wake the consumer if it sleeps
		}
	}()

	var consumed uint32
	hasItem := func() bool { return produced.Load() > consumed } // made once: no allocation per Wait
	for consumed < 3 {
		if err := w.Wait(hasItem); err != nil {
			fmt.Println(err)
			return
		}
		consumed++
		fmt.Println("consumed item", consumed)
	}

	// Nothing more will come: the deadline ends the wait...
	w.SetDeadline(time.Now().Add(5 * time.Millisecond))
	fmt.Println(errors.Is(w.Wait(hasItem), os.ErrDeadlineExceeded))
	// ...and after Close every Wait fails at once.
	w.Close()
	fmt.Println(w.Wait(hasItem))
	// Output:
	// consumed item 1
	// consumed item 2
	// consumed item 3
	// true
	// futex: file already closed
}
