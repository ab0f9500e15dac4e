//go:build !race

// Allocation counts are only meaningful without the race detector.

package tap

import (
	"errors"
	"testing"

	"golang.org/x/sys/unix"
)

// ReadNow with no frame waiting allocates nothing: the event loop meets
// it at the end of every drain of the device (its error was wrapped anew
// each time, three allocations, before).
func TestReadNowEmptyAllocs(t *testing.T) {
	withPollable(t, "gtest3", func(_ Device, p Pollable) {
		bufs := [][]byte{make([]byte, 2048)}
		var err error
		allocs := testing.AllocsPerRun(100, func() { _, err = p.ReadNow(bufs) })
		if !errors.Is(err, unix.EAGAIN) {
			t.Errorf("ReadNow with nothing sent: %v, want EAGAIN", err)
		}
		if allocs != 0 {
			t.Errorf("ReadNow with nothing sent allocated %.1f objects; want 0", allocs)
		}
	})
}
