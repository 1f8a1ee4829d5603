package control

import (
	"context"
	"net"
	"os"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/sypas/go/bulk"
	"github.com/sypas/go/frame"
	"github.com/sypas/go/wire"
)

var bulkFeatures = wire.FeatureTokenRefresh | wire.FeatureBulk

// BULK granted: each side owns a bulk region of the negotiated size and
// maps the other's; a span one side fills is read in place by the other
// and comes back with the ACK; the session's end takes back every span
// still out, and Close releases every descriptor.
func TestBulkHandshake(t *testing.T) {
	base := countFDs(t)
	ts := startServer(t, "", ServerConfig{SessionConfig: SessionConfig{Features: bulkFeatures, MaxBulkSize: 4 << 20}})
	d := dialT(t, ts.path, DialConfig{SessionConfig: SessionConfig{Features: bulkFeatures, BulkSize: 1 << 20}})
	k := ts.session(t)

	assert.Equal(t, bulkFeatures, d.Params().Features)
	for _, s := range []*Session{d, k} {
		require.NotNil(t, s.Bulk())
		require.NotNil(t, s.PeerBulk())
		assert.Equal(t, 1<<20, s.Bulk().Size())
		assert.Equal(t, 1<<20, s.PeerBulk().Size())
	}
	assert.Equal(t, DaemonBulkID, d.Bulk().ID())
	assert.Equal(t, DaemonBulkID, k.PeerBulk().ID())
	assert.Equal(t, KernelBulkID, k.Bulk().ID())
	assert.Equal(t, KernelBulkID, d.PeerBulk().ID())

	// Both directions: fill in place, read in place, acknowledge.
	for _, pair := range [][2]*Session{{d, k}, {k, d}} {
		from, to := pair[0], pair[1]
		sp, err := from.Bulk().Alloc(context.Background(), 100<<10)
		require.NoError(t, err)
		copy(sp.Bytes(), "hello, bulk")
		desc, err := from.Bulk().Send(sp, frame.TypeRequest, 0)
		require.NoError(t, err)
		v, err := to.PeerBulk().View(&desc)
		require.NoError(t, err)
		assert.Equal(t, "hello, bulk", string(v[:11]))
		require.NoError(t, from.Bulk().Ack(&desc))
		assert.ErrorIs(t, from.Bulk().Ack(&desc), bulk.ErrLease, "a second ACK")
		assert.Zero(t, from.Bulk().Stats().Spans)
	}

	// A span still out when the session ends comes back (ReleaseAll).
	sp, err := d.Bulk().Alloc(context.Background(), 64<<10)
	require.NoError(t, err)
	_, err = d.Bulk().Send(sp, frame.TypeRequest, 0)
	require.NoError(t, err)
	k.Close()
	<-d.Done()
	assert.Zero(t, d.Bulk().Stats().Spans, "the peer's spans are released at the session's end")
	d.Close()
	ts.Close()
	assert.Equal(t, base, countFDs(t), "every fd released")
}

