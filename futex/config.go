package futex

import (
	"fmt"
	"runtime"
	"time"

	"github.com/klauspost/cpuid/v2"
)

// Policy is how a Waiter idles while its condition is false.
type Policy int

const (
	// PolicyAuto spins, then yields, then parks (sleeps in the kernel). It is
	// the default: low latency when the peer answers quickly, no CPU burnt
	// when it does not. It spins in bursts with a yield between them, and
	// shortens the bursts, down to none, while its yields let the peer
	// answer: on a busy machine the peer often shares our CPU, and then
	// answers at once instead of after the spin. A yield that gives the CPU
	// to a thread that keeps it (a busy process) makes it park instead, and
	// stop yielding for a while.
	PolicyAuto Policy = iota
	// PolicySpin never parks: it spins, then yields forever. Lowest latency,
	// but it keeps a CPU busy for as long as it waits.
	PolicySpin
	// PolicyPark parks at once, without spinning or yielding: lowest CPU use,
	// and every wake-up costs the peer a FUTEX_WAKE.
	PolicyPark
)

func (p Policy) String() string {
	switch p {
	case PolicyAuto:
		return "auto"
	case PolicySpin:
		return "spin"
	case PolicyPark:
		return "park"
	default:
		return fmt.Sprintf("Policy(%d)", int(p))
	}
}

// Off is the value of a phase's budget in a resolved Config when the phase is
// skipped. Any negative budget means the same thing.
const Off time.Duration = -1

// Default budgets. Measured on the reference machine (2 vCPUs, KVM): a
// cross-process futex round trip (wake → the sleeper runs → it wakes us back)
// is about 4.5 µs, a cache-line round trip between cores about 125 ns.
//
//   - DefaultSpin: busy-polling for 20 µs, about four futex round trips,
//     catches a peer that is actively producing, for which a park would cost
//     the peer a system call and us a wake-up latency. Waiting at most a few
//     times what parking costs keeps the CPU wasted on a miss bounded
//     (the classic spin-then-block argument).
//   - DefaultVMSpin: under a hypervisor the vCPU we spin on can be descheduled
//     by the host and PAUSE loops may cause VM exits, so spin half as long.
//   - DefaultYield: after spinning, 20 µs of sched_yield between polls. When
//     both processes share a core (or the machine is busy), the peer needs our
//     CPU to make progress; yielding lets it run without the cost of a park.
//     When nothing else wants the CPU, sched_yield returns at once and this
//     phase is a slower spin, bounded in time like the spin phase.
//
// Together a miss burns at most ~40 µs of CPU before parking (30 µs in a VM).
// These are ceilings: a PolicyAuto Waiter halves its budgets, down to 1/32,
// after each wait that busy-waiting did not serve faster than a park would
// have, and doubles them back after each one it did. On an oversubscribed
// machine, where the peer is often not running while we spin, that brings
// the cost of a miss close to a plain park.
const (
	DefaultSpin   = 20 * time.Microsecond
	DefaultVMSpin = 10 * time.Microsecond
	DefaultYield  = 20 * time.Microsecond
)

// Config tunes a Waiter. The zero value is a sensible default: PolicyAuto with
// budgets chosen for the machine (see Resolved).
type Config struct {
	// Policy picks the idle strategy; the zero value is PolicyAuto.
	Policy Policy
	// Spin is the busy-poll budget before yielding: 0 means the default,
	// negative means no spinning. Ignored by PolicyPark.
	Spin time.Duration
	// Yield is the sched_yield phase budget after spinning (PolicyAuto): 0
	// means the default, negative means no yield phase. PolicySpin yields
	// without limit and PolicyPark never yields, so both ignore it.
	Yield time.Duration
}

// Validate reports whether c can be used. Callers that take a Config from
// their users should call it up front; NewWaiter panics on an invalid Config.
func (c Config) Validate() error {
	switch c.Policy {
	case PolicyAuto, PolicySpin, PolicyPark:
		return nil
	default:
		return fmt.Errorf("futex: invalid %v", c.Policy)
	}
}

// Resolved returns the effective configuration: defaults filled in, and
// skipped phases set to Off. Resolving a resolved Config changes nothing.
//
// Defaults: no spinning at all when only one CPU is usable
// (runtime.NumCPU or GOMAXPROCS is 1), since the peer we wait for could only
// make progress if we stopped; otherwise DefaultSpin, or DefaultVMSpin under
// a hypervisor, halved again when the usable CPUs are SMT siblings of a
// single physical core (our spinning steals the peer's execution resources).
// The yield phase defaults to DefaultYield in every case.
func (c Config) Resolved() Config {
	switch c.Policy {
	case PolicyPark:
		c.Spin, c.Yield = Off, Off
		return c
	case PolicySpin:
		c.Yield = Off // unused: the yield phase has no end
	}
	switch {
	case c.Spin < 0:
		c.Spin = Off
	case c.Spin == 0:
		c.Spin = defaultSpin(hostInfo())
	}
	if c.Policy == PolicyAuto {
		switch {
		case c.Yield < 0:
			c.Yield = Off
		case c.Yield == 0:
			c.Yield = DefaultYield
		}
	}
	return c
}

// host is what the default spin budget depends on.
type host struct {
	cpus          int // usable CPUs: min(NumCPU, GOMAXPROCS)
	vm            bool
	physicalCores int // 0 when unknown
	logicalCores  int // 0 when unknown
}

func hostInfo() host {
	return host{
		cpus:          min(runtime.NumCPU(), runtime.GOMAXPROCS(0)),
		vm:            cpuid.CPU.VM(),
		physicalCores: cpuid.CPU.PhysicalCores,
		logicalCores:  cpuid.CPU.LogicalCores,
	}
}

func defaultSpin(h host) time.Duration {
	if h.cpus <= 1 {
		return Off
	}
	spin := DefaultSpin
	if h.vm {
		spin = DefaultVMSpin
	}
	if h.physicalCores == 1 && h.logicalCores > 1 {
		spin /= 2
	}
	return spin
}
