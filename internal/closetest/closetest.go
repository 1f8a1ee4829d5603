// Package closetest drives ring ends from goroutines until a Close from
// another goroutine ends them, for the tests that show closing never faults
// (ring, control). Each goroutine turns a memory fault into a recovered,
// counted panic (debug.SetPanicOnFault) instead of a crash, and after its
// loop ends it touches its last view again and makes one more call, as a
// careless caller would.
package closetest

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"runtime/debug"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sypas/go/futex"
	"github.com/sypas/go/internal/shm"
	"github.com/sypas/go/ring"
)

// Loop is the sequence of ring calls one goroutine repeats.
type Loop int

const (
	Next       Loop = iota // consumer: Next, reading each view whole; Release every 8 records
	ReadInto               // consumer: ReadInto
	Release                // consumer: Next, then Release after every record
	Reserve                // producer: Reserve, fill, Commit, Flush
	TryReserve             // producer: TryReserve (Reserve when nil), fill, Commit; Flush every 16
	Write                  // producer: Write
	Flush                  // producer: TryReserve (Reserve when nil), fill, Commit, Flush
)

// Policies are the idle modes a close test runs in.
var Policies = []futex.Policy{futex.PolicySpin, futex.PolicyPark, futex.PolicyAuto}

// ConsumerLoops and ProducerLoops together cover every ring call.
var (
	ConsumerLoops = []Loop{Next, ReadInto, Release}
	ProducerLoops = []Loop{Reserve, TryReserve, Write, Flush}
)

var loopNames = [...]string{"Next", "ReadInto", "Release", "Reserve", "TryReserve", "Write", "Flush"}

func (l Loop) String() string {
	if l >= 0 && int(l) < len(loopNames) {
		return loopNames[l]
	}
	return fmt.Sprintf("Loop(%d)", int(l))
}

// RecordSize is the payload of every record the loops write.
const RecordSize = 64

// Outcome is how a loop ended.
type Outcome struct {
	Loop  Loop
	Calls int   // successful calls before the loop ended
	Fault error // the memory fault the loop hit, recovered; nil if none
	Err   error // the error that ended the loop
	After error // what one more call returned after Err
	sum   byte  // what touch read, kept so that the reads are not optimized away
}

// Consume runs loop (one of ConsumerLoops) on c in a new goroutine until a
// call fails, and delivers how it ended.
func Consume(c *ring.Consumer, loop Loop) <-chan Outcome {
	return run(loop, func(o *Outcome) {
		var view []byte
		buf := make([]byte, RecordSize)
		for o.Err == nil {
			switch loop {
			case ReadInto:
				_, o.Err = c.ReadInto(buf)
			default:
				var v []byte
				if v, o.Err = c.Next(); o.Err == nil {
					view = v
					o.sum ^= touch(view)
					if loop == Release || o.Calls%8 == 7 {
						c.Release()
					}
				}
			}
			if o.Err == nil {
				o.Calls++
			}
		}
		o.sum ^= touch(view) // a view kept past Close: meaningless bytes, never a fault
		c.Release()
		if loop == ReadInto {
			_, o.After = c.ReadInto(buf)
		} else {
			_, o.After = c.Next()
		}
	})
}

// Produce runs loop (one of ProducerLoops) on p in a new goroutine until a
// call fails, and delivers how it ended.
func Produce(p *ring.Producer, loop Loop) <-chan Outcome {
	return run(loop, func(o *Outcome) {
		var res []byte
		msg := make([]byte, RecordSize)
		for o.Err == nil {
			msg[0]++
			switch loop {
			case Write:
				_, o.Err = p.Write(msg)
			case Reserve:
				if res, o.Err = p.Reserve(RecordSize); o.Err == nil {
					copy(res, msg)
					if o.Err = p.Commit(RecordSize); o.Err == nil {
						o.Err = p.Flush()
					}
				}
			default:
				b := p.TryReserve(RecordSize)
				if b == nil {
					b, o.Err = p.Reserve(RecordSize)
				}
				if o.Err == nil {
					res = b
					copy(res, msg)
					if o.Err = p.Commit(RecordSize); o.Err == nil && (loop == Flush || o.Calls%16 == 15) {
						o.Err = p.Flush()
					}
				}
			}
			if o.Err == nil {
				o.Calls++
			}
		}
		copy(res, msg) // a reservation written past Close: never a fault
		if loop == Write {
			_, o.After = p.Write(msg)
		} else {
			_, o.After = p.Reserve(RecordSize)
		}
	})
}

