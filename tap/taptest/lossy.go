package taptest

import (
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gonetns/gonetns/tap"
)

// Faults says what a Lossy device does to each frame written to it: drop
// it, write it twice, or hold it back and write it after the next one (or
// after a millisecond, when no other frame follows).
// Probabilities are per frame; Seed makes a run repeatable.
type Faults struct {
	Drop, Duplicate, Reorder float64
	Seed                     uint64
	// DropIf, when set, drops every frame it returns true for, besides
	// those Drop takes at random: a test's way to lose one frame it
	// names. It sees the frame whole (with the virtio-net header, if the
	// device has one).
	DropIf func(frame []byte) bool
}

// LossyDevice is a device whose writes suffer Faults; it counts what it did.
type LossyDevice struct {
	tap.Device
	f Faults

	mu   sync.Mutex
	rng  *rand.Rand
	held []byte // a frame held back, written after the next one

	Written, Dropped, Duplicated, Reordered atomic.Int64
}

// Lossy wraps d: frames written to the result reach d's peer dropped,
// duplicated and reordered as f says. Reads are d's.
func Lossy(d tap.Device, f Faults) *LossyDevice {
	return &LossyDevice{Device: d, f: f, rng: rand.New(rand.NewPCG(f.Seed, f.Seed^0x9e3779b97f4a7c15))}
}

// Write writes one frame, or not, or twice, or later.
func (l *LossyDevice) Write(bufs [][]byte) (int, error) {
	var frame []byte
	for _, b := range bufs {
		frame = append(frame, b...)
	}
	n := len(frame)
	l.Written.Add(1)
	if l.f.DropIf != nil && l.f.DropIf(frame) {
		l.Dropped.Add(1)
		return n, nil
	}
	l.mu.Lock()
	r := l.rng.Float64()
	if r < l.f.Drop {
		l.mu.Unlock()
		l.Dropped.Add(1)
		return n, nil
	}
	if r < l.f.Drop+l.f.Reorder && l.held == nil {
		l.held = frame
		l.mu.Unlock()
		l.Reordered.Add(1)
		time.AfterFunc(time.Millisecond, func() {
			l.mu.Lock()
			held := l.held
			if len(held) > 0 && len(frame) > 0 && &held[0] == &frame[0] {
				l.held = nil
			} else {
				held = nil
			}
			l.mu.Unlock()
			if held != nil {
				l.Device.Write([][]byte{held})
			}
		})
		return n, nil
	}
	held := l.held
	l.held = nil
	dup := l.rng.Float64() < l.f.Duplicate
	l.mu.Unlock()
	if _, err := l.Device.Write([][]byte{frame}); err != nil {
		return 0, err
	}
	if dup {
		l.Duplicated.Add(1)
		l.Device.Write([][]byte{frame})
	}
	if held != nil {
		l.Device.Write([][]byte{held})
	}
	return n, nil
}
