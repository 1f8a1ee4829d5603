package shm_test

import (
	"fmt"

	"github.com/sypas/go/internal/shm"
)

// A region is created on one side and opened from its file on the other.
// Here both sides live in one process; across processes the file travels
// through exec.Cmd.ExtraFiles or SCM_RIGHTS.
func Example() {
	r, err := shm.Create("example", 4096)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer r.Close()
	copy(r.Bytes(), "ping")

	// The peer gets its own descriptor; Open owns it from here on.
	f, err := dupForPeer(r.File())
	if err != nil {
		fmt.Println(err)
		return
	}
	peer, err := shm.Open(f, 4096)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer peer.Close()
	fmt.Printf("%s %d\n", peer.Bytes()[:4], peer.Size())

	// A peer that expects another size is refused before anything is mapped.
	f, _ = dupForPeer(r.File())
	_, err = shm.Open(f, 8192)
	fmt.Println(err)
	// Output:
	// ping 4096
	// shm: open dup:memfd:example: size is 4096 bytes, want 8192: shm: wrong region size
}
