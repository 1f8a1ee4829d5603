package futex

import (
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestConfigZeroValue(t *testing.T) {
	got := Config{}.Resolved()
	assert.Equal(t, PolicyAuto, got.Policy)
	assert.Equal(t, defaultSpin(hostInfo()), got.Spin)
	assert.Equal(t, DefaultYield, got.Yield)
	assert.NoError(t, Config{}.Validate())
	t.Logf("this host: %+v → %+v", hostInfo(), got)
}

func TestConfigDefaultSpin(t *testing.T) {
	for _, tc := range []struct {
		name string
		h    host
		want time.Duration
	}{
		{"one CPU", host{cpus: 1, physicalCores: 1, logicalCores: 1}, Off},
		{"one CPU in a VM", host{cpus: 1, vm: true}, Off},
		{"bare metal", host{cpus: 8, physicalCores: 4, logicalCores: 8}, DefaultSpin},
		{"VM", host{cpus: 2, vm: true, physicalCores: 2, logicalCores: 2}, DefaultVMSpin},
		{"SMT siblings of one core", host{cpus: 2, physicalCores: 1, logicalCores: 2}, DefaultSpin / 2},
		{"SMT siblings in a VM", host{cpus: 2, vm: true, physicalCores: 1, logicalCores: 2}, DefaultVMSpin / 2},
		{"cpuid unknown", host{cpus: 4}, DefaultSpin},
	} {
		assert.Equal(t, tc.want, defaultSpin(tc.h), tc.name)
	}
}

func TestConfigNoSpinWithOneProc(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	got := Config{}.Resolved()
	assert.Equal(t, Off, got.Spin, "spinning on the only P only delays the peer")
	assert.Equal(t, DefaultYield, got.Yield, "yielding still lets a peer on this CPU run")
}

func TestConfigResolved(t *testing.T) {
	for _, tc := range []struct {
		in, want Config
	}{
		{Config{Policy: PolicyPark, Spin: time.Second, Yield: time.Second}, Config{Policy: PolicyPark, Spin: Off, Yield: Off}},
		{Config{Spin: 5 * time.Microsecond, Yield: 7 * time.Microsecond}, Config{Spin: 5 * time.Microsecond, Yield: 7 * time.Microsecond}},
		{Config{Spin: -5, Yield: -time.Second}, Config{Spin: Off, Yield: Off}},
		{Config{Policy: PolicySpin, Spin: 3 * time.Microsecond, Yield: time.Second}, Config{Policy: PolicySpin, Spin: 3 * time.Microsecond, Yield: Off}},
		{Config{Policy: PolicySpin, Spin: -1}, Config{Policy: PolicySpin, Spin: Off, Yield: Off}},
	} {
		got := tc.in.Resolved()
		assert.Equal(t, tc.want, got, "%+v", tc.in)
		assert.Equal(t, got, got.Resolved(), "resolving twice changes nothing: %+v", tc.in)
	}
	for _, c := range []Config{{}, {Policy: PolicySpin}} {
		assert.Equal(t, c.Resolved(), c.Resolved().Resolved())
	}
}

func TestConfigValidate(t *testing.T) {
	err := Config{Policy: Policy(7)}.Validate()
	require.Error(t, err)
	assert.Contains(t, err.Error(), "Policy(7)")
	var word atomic.Uint32
	assert.Panics(t, func() { NewWaiter(&word, Config{Policy: -1}) })
	assert.Panics(t, func() { NewWaiter(nil, Config{}) })
	assert.Equal(t, "park", PolicyPark.String())
	assert.Equal(t, PolicySpin, NewWaiter(&word, Config{Policy: PolicySpin}).Config().Policy)
}
