package bulk

import (
	"fmt"
	"math/bits"

	"github.com/sypas/go/wire"
)

const (
	// DefaultSize is the size of a region whose Config leaves Size at 0:
	// room for a few large payloads in flight at once on a small machine.
	DefaultSize = 64 << 20

	// MaxSize is the largest region: a payload may be as large as its
	// region, so this is also the largest bulk payload.
	MaxSize = 1 << 30

	// DefaultBlockSize is the smallest span of a region whose Config leaves
	// BlockSize at 0. Payloads below the rings' inline limit (64 KiB) do not
	// need bulk, so smaller blocks would only lengthen the allocator's tables.
	DefaultBlockSize = 64 << 10

	// MinBlockSize is the smallest block: one page (wire.PageSize), so
	// that every span starts page-aligned.
	MinBlockSize = wire.PageSize
)

// Config describes the region a sender creates. The zero value is a
// DefaultSize region of DefaultBlockSize blocks with id 0.
type Config struct {
	// Size is the region's size in bytes: a power of two in
	// [BlockSize, MaxSize]; 0 means DefaultSize. A power of two, so that
	// an empty region holds one span of its whole size.
	Size int

	// BlockSize is the smallest span and the unit spans are rounded to: a
	// power of two in [MinBlockSize, Size]; 0 means DefaultBlockSize, or
	// Size if that is smaller.
	BlockSize int

	// ID is the region id announced in REGIONS and written into every
	// descriptor; acknowledgements naming another id are refused.
	ID uint32

	// Name names the memfd (/proc/<pid>/maps shows /memfd:Name); empty
	// means "sypas-bulk".
	Name string
}

// normalize fills in the defaults and validates cfg.
func (cfg Config) normalize() (Config, error) {
	if cfg.Size == 0 {
		cfg.Size = DefaultSize
	}
	if cfg.BlockSize == 0 {
		cfg.BlockSize = min(DefaultBlockSize, cfg.Size)
	}
	if cfg.Name == "" {
		cfg.Name = "sypas-bulk"
	}
	switch {
	case !powerOfTwo(cfg.Size) || cfg.Size > MaxSize:
		return cfg, fmt.Errorf("%w: Config.Size %d: want a power of two up to %d", ErrInvalid, cfg.Size, MaxSize)
	case !powerOfTwo(cfg.BlockSize) || cfg.BlockSize < MinBlockSize || cfg.BlockSize > cfg.Size:
		return cfg, fmt.Errorf("%w: Config.BlockSize %d: want a power of two in [%d, Size %d]",
			ErrInvalid, cfg.BlockSize, MinBlockSize, cfg.Size)
	}
	return cfg, nil
}

func powerOfTwo(n int) bool { return n > 0 && n&(n-1) == 0 }

// log2 of a power of two.
func log2(n int) int { return bits.TrailingZeros64(uint64(n)) }
