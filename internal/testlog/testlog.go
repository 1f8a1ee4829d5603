// Package testlog is a slog.Handler that keeps every record it is given,
// for tests that check audit records (their keys are control's LogKey*).
package testlog

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// Recorder keeps each record as a map of its message ("msg"), level
// ("level") and attributes, values as strings. Safe for concurrent use.
type Recorder struct {
	mu   sync.Mutex
	recs []map[string]string
}

// New returns a Recorder and a Logger writing to it.
func New() (*Recorder, *slog.Logger) {
	r := &Recorder{}
	return r, slog.New(r)
}

func (r *Recorder) Enabled(context.Context, slog.Level) bool { return true }
func (r *Recorder) WithAttrs([]slog.Attr) slog.Handler       { return r }
func (r *Recorder) WithGroup(string) slog.Handler            { return r }

func (r *Recorder) Handle(_ context.Context, rec slog.Record) error {
	m := map[string]string{"msg": rec.Message, "level": rec.Level.String()}
	rec.Attrs(func(at slog.Attr) bool {
		m[at.Key] = at.Value.String()
		return true
	})
	r.mu.Lock()
	defer r.mu.Unlock()
	r.recs = append(r.recs, m)
	return nil
}

// Find returns the first record holding every key/value of want, or nil.
func (r *Recorder) Find(want map[string]string) map[string]string {
	r.mu.Lock()
	defer r.mu.Unlock()
next:
	for _, rec := range r.recs {
		for k, v := range want {
			if rec[k] != v {
				continue next
			}
		}
		return rec
	}
	return nil
}

// Await is Find, waiting up to d for such a record (a refusal may be
// recorded just after the refused peer learns of it).
func (r *Recorder) Await(want map[string]string, d time.Duration) map[string]string {
	for end := time.Now().Add(d); ; time.Sleep(time.Millisecond) {
		if rec := r.Find(want); rec != nil || time.Now().After(end) {
			return rec
		}
	}
}

// Records returns a copy of the records so far.
func (r *Recorder) Records() []map[string]string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]map[string]string(nil), r.recs...)
}