// The sizes: the kernel's default for a daemon that asks none, capped at
// the kernel's maximum; no bulk region unless both sides want BULK, and
// none inline.
func TestBulkNegotiation(t *testing.T) {
	ts := startServer(t, "", ServerConfig{SessionConfig: SessionConfig{Features: bulkFeatures | wire.FeatureInline, BulkSize: 256 << 10, MaxBulkSize: 512 << 10}})
	for _, tc := range []struct {
		asked uint32
		want  int
	}{{0, 256 << 10}, {128 << 10, 128 << 10}, {1 << 30, 512 << 10}} {
		d := dialT(t, ts.path, DialConfig{SessionConfig: SessionConfig{Features: bulkFeatures, BulkSize: tc.asked}})
		k := ts.session(t)
		assert.Equal(t, tc.want, d.Bulk().Size(), "asked %d", tc.asked)
		assert.Equal(t, tc.want, k.PeerBulk().Size(), "asked %d", tc.asked)
		d.Close()
	}

	d := dialT(t, ts.path, DialConfig{}) // BULK not offered
	k := ts.session(t)
	assert.Nil(t, d.Bulk())
	assert.Nil(t, k.Bulk())
	assert.Nil(t, k.PeerBulk())

	d = dialT(t, ts.path, DialConfig{SessionConfig: SessionConfig{Features: bulkFeatures, NoSharedMemory: true}})
	k = ts.session(t)
	assert.Zero(t, d.Params().Features&wire.FeatureBulk, "no bulk regions inline")
	assert.Nil(t, d.Bulk())
	assert.Nil(t, k.PeerBulk())

	err := (SessionConfig{BulkSize: 3 << 20}).validate("DialConfig")
	assert.ErrorIs(t, err, ErrConfig)
	err = (SessionConfig{BulkSize: 1 << 20, MaxBulkSize: 512 << 10}).validate("DialConfig")
	assert.ErrorIs(t, err, ErrConfig)
}

// A daemon's REGIONS that the kernel must refuse: the wrong size, a memfd
// that is not sealed, the kernel's own bulk memfd sent back, too many
// entries, no descriptor, another frame instead. Each gets ERROR E_PROTO
// and the handshake fails, with every descriptor closed.
func TestBulkHostileDaemonRegions(t *testing.T) {
	ts := startServer(t, "", ServerConfig{SessionConfig: SessionConfig{Features: bulkFeatures}})
	sealed := func(t *testing.T, size int) *os.File {
		r, err := bulk.CreateRegion(bulk.Config{Size: size, BlockSize: size})
		require.NoError(t, err)
		t.Cleanup(func() { r.Close() })
		return r.File()
	}
	const size = 64 << 10
	entry := wire.Region{Role: wire.RoleBulk, ID: DaemonBulkID, Size: size}
	for _, tc := range []struct {
		name    string
		entries []wire.Region
		files   func(t *testing.T, kernel []*os.File) []*os.File
		other   wire.Message // sent instead of REGIONS
	}{
		{name: "size", entries: []wire.Region{{Role: wire.RoleBulk, ID: DaemonBulkID, Size: 2 * size}},
			files: func(t *testing.T, _ []*os.File) []*os.File { return []*os.File{sealed(t, 2*size)} }},
		{name: "unsealed", entries: []wire.Region{entry}, files: func(t *testing.T, _ []*os.File) []*os.File {
			f := memfd(t, "")
			require.NoError(t, f.Truncate(size))
			return []*os.File{f}
		}},
		{name: "kernel-own", entries: []wire.Region{entry}, files: func(t *testing.T, k []*os.File) []*os.File { return k[2:] }},
		{name: "role", entries: []wire.Region{{Role: wire.RoleRingTx, ID: DaemonBulkID, Size: size}},
			files: func(t *testing.T, _ []*os.File) []*os.File { return []*os.File{sealed(t, size)} }},
		{name: "two-entries", entries: []wire.Region{entry, {Role: wire.RoleBulk, ID: 5, Size: size}},
			files: func(t *testing.T, _ []*os.File) []*os.File { return []*os.File{sealed(t, size), sealed(t, size)} }},
		{name: "no-fd", entries: []wire.Region{entry}},
		{name: "heartbeat", other: &wire.Heartbeat{Nonce: 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := rawDial(t, ts.path)
			writeMsg(t, c, 1, &wire.Hello{MinVersion: 1, MaxVersion: 1, Features: bulkFeatures, BulkSize: size})
			kfiles := readWelcomeRegions(t, c)
			require.Len(t, kfiles, 3, "the rings and the kernel's bulk region")
			var m wire.Message = tc.other
			if m == nil {
				m = &wire.Regions{Entries: tc.entries}
			}
			b := encodeMsg(t, 2, m)
			if tc.files != nil {
				require.NoError(t, SendFDs(c, b, tc.files(t, kfiles)...))
			} else {
				_, err := c.Write(b)
				require.NoError(t, err)
			}
			e := readError(t, c)
			assert.Equal(t, wire.CodeProto, e.Code, "ERROR %v", e)
			err := ts.acceptErr(t)
			assert.ErrorIs(t, err, ErrHandshake)
			assert.ErrorIs(t, err, wire.ErrProto)
		})
	}
}

