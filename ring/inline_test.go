package ring

import (
	"os/exec"
	"strings"
	"testing"
)

// TestHotPathsInline guards a measured property rather than a style choice:
// across processes the producer is bound by its store buffer, where a call
// costs stores of its own (a return address, a frame pointer). Inlining Commit,
// with the precomputed limit, took 64-byte streaming from about 27 M to 41 M
// messages a second here, and TryReserve another fifth (docs/BENCHMARKS.md).
// Commit costs 78 of the compiler's budget of 80: it open-codes the record
// header for that reason. Skipped with -short, and without a go tool on PATH.
func TestHotPathsInline(t *testing.T) {
	if testing.Short() {
		t.Skip("compiles the package")
	}
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go tool on PATH")
	}
	out, err := exec.Command(goTool, "build", "-gcflags=-m", "-o", "/dev/null", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go build -gcflags=-m: %v\n%s", err, out)
	}
	inlined := map[string]bool{}
	for _, line := range strings.Split(string(out), "\n") {
		if _, fn, ok := strings.Cut(line, ": can inline "); ok {
			inlined[fn] = true
		}
	}
	for _, fn := range []string{"(*Producer).TryReserve", "(*Producer).Commit"} {
		if !inlined[fn] {
			t.Errorf("%s no longer inlines; see go build -gcflags=-m=2 ./ring for its cost", fn)
		}
	}
}
