package ring

import (
	"os/exec"
	"strings"
	"testing"
)

// TestHotPathsInline guards a measured property rather than a style choice:
// across processes, the producer is bound by its store buffer, and an
// out-of-line Commit (a call, a frame, a spill) cut 64-byte streaming from
// about 40 M to 27 M messages a second here (docs/BENCHMARKS.md).
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
	for _, fn := range []string{"(*Producer).TryReserve", "(*Producer).Commit", "align", "packRecordHeader"} {
		if !inlined[fn] {
			t.Errorf("%s no longer inlines; see go build -gcflags=-m=2 ./ring for its cost", fn)
		}
	}
}
