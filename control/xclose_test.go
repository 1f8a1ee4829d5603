package control

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sypas/go/control/token"
	"github.com/sypas/go/futex"
	"github.com/sypas/go/internal/closetest"
)

// closePeerHelper plays the far side of the cross-process close test in
// another process (SYPAS_HELPER=session-close-kernel or session-close-daemon):
// one session after another, it runs closetest.Peer on the session's rings
// until the near side closes it, and prints FAULT for any fault its own
// loops hit. The daemon stops once it cannot dial any more; the kernel runs
// until it is killed.
func closePeerHelper(mode, sock string) int {
	ctx := context.Background()
	serve := func(s *Session) {
		if err := closetest.Peer(s.Consumer(), s.Producer()); err != nil {
			fmt.Println("FAULT", err)
		}
		<-s.Done()
		s.Close()
	}
	cfg := closeConfig(futex.PolicyAuto)
	if mode == "close-daemon" {
		for {
			s, err := Dial(ctx, sock, DialConfig{SessionConfig: cfg})
			if err != nil {
				return 0
			}
			serve(s)
		}
	}
	l, err := Listen(sock, Config{})
	if err != nil {
		fmt.Println("ERR", err)
		return 1
	}
	keys := token.NewKeyring()
	keys.Rotate()
	srv, err := NewServer(l, ServerConfig{SessionConfig: cfg, Keys: keys})
	if err != nil {
		fmt.Println("ERR", err)
		return 1
	}
	fmt.Println("LISTENING")
	for {
		s, err := srv.Accept(ctx)
		if err != nil {
			continue
		}
		serve(s)
	}
}

// TestCloseNeverFaults across processes: a real kernel and daemon, each
// side in turn closing its session while its rings are in use, the other
// side in a helper process.
func TestCloseNeverFaultsCrossProcess(t *testing.T) {
	n := closetest.Trials(32)
	k := 0
	for _, policy := range closetest.Policies {
		for _, side := range []string{"kernel", "daemon"} {
			t.Run(fmt.Sprintf("%v/%s", policy, side), func(t *testing.T) {
				var ty closetest.Tally
				var h *helperProc
				if side == "kernel" {
					ts := startServer(t, "", ServerConfig{SessionConfig: closeConfig(policy)})
					h = sessionHelperProc(t, "close-daemon", ts.path)
					for i := range n {
						s := ts.session(t)
						ty.Add(closetest.Trial(s.Consumer(), s.Producer(), s.Close, k*n+i))
					}
					ts.Close() // the helper's next Dial fails: it exits
					require.NoError(t, h.cmd.Wait())
				} else {
					path := sockPath(t)
					h = sessionHelperProc(t, "close-kernel", path)
					h.expect(t, "LISTENING")
					for i := range n {
						s := dialT(t, path, DialConfig{SessionConfig: closeConfig(policy)})
						ty.Add(closetest.Trial(s.Consumer(), s.Producer(), s.Close, k*n+i))
					}
					h.kill(t)
					h.cmd.Wait()
				}
				for l := range h.lines {
					assert.False(t, strings.HasPrefix(l, "FAULT") || strings.HasPrefix(l, "ERR"), "helper: %s", l)
				}
				ty.Check(t)
			})
			k++
		}
	}
}
