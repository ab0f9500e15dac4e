//go:build !race

// Allocation counts are only meaningful without the race detector (its
// sync.Pool drops items at random); make test runs these without it.

package rawconn

import (
	"testing"

	"golang.org/x/sys/unix"
)

// A call through Calls allocates nothing once its pool holds a call: the
// packet path makes several per frame.
func TestCallsAllocs(t *testing.T) {
	a, b, _ := pair(t)
	out := [][]byte{[]byte("ping"), []byte("!")}
	in := make([]byte, 16)
	allocs := testing.AllocsPerRun(200, func() {
		if n, err := WritevCalls.Write(a, out); err != nil || n != 5 {
			t.Fatalf("Write: %d, %v", n, err)
		}
		if n, err := ReadCalls.Read(b, in); err != nil || n != 5 {
			t.Fatalf("Read: %d, %v", n, err)
		}
	})
	if allocs != 0 {
		t.Errorf("a write and a read through Calls allocated %.1f objects; want 0", allocs)
	}
}

// ReadBatch, once per datagram the host answers, allocates nothing.
func TestReadBatchAllocs(t *testing.T) {
	fds := dgramPair(t)
	bufs := [][]byte{make([]byte, 16), make([]byte, 16)}
	lens := make([]int, 2)
	x := []byte("x")
	allocs := testing.AllocsPerRun(200, func() {
		unix.Write(fds[0], x)
		if n, err := ReadBatch(fds[1], bufs, lens); err != nil || n != 1 {
			t.Fatalf("ReadBatch: %d, %v", n, err)
		}
	})
	if allocs != 0 {
		t.Errorf("ReadBatch allocated %.1f objects; want 0", allocs)
	}
}
