//go:build !race

// Allocation counts are only meaningful without the race detector (its
// sync.Pool drops items at random); make test runs these without it.

package epoll

import (
	"testing"

	"golang.org/x/sys/unix"
)

// Wait on a set in Go's poller allocates nothing: the fast path's poller
// calls it for every batch of events.
func TestWaitAllocs(t *testing.T) {
	s, err := New("test")
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	r, w := pipe(t)
	if err := s.Add(r, unix.EPOLLIN, 3); err != nil { // level-triggered: stays ready
		t.Fatal(err)
	}
	unix.Write(w, []byte("x"))
	events := make([]unix.EpollEvent, 4)
	allocs := testing.AllocsPerRun(200, func() {
		if n, err := s.Wait(events); err != nil || n != 1 {
			t.Fatalf("Wait: %d, %v", n, err)
		}
	})
	if allocs != 0 {
		t.Errorf("Wait allocated %.1f objects; want 0", allocs)
	}
}
