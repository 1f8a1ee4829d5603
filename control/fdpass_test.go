package control

import (
	"io"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

func TestSendRecvFDs(t *testing.T) {
	a, b := socketPair(t)
	f1, f2 := memfd(t, "one"), memfd(t, "two")
	require.NoError(t, SendFDs(a, []byte("hi"), f1, f2))
	buf := make([]byte, 16)
	n, files, err := RecvFDs(b, buf, 2)
	require.NoError(t, err)
	require.Len(t, files, 2)
	assert.Equal(t, "hi", string(buf[:n]))
	assert.Equal(t, "one", readAll(t, files[0]))
	assert.Equal(t, "two", readAll(t, files[1]))
	for _, f := range files {
		flags, err := unix.FcntlInt(f.Fd(), unix.F_GETFD, 0)
		require.NoError(t, err)
		assert.NotZero(t, flags&unix.FD_CLOEXEC, "received fd must be close-on-exec")
		f.Close()
	}

	// want 0: a plain message.
	_, err = a.Write([]byte("x"))
	require.NoError(t, err)
	n, files, err = RecvFDs(b, buf, 0)
	require.NoError(t, err)
	assert.Equal(t, 1, n)
	assert.Empty(t, files)
}

func TestSendFDsRefuses(t *testing.T) {
	a, _ := socketPair(t)
	f := memfd(t, "x")
	assert.ErrorIs(t, SendFDs(a, nil, f), ErrFDPassing)
	assert.ErrorIs(t, SendFDs(a, []byte("x")), ErrFDPassing)
	many := make([]*os.File, MaxFDs+1)
	for i := range many {
		many[i] = f
	}
	assert.ErrorIs(t, SendFDs(a, []byte("x"), many...), ErrFDPassing)
	closed := memfd(t, "y")
	closed.Close()
	assert.Error(t, SendFDs(a, []byte("x"), closed))
}

// Every failure closes whatever arrived: the process's fd count after the
// failed receive equals the count before the send.
func TestRecvFDsNoLeakOnError(t *testing.T) {
	for _, tc := range []struct {
		name    string
		send    int  // fds attached
		want    int  // fds RecvFDs expects
		oob     int  // control buffer override, 0: RecvFDs's own
		creds   bool // receiver sets SO_PASSCRED: SCM_CREDENTIALS on every message
		wantErr error
	}{
		{name: "one too many", send: 2, want: 1, wantErr: ErrFDPassing},
		{name: "far too many (kernel truncates)", send: 8, want: 1, wantErr: ErrFDPassing},
		{name: "too few", send: 1, want: 3, wantErr: ErrFDPassing},
		{name: "none when one wanted", send: 0, want: 1, wantErr: ErrFDPassing},
		{name: "fds when none wanted", send: 2, want: 0, wantErr: ErrFDPassing},
		{name: "truncated control buffer", send: 3, want: 3, oob: unix.CmsgSpace(4), wantErr: ErrFDPassing},
		{name: "SCM_CREDENTIALS instead", send: 0, want: 1, creds: true, wantErr: ErrFDPassing},
		{name: "SCM_CREDENTIALS as well", send: 2, want: 2, creds: true, wantErr: ErrFDPassing,
			oob: unix.CmsgSpace(unix.SizeofUcred) + unix.CmsgSpace(2*4)}, // room for both: the fds do arrive
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, b := socketPair(t)
			if tc.creds {
				raw, err := b.SyscallConn()
				require.NoError(t, err)
				require.NoError(t, raw.Control(func(fd uintptr) {
					require.NoError(t, unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1))
				}))
			}
			files := make([]*os.File, tc.send)
			for i := range files {
				files[i] = memfd(t, "secret")
			}
			before := countFDs(t)
			if tc.send > 0 {
				require.NoError(t, SendFDs(a, []byte("m"), files...))
			} else {
				_, err := a.Write([]byte("m"))
				require.NoError(t, err)
			}
			var (
				got []*os.File
				err error
			)
			if tc.oob > 0 {
				_, got, err = recvFDs(b, make([]byte, 8), tc.want, tc.oob)
			} else {
				_, got, err = RecvFDs(b, make([]byte, 8), tc.want)
			}
			assert.ErrorIs(t, err, tc.wantErr)
			assert.Nil(t, got)
			assert.Equal(t, before, countFDs(t), "fd leaked")
		})
	}
}

func TestRecvFDsEOFAndDeadline(t *testing.T) {
	a, b := socketPair(t)
	require.NoError(t, b.SetReadDeadline(time.Now().Add(10*time.Millisecond)))
	_, _, err := RecvFDs(b, make([]byte, 8), 1)
	assert.ErrorIs(t, err, os.ErrDeadlineExceeded)
	require.NoError(t, b.SetReadDeadline(time.Time{}))

	require.NoError(t, a.Close())
	_, _, err = RecvFDs(b, make([]byte, 8), 1)
	assert.ErrorIs(t, err, io.EOF)
	_, _, err = RecvFDs(b, nil, 1)
	assert.ErrorIs(t, err, ErrFDPassing)
	_, _, err = RecvFDs(b, make([]byte, 8), MaxFDs+1)
	assert.ErrorIs(t, err, ErrFDPassing)
}

func TestParseRightsHostile(t *testing.T) {
	// Hand-made control data: never panics, collects fds to close, refuses.
	for name, oob := range map[string][]byte{
		"short header": make([]byte, unix.SizeofCmsghdr-1),
		"zero length":  make([]byte, unix.SizeofCmsghdr),
		"length past":  func() []byte { b := unix.UnixRights(1); b[0] = 0xff; return b }(),
		"two rights":   append(unix.UnixRights(-1), unix.UnixRights(-2)...),
		"credentials":  unix.UnixCredentials(&unix.Ucred{Pid: 1}),
	} {
		fds, err := parseRights(oob)
		assert.ErrorIs(t, err, ErrFDPassing, name)
		if name == "two rights" {
			assert.Equal(t, []int{-1, -2}, fds, "every fd is collected for closing")
		}
	}
	fds, err := parseRights(unix.UnixRights(5, 6, 7))
	require.NoError(t, err)
	assert.Equal(t, []int{5, 6, 7}, fds)
}