func run(loop Loop, body func(*Outcome)) <-chan Outcome {
	ch := make(chan Outcome, 1)
	go func() {
		o := Outcome{Loop: loop}
		defer func() { ch <- o }()
		debug.SetPanicOnFault(true) // for this goroutine only
		defer func() {
			if r := recover(); r != nil {
				if _, fault := r.(interface{ Addr() uintptr }); !fault {
					panic(r)
				}
				o.Fault = r.(error)
			}
		}()
		body(&o)
	}()
	return ch
}

// touch reads every byte of b, as a decoder would.
func touch(b []byte) byte {
	var x byte
	for _, v := range b {
		x ^= v
	}
	return x
}

// Mode records, the first record the near end sends: whether the far end
// (Peer) streams or leaves the rings alone.
const (
	ModeStream = 'S'
	ModeIdle   = 'I'
)

// Peer plays the far end of a ring pair until it ends: it reads the mode
// record (ModeStream or ModeIdle) from c; to stream, it then drains c and
// fills p as fast as it can, so that the near end's calls are busy; idle, it
// leaves both alone, so that the near end's calls block (an empty ring to
// read, a full one to write). It returns once its loops have ended, which
// they do when the session ends, with the faults they hit.
func Peer(c *ring.Consumer, p *ring.Producer) error {
	var mode [1]byte
	if _, err := c.ReadInto(mode[:]); err != nil {
		return nil // ended before the trial started
	}
	if mode[0] != ModeStream {
		return nil
	}
	co, po := Consume(c, Next), Produce(p, TryReserve)
	return errors.Join((<-co).Fault, (<-po).Fault)
}

// SendMode writes the mode record that Peer reads first.
func SendMode(p *ring.Producer, mode byte) error {
	_, err := p.Write([]byte{mode})
	return err
}

// Trials scales a close test: n trials by default, ten times more with
// SYPAS_STRESS=full, a tenth with -short.
func Trials(n int) int {
	switch {
	case os.Getenv("SYPAS_STRESS") == "full":
		return 10 * n
	case testing.Short():
		return max(n/10, 12)
	}
	return n
}

// Trial is trial i on the near ends c and p, whose far ends run Peer: it
// sends the mode record, starts a consumer loop on c and a producer loop on
// p, then calls closeFn while they run, and reports every memory fault and
// every loop that did not end with an error matching ring.ErrClosed (and
// ring.ErrClosed again on its next call). Trial i's mode (streaming, or
// blocked on an idle peer), loops and delay before closing all follow from
// i: any 96 consecutive trials cover every combination.
func Trial(c *ring.Consumer, p *ring.Producer, closeFn func() error, i int) (faults int, problems []string) {
	mode := byte(ModeStream)
	if i%2 == 1 {
		mode = ModeIdle
	}
	cl := ConsumerLoops[i/2%len(ConsumerLoops)]
	pl := ProducerLoops[i/6%len(ProducerLoops)]
	delay := []time.Duration{0, 50 * time.Microsecond, 500 * time.Microsecond, 2 * time.Millisecond}[i/24%4]
	what := fmt.Sprintf("trial %d (%c, %v+%v, close after %v)", i, mode, cl, pl, delay)
	if err := SendMode(p, mode); err != nil {
		return 0, []string{fmt.Sprintf("%s: mode record: %v", what, err)}
	}
	co, po := Consume(c, cl), Produce(p, pl)
	time.Sleep(delay)
	if err := closeFn(); err != nil {
		problems = append(problems, fmt.Sprintf("%s: close: %v", what, err))
	}
	timeout := time.After(30 * time.Second)
	for _, ch := range []<-chan Outcome{co, po} {
		select {
		case o := <-ch:
			switch {
			case o.Fault != nil:
				faults++
				problems = append(problems, fmt.Sprintf("%s: %v faulted after %d calls: %v", what, o.Loop, o.Calls, o.Fault))
			case !errors.Is(o.Err, ring.ErrClosed) || !errors.Is(o.After, ring.ErrClosed):
				problems = append(problems, fmt.Sprintf("%s: %v ended with %v, then %v; want ring.ErrClosed", what, o.Loop, o.Err, o.After))
			}
		case <-timeout:
			return faults, append(problems, fmt.Sprintf("%s: a loop is still blocked 30 s after Close", what))
		}
	}
	return faults, problems
}

