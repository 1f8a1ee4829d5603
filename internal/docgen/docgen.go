// Package docgen keeps the generated parts of docs/PROTOCOL.md true: the
// tests that capture real sessions (control's Appendix A.1, sypas's A.2)
// render their frames with it, and compare the rendering with the part of
// the document between two markers, or rewrite that part when asked to.
// Bytes that differ from run to run (token ids, clocks) are taken from the
// document before comparing, so only real drift fails.
package docgen

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"os"
	"reflect"
	"strings"

	"github.com/sypas/go/wire"
)

// KeyID and Key sign the tokens of the documented sessions: the appendix
// gives them, so a reader can check an HMAC-SHA256 chain against real
// bytes.
const KeyID = 1

// Key is the 32 bytes 00 01 02 ... 1f.
func Key() []byte {
	k := make([]byte, 32)
	for i := range k {
		k[i] = byte(i)
	}
	return k
}

// Doc is a document with one generated section between two marker lines.
type Doc struct {
	path   string
	doc    []byte
	lo, hi int // the section: doc[lo:hi]
}

// Open reads path and finds the section after begin (a whole line, newline
// included) and before end.
func Open(path, begin, end string) (*Doc, error) {
	doc, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	lo := bytes.Index(doc, []byte(begin))
	hi := bytes.Index(doc, []byte(end))
	if lo < 0 || hi < lo+len(begin) {
		return nil, fmt.Errorf("docgen: markers %q / %q not found in order in %s", begin, end, path)
	}
	return &Doc{path: path, doc: doc, lo: lo + len(begin), hi: hi}, nil
}

// Generated is the section as the document has it.
func (d *Doc) Generated() string { return string(d.doc[d.lo:d.hi]) }

// Dumps are the hex dumps (encoding/hex.Dump) of the section, in order.
func (d *Doc) Dumps() [][]byte { return ParseDumps(d.Generated()) }

// Update replaces the section with want and writes the document.
func (d *Doc) Update(want string) error {
	out := append(append(append([]byte{}, d.doc[:d.lo]...), want...), d.doc[d.hi:]...)
	return os.WriteFile(d.path, out, 0o644)
}

// Diff is "" when the section is want, else the first line that differs.
func (d *Doc) Diff(want string) string {
	got := d.Generated()
	if got == want {
		return ""
	}
	w, g := strings.Split(want, "\n"), strings.Split(got, "\n")
	for i := range min(len(w), len(g)) {
		if w[i] != g[i] {
			return fmt.Sprintf("generated line %d is %q, the document has %q", i+1, w[i], g[i])
		}
	}
	return fmt.Sprintf("generated %d lines, the document has %d", len(w), len(g))
}

// Span is a byte range of a frame that differs from run to run.
type Span struct {
	Off, N int
	What   string
}

// Merge returns fresh with the bytes of spans taken from shown (the frame
// the document shows), when shown has fresh's length: if nothing but those
// bytes changed, the result is exactly shown.
func Merge(fresh, shown []byte, spans []Span) []byte {
	out := bytes.Clone(fresh)
	if len(shown) == len(out) {
		for _, s := range spans {
			copy(out[s.Off:s.Off+s.N], shown[s.Off:s.Off+s.N])
		}
	}
	return out
}

// Varying renders spans for the document: "40..47 cap_ref; ...".
func Varying(spans []Span) string {
	parts := make([]string, len(spans))
	for i, s := range spans {
		parts[i] = fmt.Sprintf("%d..%d %s", s.Off, s.Off+s.N-1, s.What)
	}
	return strings.Join(parts, "; ")
}

// ParseDumps reads back the hex dumps of a section: each ```text block.
func ParseDumps(section string) [][]byte {
	var out [][]byte
	for _, block := range strings.Split(section, "```text\n")[1:] {
		block, _, _ = strings.Cut(block, "```")
		var b []byte
		for _, line := range strings.Split(strings.TrimSpace(block), "\n") {
			hexPart, _, _ := strings.Cut(line, "|")
			f := strings.Fields(hexPart)
			if len(f) == 0 {
				continue
			}
			x, err := hex.DecodeString(strings.Join(f[1:], ""))
			if err != nil {
				return nil
			}
			b = append(b, x...)
		}
		out = append(out, b)
	}
	return out
}

// Describe renders the fields of m, byte slices as quoted strings (or
// their length when not printable).
func Describe(m wire.Message) string {
	v := reflect.ValueOf(m).Elem()
	var parts []string
	for i := range v.NumField() {
		f := v.Field(i)
		var s string
		switch x := f.Interface().(type) {
		case []byte:
			s = fmt.Sprintf("%q", x)
			if bytes.ContainsFunc(x, func(r rune) bool { return r < ' ' || r > '~' }) || len(x) > 64 {
				s = fmt.Sprintf("(%d bytes)", len(x))
			}
		case []wire.Region:
			var rs []string
			for _, r := range x {
				rs = append(rs, fmt.Sprintf("{%v flags=%d id=%d size=%d}", r.Role, r.Flags, r.ID, r.Size))
			}
			s = "[" + strings.Join(rs, " ") + "]"
		case fmt.Stringer:
			s = fmt.Sprintf("%v (%d)", x, f.Interface())
		case uint64:
			s = fmt.Sprintf("%d (%#x)", x, x)
		case uint32:
			s = fmt.Sprintf("%d", x)
			if v.Type().Field(i).Name == "Checksum" {
				s = fmt.Sprintf("%#08x", x)
			}
		default:
			s = fmt.Sprintf("%v", x)
		}
		parts = append(parts, v.Type().Field(i).Name+"="+s)
	}
	return strings.Join(parts, ", ")
}
