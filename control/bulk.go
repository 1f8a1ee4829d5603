package control

import (
	"cmp"
	"errors"
	"fmt"
	"os"
	"syscall"

	"github.com/sypas/go/bulk"
	"github.com/sypas/go/frame"
	"github.com/sypas/go/wire"
)

// The region ids of the bulk regions (docs/PROTOCOL.md §6.5): the rings
// are 1 and 2, the kernel's bulk region 3, the daemon's 4. Every BULK
// descriptor names the region of its sender.
const (
	KernelBulkID uint32 = 3
	DaemonBulkID uint32 = 4
)

// Bulk is this side's bulk region, the memory its BULK descriptors point
// into (docs/PROTOCOL.md §6.5), or nil when the session has none
// (wire.FeatureBulk not granted, or the data plane is inline). This side
// allocates in it and the peer acknowledges; every span the peer still
// holds comes back (ReleaseAll) when the session ends, and Close releases
// the region.
func (s *Session) Bulk() *bulk.Region { return s.bulk }

// PeerBulk is the peer's bulk region as mapped here, which the peer's
// BULK descriptors point into, or nil when the session has none. Close
// unmaps it (views still in use then read zeros, never fault).
func (s *Session) PeerBulk() *bulk.PeerRegion { return s.peerBulk }

// bulkGranted reports whether WELCOME granted bulk regions: FeatureBulk,
// on a session with rings.
func (s *Session) bulkGranted() bool {
	return s.welcome.Features&wire.FeatureBulk != 0 && s.welcome.Features&wire.FeatureInline == 0
}

// grantBulk is the kernel's choice of the bulk region size for a HELLO
// that offered BULK (§6.4): the daemon's bulk_size, or the kernel's
// default, capped at the kernel's maximum.
func (s *Session) grantBulk(h *wire.Hello) uint32 {
	cfg := &s.srv.cfg
	size := cmp.Or(h.BulkSize, cfg.BulkSize, DefaultBulkSize)
	return min(size, cfg.MaxBulkSize)
}

// createBulk makes this side's bulk region of size bytes with id.
func (s *Session) createBulk(size, id uint32) error {
	r, err := bulk.CreateRegion(bulk.Config{Size: int(size), ID: id, Name: "sypas-bulk-" + s.side()})
	if err != nil {
		if !s.kernel { // like the rings: a daemon that cannot map them dials again for inline
			err = fmt.Errorf("%w: %w", errRingsUnusable, err)
		}
		return &wire.Error{Code: wire.CodeResource, Message: "create the bulk region", Err: err}
	}
	s.bulk = r
	return nil
}

// bulkEntry is the REGIONS entry announcing this side's bulk region.
func (s *Session) bulkEntry() wire.Region {
	return wire.Region{Role: wire.RoleBulk, ID: s.bulk.ID(), Size: uint64(s.bulk.Size())}
}

// checkBulkEntry checks the REGIONS entry of the peer's bulk region: role
// BULK, the peer's id, flags 0, and a size the daemon accepts (want 0: any
// up to MaxBulkSize and, if the daemon asked, at most what it asked) or
// exactly want (the kernel: the size it granted).
func (s *Session) checkBulkEntry(e wire.Region, id, asked, want uint32) error {
	switch {
	case e.Role != wire.RoleBulk || e.ID != id || e.Flags != 0:
		return protoErr("REGIONS: want a BULK entry with id %d and flags 0, got %v id %d flags %#x", id, e.Role, e.ID, e.Flags)
	case want != 0 && e.Size != uint64(want):
		return protoErr("REGIONS: BULK region of %d bytes, granted %d", e.Size, want)
	case !wire.BulkSizeOK(e.Size, false):
		return protoErr("REGIONS: BULK region of %d bytes: want a power of two in [%d, %d]", e.Size, wire.MinBulkSize, wire.MaxBulkSize)
	case e.Size > uint64(s.cfg.MaxBulkSize):
		return &wire.Error{Code: wire.CodeTooLarge, Message: fmt.Sprintf("REGIONS: BULK region of %d bytes above the daemon's cap %d", e.Size, s.cfg.MaxBulkSize)}
	case asked != 0 && e.Size > uint64(asked):
		return protoErr("REGIONS: BULK region of %d bytes, the daemon asked for %d", e.Size, asked)
	}
	return nil
}