// readWelcomeRegions reads the kernel's WELCOME and REGIONS, with the
// REGIONS' descriptors, from a raw connection.
func readWelcomeRegions(t *testing.T, c *net.UnixConn) []*os.File {
	t.Helper()
	want := 2*frame.HeaderSize + 40 + 8 + 3*16 // WELCOME, REGIONS of 3 entries
	var files []*os.File
	buf := make([]byte, want)
	oob := make([]byte, unix.CmsgSpace(16*4))
	for got := 0; got < want; {
		n, oobn, _, _, err := c.ReadMsgUnix(buf[got:], oob)
		require.NoError(t, err)
		got += n
		fds, err := parseRights(oob[:oobn])
		require.NoError(t, err)
		for _, fd := range fds {
			f := os.NewFile(uintptr(fd), "fd")
			t.Cleanup(func() { f.Close() })
			files = append(files, f)
		}
	}
	return files
}

// BULK was a feature bit before bulk regions existed (no kernel announced
// one), so peers built then may offer or grant it. A daemon that offers
// BULK without sending bulk_size (it predates it) gets the two rings and
// no BULK; a kernel that grants BULK and announces no bulk region gets a
// session without bulk regions. Before, each side refused the other's
// REGIONS with E_PROTO, and such peers could never connect again.
func TestBulkOlderPeers(t *testing.T) {
	t.Run("older-daemon", func(t *testing.T) {
		ts := startServer(t, "", ServerConfig{SessionConfig: SessionConfig{Features: bulkFeatures}})
		c := rawDial(t, ts.path)
		writeMsg(t, c, 1, &wire.Hello{MinVersion: 1, MaxVersion: 1, Features: bulkFeatures}) // no bulk_size
		r := frame.NewReader(c, frame.Config{})
		f, err := r.ReadFrame()
		require.NoError(t, err)
		require.Equal(t, frame.TypeWelcome, f.Type)
		var w wire.Welcome
		require.NoError(t, w.Decode(f.Payload))
		assert.Zero(t, w.Features&wire.FeatureBulk, "BULK is not granted to a daemon that predates bulk regions")
		f, err = r.ReadFrame()
		require.NoError(t, err)
		require.Equal(t, frame.TypeRegions, f.Type)
		var m wire.Regions
		require.NoError(t, m.Decode(f.Payload))
		assert.Len(t, m.Entries, 2, "the two rings only")
	})
	t.Run("older-kernel", func(t *testing.T) {
		a, b := socketPair(t)
		done := make(chan struct{})
		go func() { defer close(done); fakeKernel(t, b, fakeOpts{grant: bulkFeatures}) }()
		s, err := dialConn(context.Background(), a, DialConfig{SessionConfig: SessionConfig{Features: bulkFeatures}})
		require.NoError(t, err, "a kernel granting BULK with the rings only")
		assert.Nil(t, s.Bulk())
		assert.Nil(t, s.PeerBulk())
		s.Close()
		a.Close()
		<-done
	})
	t.Run("hello", func(t *testing.T) {
		// The reference daemon sends bulk_size whenever it offers BULK,
		// 0 included: its presence says it knows bulk regions.
		h := wire.Hello{MinVersion: 1, MaxVersion: 1, Features: bulkFeatures, HasBulkSize: true}
		b, err := h.Append(nil)
		require.NoError(t, err)
		var got wire.Hello
		require.NoError(t, got.Decode(b))
		assert.True(t, got.HasBulkSize)
		assert.Zero(t, got.BulkSize)
	})
}
