//go:build !race

// Allocation counts are only meaningful without the race detector; make
// test runs these without it.

package tcpfast

import (
	"testing"
	"time"
)

// Parsing a segment allocates nothing, checksum check included (each
// frame from the sandbox is parsed): IPv4 and IPv6, data with options.
func TestParseAllocs(t *testing.T) {
	opts := []byte{1, 1, 8, 10, 0, 0, 0, 7, 0, 0, 0, 9} // NOP NOP timestamps
	for _, v6 := range []bool{false, true} {
		f := testFrame{v6: v6, flags: flagACK | flagPSH, opts: opts, payload: []byte("GET / HTTP/1.1\r\n\r\n")}.build()
		var s segment
		allocs := testing.AllocsPerRun(200, func() {
			if !parse(&s, fuzzEngineMAC, nil, f, nil) {
				t.Fatal("parse refused the segment")
			}
		})
		if allocs != 0 {
			t.Errorf("v6=%v: parse allocated %.1f objects per segment; want 0", v6, allocs)
		}
	}
}

// Held ACKs cost no allocation per round trip once the queue's array is
// as long as what is held: the queue never empties while round trips go
// on, and before it moved back to its array's front it grew a new array
// every few round trips.
func TestHeldACKsAllocs(t *testing.T) {
	var h heldACKs
	conns := new([heldInFlight + 1]conn)
	roundTrips(&h, conns, 100, nil) // the array grows to what is held
	allocs := testing.AllocsPerRun(20, func() { roundTrips(&h, conns, 100, nil) })
	h.fire(time.Now().Add(time.Hour))
	if allocs != 0 {
		t.Errorf("100 round trips' held ACKs allocated %.1f objects; want 0", allocs)
	}
}

// A queue that never empties (an upload waiting on a slow host socket:
// a chunk taken from the front as one is added at the end) keeps its
// array, in order; an emptied queue keeps a small array for the next
// burst and lets a large one go.
func TestQueueKeepsItsArray(t *testing.T) {
	var c conn
	next, first := uint32(0), uint32(0)
	data := []byte("x")
	add := func() {
		c.queueSlot()
		c.queue[len(c.queue)-1] = chunk{seq: next, data: data}
		next++
	}
	for range 8 {
		add()
	}
	allocs := testing.AllocsPerRun(100, func() {
		for range 10 {
			add()
			c.queuePop()
			first++
		}
	})
	if allocs != 0 {
		t.Errorf("a queue of 8 sliding along its array allocated %.1f times per 10 chunks; want 0", allocs)
	}
	for i, k := range c.queue {
		if k.seq != first+uint32(i) {
			t.Fatalf("queue[%d] is chunk %d; want %d (the queue: %d chunks from %d)", i, k.seq, first+uint32(i), len(c.queue), c.queue[0].seq)
		}
	}
	if len(c.queue) != 8 {
		t.Fatalf("%d chunks queued; want 8", len(c.queue))
	}
	// What slid off the array's front holds no buffer any more.
	for i, k := range c.qbuf[:cap(c.qbuf)] {
		if k.data != nil && (k.seq < first || k.seq >= next) {
			t.Errorf("the array's slot %d still holds chunk %d, taken off the queue", i, k.seq)
		}
	}
	for len(c.queue) > 0 {
		c.queuePop()
	}
	if c.qbuf == nil || cap(c.queue) == 0 {
		t.Errorf("an emptied queue of %d chunks' room let its array go; want it kept", cap(c.qbuf))
	}
	for range maxKeptQueue + 1 {
		add()
	}
	for len(c.queue) > 0 {
		c.queuePop()
	}
	if c.qbuf != nil || c.queue != nil {
		t.Errorf("an emptied queue kept an array of %d chunks; want one of at most %d kept", cap(c.qbuf), maxKeptQueue)
	}
}

// A connection's frames take the sandbox's MAC without a string of their
// own (one was allocated for every new connection), and a new MAC, should
// the sandbox change it, is taken.
func TestRemoteMACAllocs(t *testing.T) {
	var e Engine
	s := segment{srcMAC: [6]byte{2, 0, 0, 0, 0, 1}}
	first := e.remoteMAC(&s)
	allocs := testing.AllocsPerRun(100, func() {
		if m := e.remoteMAC(&s); m != first {
			t.Fatalf("remoteMAC: %v, then %v", first, m)
		}
	})
	if allocs != 0 {
		t.Errorf("remoteMAC allocated %.1f objects per connection; want 0", allocs)
	}
	s.srcMAC[5] = 2
	if m := e.remoteMAC(&s); m != s.remoteMAC() {
		t.Errorf("after the sandbox's MAC changed, remoteMAC gave %v; want %v", m, s.remoteMAC())
	}
}
