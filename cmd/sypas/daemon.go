package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"reflect"
	"time"

	"github.com/sypas/go/sypas"
)

// The demo's processes are this binary re-executed with these hidden
// subcommands. Each reads its instructions from stdin and ends at its EOF,
// so they die with the demo however it ends.
const (
	demoKernelCmd = "demo-kernel"
	demoDaemonCmd = "demo-daemon"
)

// demoKernel is "sypas demo-kernel": the example kernel, with the
// Unix-socket echo beside it, until stdin ends.
func demoKernel(args []string, stdin io.Reader, _, stderr io.Writer) error {
	fs := newFlags(demoKernelCmd, "-socket PATH -baseline PATH", stderr)
	socket := fs.String("socket", "", "the kernel's socket")
	baseline := fs.String("baseline", "", "the Unix-socket echo's socket")
	tick := fs.Duration("tick", 100*time.Millisecond, "period of topic "+topicTicks)
	if err := parse(fs, args, 0, 0); err != nil {
		return err
	}
	stop := make(chan struct{})
	go func() { io.Copy(io.Discard, stdin); close(stop) }()
	return runKernel(kernelOptions{socket: *socket, tick: *tick, baseline: *baseline, stop: stop}, stderr)
}

// step is one instruction from the demo to a daemon, a JSON line on the
// daemon's stdin. The daemon answers each with one outcome line.
type step struct {
	Do       string         `json:"do"` // hello, call, subscribe, events, bench
	Op       string         `json:"op,omitempty"`
	Body     string         `json:"body,omitempty"`
	Topics   []string       `json:"topics,omitempty"`
	Want     map[string]int `json:"want,omitempty"` // events: how many of each topic
	Baseline string         `json:"baseline,omitempty"`
	Duration time.Duration  `json:"duration,omitempty"`
	InFlight int            `json:"in_flight,omitempty"`
}

// outcome is a daemon's answer to a step.
type outcome struct {
	Err string `json:"err,omitempty"` // the step itself failed

	// hello: who the kernel says we are, and our token.
	PID         int       `json:"pid,omitempty"`
	Whoami      string    `json:"whoami,omitempty"`
	TokenID     uint64    `json:"token_id,omitempty"`
	Rights      string    `json:"rights,omitempty"`
	Expiry      time.Time `json:"expiry,omitzero"`
	MaxPayload  uint32    `json:"max_payload,omitempty"`
	MaxInFlight uint32    `json:"max_in_flight,omitempty"`

	// call
	Reply   string `json:"reply,omitempty"`
	CallErr string `json:"call_err,omitempty"` // the kernel's refusal, as describe says it

	// events
	Events  []sypas.Event `json:"events,omitempty"`
	Dropped uint64        `json:"dropped,omitempty"`

	// bench
	Sypas  *figures `json:"sypas,omitempty"`
	Socket *figures `json:"socket,omitempty"`
}

// demoDaemon is "sypas demo-daemon": a daemon that connects to the kernel
// and carries out the steps it reads on stdin.
func demoDaemon(args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	fs := newFlags(demoDaemonCmd, "-socket PATH", stderr)
	socket := fs.String("socket", "", "the kernel's socket")
	if err := parse(fs, args, 0, 0); err != nil {
		return err
	}
	ctx := context.Background()
	cfg := sypas.ClientConfig{}
	cfg.Logger = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	c, err := sypas.Dial(dctx, *socket, cfg)
	cancel()
	if err != nil {
		return err
	}
	d := &daemon{c: c, subs: make(map[string]*sypas.Subscription)}
	defer c.Close()
	dec, enc := json.NewDecoder(stdin), json.NewEncoder(stdout)
	for {
		var s step
		if err := dec.Decode(&s); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		o, err := d.do(ctx, s)
		if err != nil {
			o.Err = err.Error()
		}
		if err := enc.Encode(o); err != nil {
			return err
		}
	}
}

type daemon struct {
	c    *sypas.Client
	subs map[string]*sypas.Subscription
}

func (d *daemon) do(ctx context.Context, s step) (outcome, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second+2*s.Duration)
	defer cancel()
	switch s.Do {
	case "hello":
		return d.hello(ctx)
	case "call":
		reply, err := d.c.Call(ctx, s.Op, []byte(s.Body))
		if err != nil {
			return outcome{CallErr: describe(err)}, nil
		}
		return outcome{Reply: string(reply)}, nil
	case "subscribe":
		for _, t := range s.Topics {
			sub, err := d.c.Subscribe(ctx, t, sypas.SubscribeOptions{})
			if err != nil {
				return outcome{}, err
			}
			d.subs[t] = sub
		}
		return outcome{}, nil
	case "events":
		return d.events(ctx, s.Want)
	case "bench":
		var o outcome
		sf, err := measure(s.Duration, s.InFlight, sypasCaller(d.c))
		if err != nil {
			return o, fmt.Errorf("sypas: %w", err)
		}
		uf, err := measure(s.Duration, s.InFlight, socketCaller(s.Baseline))
		if err != nil {
			return o, fmt.Errorf("unix socket: %w", err)
		}
		o.Sypas, o.Socket = &sf, &uf
		return o, nil
	}
	return outcome{}, fmt.Errorf("unknown step %q", s.Do)
}

// hello asks the kernel who we are and reads our token.
func (d *daemon) hello(ctx context.Context) (outcome, error) {
	who, err := d.c.Call(ctx, "whoami", nil)
	if err != nil {
		return outcome{}, err
	}
	tok, err := d.c.Token()
	if err != nil {
		return outcome{}, err
	}
	p, err := d.c.Params()
	if err != nil {
		return outcome{}, err
	}
	return outcome{PID: os.Getpid(), Whoami: string(who), TokenID: tok.ID, Rights: tok.Rights.String(),
		Expiry: tok.Expiry, MaxPayload: p.MaxPayload, MaxInFlight: p.MaxInFlight}, nil
}

// events collects, in the order they arrive, the events of the
// subscriptions until want[topic] of each have come.
func (d *daemon) events(ctx context.Context, want map[string]int) (outcome, error) {
	var o outcome
	cases := []reflect.SelectCase{{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(ctx.Done())}}
	var subs []*sypas.Subscription
	for t := range want {
		sub := d.subs[t]
		if sub == nil {
			return o, fmt.Errorf("not subscribed to %q", t)
		}
		subs = append(subs, sub)
		cases = append(cases, reflect.SelectCase{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(sub.Events())})
	}
	left := 0
	for _, n := range want {
		left += n
	}
	for left > 0 {
		i, v, ok := reflect.Select(cases)
		if i == 0 {
			return o, fmt.Errorf("%d events still awaited: %w", left, ctx.Err())
		}
		if !ok {
			return o, errors.New("a subscription ended")
		}
		ev := v.Interface().(sypas.Event)
		if want[ev.Topic] > 0 {
			want[ev.Topic]--
			left--
			o.Events = append(o.Events, ev)
		}
	}
	for _, sub := range subs {
		o.Dropped += sub.Dropped()
	}
	return o, nil
}
