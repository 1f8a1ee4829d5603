package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// demoCmd is "sypas demo": it starts the example kernel and two daemons,
// each a process of its own (this binary re-executed), has the daemons
// connect through the real control plane, call, be refused and subscribe,
// then measures calls against a Unix-socket echo between the same two
// processes, and prints what happened.
func demoCmd(args []string, _ io.Reader, stdout, stderr io.Writer) error {
	fs := newFlags("demo", "[-duration D] [-in-flight N]", stderr)
	dur := fs.Duration("duration", 1500*time.Millisecond, "how long each figure of the table is measured")
	inFlight := fs.Int("in-flight", 64, "calls in flight for the second calls/s figure")
	if err := parse(fs, args, 0, 0); err != nil {
		return err
	}
	if *dur <= 0 || *inFlight < 1 {
		return fmt.Errorf("-duration %v and -in-flight %d must be positive", *dur, *inFlight)
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "sypas-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	sock, baseline := filepath.Join(dir, "kernel.sock"), filepath.Join(dir, "unix-echo.sock")
	out := &printer{w: stdout}

	out.f("sypas demo: a kernel and two daemons, three processes, talking over shared-memory rings")
	k, err := startKernel(self, sock, baseline, stderr)
	if err != nil {
		return err
	}
	defer k.stop()
	if _, err := k.waitLine(`msg="sypas: serving"`); err != nil {
		return err
	}
	out.f("kernel    pid %d, socket %s", k.cmd.Process.Pid, sock)
	out.f("          ops %s", ops)

	a, err := startDaemon(self, sock, stderr)
	if err != nil {
		return err
	}
	defer a.stop()
	b, err := startDaemon(self, sock, stderr)
	if err != nil {
		return err
	}
	defer b.stop()

	// Who each daemon is, as the kernel attested it, and its token.
	out.f("")
	for _, d := range []struct {
		name string
		p    *proc
	}{{"A", a}, {"B", b}} {
		o, err := d.p.do(step{Do: "hello"})
		if err != nil {
			return fmt.Errorf("daemon %s: %w", d.name, err)
		}
		out.f("daemon %s  pid %d, as the kernel attested it (op whoami):", d.name, o.PID)
		for _, l := range wrapRecord(o.Whoami, 88) {
			out.f("            %s", l)
		}
		out.f("          its token %#x: rights %s, expires %s (in %v)", o.TokenID, o.Rights,
			o.Expiry.Format("15:04:05"), time.Until(o.Expiry).Round(time.Second))
		out.f("          session limits: %d B a message, %d calls in flight", o.MaxPayload, o.MaxInFlight)
	}

	// Calls, a refusal and its audit record, events.
	out.f("")
	if _, err := b.do(step{Do: "subscribe", Topics: []string{topicKV, topicTicks}}); err != nil {
		return fmt.Errorf("daemon B: %w", err)
	}
	out.f("daemon B  subscribes to %q and %q", topicKV, topicTicks)
	for _, c := range []struct{ op, body string }{
		{"echo", "hello"}, {"kv.put", "colour=blue"}, {"kv.get", "colour"}, {"kv.get", "size"}, {"time", ""}, {"kv.reset", ""},
	} {
		o, err := a.do(step{Do: "call", Op: c.op, Body: c.body})
		if err != nil {
			return fmt.Errorf("daemon A: %w", err)
		}
		result := fmt.Sprintf("%q", o.Reply)
		switch {
		case o.CallErr != "":
			result = "refused: " + o.CallErr
		case o.Reply == "":
			result = "ok, empty reply"
		}
		out.f("daemon A  call %-22s → %s", strings.TrimSpace(c.op+" "+c.body), result)
	}
	rec, err := k.waitLine(`msg="sypas: refused"`)
	if err != nil {
		return err
	}
	out.f("kernel    audit record (slog):")
	for _, l := range wrapRecord(rec, 88) {
		out.f("            %s", l)
	}
	o, err := b.do(step{Do: "events", Want: map[string]int{topicKV: 1, topicTicks: 2}})
	if err != nil {
		return fmt.Errorf("daemon B: %w", err)
	}
	for _, ev := range o.Events {
		out.f("daemon B  event %-6s %s", ev.Topic, ev.Body)
	}
	out.f("          %d events dropped", o.Dropped)
	if err := b.stop(); err != nil {
		return fmt.Errorf("daemon B: %w", err)
	}

	// The table.
	out.f("")
	out.f("%d-byte calls from daemon A to the kernel, against a Unix-socket echo between", msgSize)
	out.f("the same two processes (a connection per caller); %v per figure, nothing pinned", *dur)
	out.f("machine: %s", machine())
	o, err = a.do(step{Do: "bench", Duration: *dur, InFlight: *inFlight, Baseline: baseline})
	if err != nil {
		return fmt.Errorf("daemon A: %w", err)
	}
	out.table(*o.Sypas, *o.Socket)
	if err := a.stop(); err != nil {
		return fmt.Errorf("daemon A: %w", err)
	}

	if err := k.stop(); err != nil {
		return fmt.Errorf("kernel: %w", err)
	}
	if rec, err := k.waitLine(`msg="sypas: stopped"`); err == nil {
		out.f("")
		out.f("kernel    stopped: %s", attrs(rec, "ok", "failed", "denied", "panics", "published", "dropped"))
	}
	return out.err
}

// printer writes lines, keeping the first error.
type printer struct {
	w   io.Writer
	err error
}

func (p *printer) f(format string, args ...any) {
	if p.err == nil {
		_, p.err = fmt.Fprintln(p.w, strings.TrimRight(fmt.Sprintf(format, args...), " "))
	}
}

// table prints the figures of sypas and of the socket, and how many
// times better sypas does on each.
func (p *printer) table(s, u figures) {
	row := func(name, p50, p99, r1, rn string) {
		p.f("  %-15s %10s %10s %14s %14s", name, p50, p99, r1, rn)
	}
	p.f("")
	p.f("  %-15s %s %s", "", center("round trip, 1 in flight", 21), center("calls/s", 29))
	row("", "p50", "p99", "1 in flight", fmt.Sprintf("%d in flight", s.N))
	row("sypas Call", micros(s.P50), micros(s.P99), rate(s.Rate1), rate(s.RateN))
	row("Unix socket", micros(u.P50), micros(u.P99), rate(u.Rate1), rate(u.RateN))
	row("sypas advantage", ratio(float64(u.P50), float64(s.P50)), ratio(float64(u.P99), float64(s.P99)),
		ratio(s.Rate1, u.Rate1), ratio(s.RateN, u.RateN))
}

// center pads s with spaces to width runes, s in the middle.
func center(s string, width int) string {
	pad := max(width-len([]rune(s)), 0)
	return strings.Repeat(" ", pad/2) + s + strings.Repeat(" ", pad-pad/2)
}

func micros(d time.Duration) string { return fmt.Sprintf("%.1f µs", float64(d)/1e3) }

func rate(r float64) string {
	switch {
	case r >= 1e6:
		return fmt.Sprintf("%.2f M", r/1e6)
	case r >= 1e3:
		return fmt.Sprintf("%.0f k", r/1e3)
	}
	return fmt.Sprintf("%.0f", r)
}

// ratio is a/b as a factor.
func ratio(a, b float64) string {
	if b <= 0 {
		return "-"
	}
	return fmt.Sprintf("%.1f×", a/b)
}

// wrapRecord breaks a slog text record into lines of at most width
// runes, between attributes (never inside a quoted value).
func wrapRecord(rec string, width int) []string {
	var fields []string
	start, quoted := 0, false
	for i := 0; i < len(rec); i++ {
		switch c := rec[i]; {
		case c == '\\' && quoted:
			i++
		case c == '"':
			quoted = !quoted
		case c == ' ' && !quoted:
			fields = append(fields, rec[start:i])
			start = i + 1
		}
	}
	fields = append(fields, rec[start:])
	var lines []string
	line := ""
	for _, f := range fields {
		switch {
		case line == "":
			line = f
		case len([]rune(line))+1+len([]rune(f)) > width:
			lines = append(lines, line)
			line = f
		default:
			line += " " + f
		}
	}
	return append(lines, line)
}

// attrs picks the named key=value pairs of a slog text record.
func attrs(rec string, keys ...string) string {
	var picked []string
	for _, f := range wrapRecord(rec, 0) {
		for _, k := range keys {
			if strings.HasPrefix(f, k+"=") {
				picked = append(picked, f)
			}
		}
	}
	return strings.Join(picked, " ")
}

// proc is one of the demo's processes.
type proc struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	enc   *json.Encoder
	dec   *json.Decoder
	lines chan string // the kernel's stderr, line by line
	done  chan error  // Wait's result
	waitE error
}