// openPeerBulk maps the peer's bulk region from f, which it owns.
func (s *Session) openPeerBulk(e wire.Region, f *os.File) error {
	p, err := bulk.OpenRegion(f, e.ID, int(e.Size)) // closes f on failure
	if err != nil {
		if !s.kernel {
			err = fmt.Errorf("%w: %w", errRingsUnusable, err)
		}
		return &wire.Error{Code: wire.CodeProto, Message: "REGIONS: BULK memfd refused", Err: err}
	}
	s.peerBulk = p
	return nil
}

// sendBulkRegion is the daemon's half of the bulk exchange (§6.5): once
// it has mapped the kernel's regions, it makes its own bulk region, of the
// size the kernel's has, and sends it in a REGIONS frame of one entry.
func (s *Session) sendBulkRegion() error {
	if err := s.createBulk(uint32(s.peerBulk.Size()), DaemonBulkID); err != nil {
		return err
	}
	m := wire.Regions{Entries: []wire.Region{s.bulkEntry()}}
	return s.sendFDs(&m, s.bulk.File())
}

// readPeerBulk is the kernel's half: it reads the daemon's REGIONS (one
// BULK entry of the granted size, one descriptor), refuses a memfd that is
// one of the session's own, and maps it.
func (s *Session) readPeerBulk(own ...*os.File) (err error) {
	f, files, err := s.readFrame()
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			closeFiles(files)
		}
	}()
	if f.Type != frame.TypeRegions {
		return protoErr("unexpected %v frame in state %v", f.Type, s.State())
	}
	var m wire.Regions
	if err := m.Decode(f.Payload); err != nil {
		return protoErr("REGIONS: %v", err)
	}
	if len(m.Entries) != 1 {
		return protoErr("REGIONS from the daemon: want one BULK entry, got %v", m.Entries)
	}
	e := m.Entries[0]
	if err := s.checkBulkEntry(e, DaemonBulkID, 0, uint32(s.bulk.Size())); err != nil {
		return err
	}
	if err := notOwn(files[0], own); err != nil {
		return err
	}
	file := files[0]
	files = nil
	return s.openPeerBulk(e, file)
}

// notOwn refuses a memfd the peer sent back that is one of ours: read as
// the peer's region it would let the peer's descriptors name our own
// memory.
func notOwn(f *os.File, own []*os.File) error {
	st, err := statOf(f)
	if err != nil {
		return protoErr("REGIONS: BULK memfd: %v", err)
	}
	for _, o := range own {
		if ost, err := statOf(o); err == nil && ost.Dev == st.Dev && ost.Ino == st.Ino {
			return protoErr("REGIONS: the daemon's BULK memfd is one the kernel sent (device %#x, inode %d)", st.Dev, st.Ino)
		}
	}
	return nil
}

func statOf(f *os.File) (*syscall.Stat_t, error) {
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	return fi.Sys().(*syscall.Stat_t), nil
}

// releaseBulk takes back every span the peer holds: the session has
// ended, so no ACK will come (§6.5).
func (s *Session) releaseBulk() {
	if s.bulk != nil {
		s.bulk.ReleaseAll()
	}
}

// closeBulk releases both bulk regions.
func (s *Session) closeBulk() error {
	var errs []error
	if s.bulk != nil {
		errs = append(errs, s.bulk.Close())
	}
	if s.peerBulk != nil {
		errs = append(errs, s.peerBulk.Close())
	}
	return errors.Join(errs...)
}
