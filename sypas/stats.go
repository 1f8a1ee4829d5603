package sypas

import "sync/atomic"

// ServerStats is a snapshot of a Server's counters. OK and Published count
// frames written to a daemon's ring; the last ones a session writes before
// it dies may not have reached the daemon.
type ServerStats struct {
	Sessions  int64  // sessions being served now
	OK        uint64 // requests answered with a RESPONSE (or one-way ones served)
	Failed    uint64 // requests whose handler returned an error (answered ERROR)
	Denied    uint64 // frames the enforcer refused: token, rights, size, in flight, unknown op
	Panics    uint64 // handler panics, answered E_INTERNAL
	InFlight  int64  // requests read and not yet answered (one-way: not yet served), all sessions and Callers
	Published uint64 // events written to subscribers' rings
	Dropped   uint64 // events a slow subscriber lost (DropNewest, or Block past the deadline)
	// Inline counts the sessions served with their frames inline on the
	// control socket (shared memory off, or its setup failed), since start.
	Inline uint64
	// BulkSpans is the spans of the kernel's bulk regions in use now, all
	// sessions: replies and events sent in bulk and not yet released by
	// their daemon (or being written). 0 when every daemon is idle.
	BulkSpans int64
	// BulkRefused counts BULK frames refused for their descriptor: one
	// outside the daemon's bulk region (answered E_PROTO), or an ACK that
	// releases nothing (a double ACK, a lease never sent: the session
	// ends with E_PROTO). The allocator is never changed by them.
	BulkRefused uint64
	// DroppedByTopic is Dropped by the topic Publish named (a copy).
	DroppedByTopic map[string]uint64
}

type serverStats struct {
	sessions           atomic.Int64
	ok, failed, denied atomic.Uint64
	panics             atomic.Uint64
	published, dropped atomic.Uint64
	inline             atomic.Uint64
	bulkRefused        atomic.Uint64
	direct             atomic.Int64 // Callers' requests running
}

// Stats returns the server's counters, each read atomically.
func (s *Server) Stats() ServerStats {
	st := ServerStats{
		Sessions: s.stats.sessions.Load(), OK: s.stats.ok.Load(), Failed: s.stats.failed.Load(),
		Denied: s.stats.denied.Load(), Panics: s.stats.panics.Load(),
		Published: s.stats.published.Load(), Dropped: s.stats.dropped.Load(),
		Inline: s.stats.inline.Load(), BulkRefused: s.stats.bulkRefused.Load(),
	}
	st.DroppedByTopic = s.topics.dropCounts()
	st.InFlight = s.stats.direct.Load()
	s.mu.Lock()
	for c := range s.conns {
		st.InFlight += int64(c.unanswered.Load())
		if c.own != nil {
			st.BulkSpans += c.own.Stats().Spans
		}
	}
	s.mu.Unlock()
	return st
}
