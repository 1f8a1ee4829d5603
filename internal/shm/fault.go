package shm

import "sync/atomic"

// Injected failures, for the tests of what a failed setup of shared memory
// falls back to (docs/PROTOCOL.md §8.6). Not API: the package is internal.
var createFault, openFault atomic.Pointer[error]

// InjectFaults makes every later Create fail with create (as if
// memfd_create were refused) and every later Open with open (as if mmap
// were), each when non-nil, until the returned restore is called.
func InjectFaults(create, open error) (restore func()) {
	set := func(p *atomic.Pointer[error], err error) {
		if err != nil {
			p.Store(&err)
		}
	}
	set(&createFault, create)
	set(&openFault, open)
	return func() {
		createFault.Store(nil)
		openFault.Store(nil)
	}
}

// fault is the injected failure of p, if any.
func fault(p *atomic.Pointer[error]) error {
	if e := p.Load(); e != nil {
		return *e
	}
	return nil
}
