//go:build !race

// Allocation counts are only meaningful without the race detector (its
// sync.Pool drops items at random); make test runs these without it.

package link

import (
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// countingDevice takes frames and counts their bytes, allocating nothing.
type countingDevice struct{ n int }

func (d *countingDevice) VNetHdr() bool { return true }
func (d *countingDevice) Read([][]byte) (int, error) {
	select {} // never read in these tests
}
func (d *countingDevice) Write(bufs [][]byte) (int, error) {
	for _, b := range bufs {
		d.n += len(b)
	}
	return d.n, nil
}
func (d *countingDevice) Close() error { return nil }

// Writing a packet the stack sends allocates nothing (the UDP answers and
// everything else the stack sends go this way).
func TestWriteFrameAllocs(t *testing.T) {
	dev := &countingDevice{}
	e := New(dev, 1500, ourMAC, nil)
	pkt := testPacket(e, 64)
	defer pkt.DecRef()
	var l stack.PacketBufferList
	l.PushBack(pkt)
	allocs := testing.AllocsPerRun(200, func() {
		if n, err := e.WritePackets(l); n != 1 || err != nil {
			t.Fatalf("WritePackets = %d, %v", n, err)
		}
	})
	if allocs != 0 {
		t.Errorf("a frame written allocated %.1f objects; want 0", allocs)
	}
	if want := 201 * (10 + 14 + 9); dev.n != want {
		t.Errorf("%d bytes written, want %d", dev.n, want)
	}
}