// TrialWithPeer is Trial with the far ends fc and fp in this process: it
// runs Peer on them meanwhile, and also reports a fault of the peer's loops
// or loops that do not end (the far ends must end when the near ones close,
// as they do when they see the near ends closed or their session end).
func TrialWithPeer(c *ring.Consumer, p *ring.Producer, fc *ring.Consumer, fp *ring.Producer, closeFn func() error, i int) (faults int, problems []string) {
	peer := make(chan error, 1)
	go func() { peer <- Peer(fc, fp) }()
	faults, problems = Trial(c, p, closeFn, i)
	select {
	case err := <-peer:
		if err != nil {
			faults++
			problems = append(problems, fmt.Sprintf("trial %d: the peer faulted: %v", i, err))
		}
	case <-time.After(30 * time.Second):
		problems = append(problems, fmt.Sprintf("trial %d: the peer's loops did not end", i))
	}
	return faults, problems
}

// Tally adds up the trials of a close test.
type Tally struct {
	trials, faults int
	problems       []string
}

// Add counts one trial, with what Trial returned for it.
func (ty *Tally) Add(faults int, problems []string) {
	ty.trials++
	ty.faults += faults
	ty.problems = append(ty.problems, problems...)
}

// Check logs the counts and fails t on any fault or problem.
func (ty *Tally) Check(t testing.TB) {
	t.Helper()
	t.Logf("%d trials, %d faults, %d problems", ty.trials, ty.faults, len(ty.problems))
	if ty.faults > 0 {
		t.Errorf("%d memory faults", ty.faults)
	}
	if len(ty.problems) > 0 {
		t.Errorf("%d problems, the first ones:\n%s", len(ty.problems), strings.Join(ty.problems[:min(len(ty.problems), 10)], "\n"))
	}
}

// PeerFile duplicates f's descriptor, as SCM_RIGHTS would for a peer, so
// that a test can map a region a second time, as the peer process does.
func PeerFile(f *os.File) (*os.File, error) {
	fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(fd), "dup:"+f.Name()), nil
}

// Collect runs the garbage collector until no more than mapped regions are
// mapped (shm.Mapped): closed regions are unmapped by a cleanup once they
// are unreachable, some time after a collection. It fails t after 10 s.
func Collect(t testing.TB, mapped int) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); shm.Mapped() > mapped; {
		if time.Now().After(deadline) {
			t.Fatalf("%d regions still mapped 10 s after they were closed, want %d", shm.Mapped(), mapped)
		}
		runtime.GC()
		time.Sleep(time.Millisecond)
	}
}

// IsMapped reports whether the kernel has every page of mem mapped.
func IsMapped(mem []byte) bool { return unix.Msync(mem, unix.MS_ASYNC) == nil }

// WaitUnmapped runs the garbage collector until the kernel no longer maps
// mem's pages, which happens once the closed region holding them is
// unreachable. It fails t after 10 s.
func WaitUnmapped(t testing.TB, mem []byte) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; {
		err := unix.Msync(mem, unix.MS_ASYNC)
		if errors.Is(err, unix.ENOMEM) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("region at %p still mapped 10 s after it became unreachable (msync: %v)", mem, err)
		}
		runtime.GC()
		time.Sleep(time.Millisecond)
	}
}
