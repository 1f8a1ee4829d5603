package wire

import (
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The README's first package table is what a program can import: no
// internal/ package (the go command refuses those outside this module), and
// every package of the module is linked somewhere in the Packages section.
func TestReadmePackages(t *testing.T) {
	b, err := os.ReadFile("../README.md")
	require.NoError(t, err)
	_, sec, ok := strings.Cut(string(b), "\n## Packages\n")
	require.True(t, ok, "README has a Packages section")
	sec, _, _ = strings.Cut(sec, "\n## ")
	link := regexp.MustCompile("\\[`([^`]+)`\\]\\(([^)]+)\\)")

	// The first table: its rows, up to the first line that is not one.
	_, table, _ := strings.Cut(sec, "\n|")
	var importable []string
	for _, line := range strings.Split("|"+table, "\n") {
		if !strings.HasPrefix(line, "|") {
			break
		}
		if m := link.FindStringSubmatch(line); m != nil {
			importable = append(importable, m[1])
			assert.NotContains(t, m[1], "internal", "README lists %s as importable", m[1])
		}
	}
	assert.NotEmpty(t, importable)

	err = filepath.WalkDir("..", func(path string, d fs.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return err
		}
		if name := d.Name(); path != ".." && (strings.HasPrefix(name, ".") || name == "testdata" || name == "docs") {
			return filepath.SkipDir
		}
		goFiles, _ := filepath.Glob(filepath.Join(path, "*.go"))
		for _, f := range goFiles {
			if !strings.HasSuffix(f, "_test.go") {
				rel, _ := filepath.Rel("..", path)
				assert.True(t, strings.Contains(sec, "("+rel+"/)"), "package %s is not in the README's Packages", rel)
				break
			}
		}
		return nil
	})
	require.NoError(t, err)
}