// start runs the process, ending it (stdin closed) with the demo; its
// stdout (daemons) or stderr (the kernel) is read from a pipe of ours, so
// that what it wrote before it exited is not lost when Wait returns.
func start(self string, args []string, stderr io.Writer, kernel bool) (*proc, error) {
	p := &proc{cmd: exec.Command(self, args...), done: make(chan error, 1)}
	p.cmd.Stdout, p.cmd.Stderr = io.Discard, stderr
	var err error
	if p.stdin, err = p.cmd.StdinPipe(); err != nil {
		return nil, err
	}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer w.Close() // the child holds it
	if kernel {
		p.cmd.Stderr = w
	} else {
		p.cmd.Stdout = w
	}
	if err := p.cmd.Start(); err != nil {
		r.Close()
		return nil, err
	}
	go func() { p.done <- p.cmd.Wait() }()
	if !kernel {
		p.enc, p.dec = json.NewEncoder(p.stdin), json.NewDecoder(r)
		return p, nil
	}
	p.lines = make(chan string, 64)
	go func() {
		defer r.Close()
		s := bufio.NewScanner(r)
		for s.Scan() {
			select {
			case p.lines <- s.Text():
			default:
				fmt.Fprintln(stderr, s.Text()) // nobody waits for it: show it as is
			}
		}
		close(p.lines)
	}()
	return p, nil
}

func startKernel(self, sock, baseline string, stderr io.Writer) (*proc, error) {
	return start(self, []string{demoKernelCmd, "-socket", sock, "-baseline", baseline}, stderr, true)
}

func startDaemon(self, sock string, stderr io.Writer) (*proc, error) {
	return start(self, []string{demoDaemonCmd, "-socket", sock}, stderr, false)
}

// do has a daemon carry out s and returns its outcome.
func (p *proc) do(s step) (outcome, error) {
	var o outcome
	if err := p.enc.Encode(s); err != nil {
		return o, err
	}
	if err := p.dec.Decode(&o); err != nil {
		return o, fmt.Errorf("%s: no answer (%w)", s.Do, err)
	}
	if o.Err != "" {
		return o, fmt.Errorf("%s: %s", s.Do, o.Err)
	}
	return o, nil
}

// waitLine returns the kernel's next stderr line containing sub.
func (p *proc) waitLine(sub string) (string, error) {
	t := time.NewTimer(10 * time.Second)
	defer t.Stop()
	for {
		select {
		case l, ok := <-p.lines:
			if !ok {
				return "", fmt.Errorf("the kernel ended without logging %s", sub)
			}
			if strings.Contains(l, sub) {
				return l, nil
			}
		case <-t.C:
			return "", fmt.Errorf("the kernel did not log %s within 10s", sub)
		}
	}
}

// stop closes the process's stdin, which ends it, and waits for it (10 s,
// then it is killed). It may be called again: it returns the same result.
func (p *proc) stop() error {
	if p.stdin == nil {
		return p.waitE
	}
	p.stdin.Close()
	p.stdin = nil
	select {
	case p.waitE = <-p.done:
	case <-time.After(10 * time.Second):
		p.cmd.Process.Kill()
		p.waitE = errors.Join(errors.New("did not stop within 10s; killed"), <-p.done)
	}
	return p.waitE
}
