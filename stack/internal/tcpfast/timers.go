package tcpfast

import (
	"sync"
	"time"
)

// A connection has two timers: the handshake's deadline, retransmission
// and zero-window probes (timerRetransmit), and, without the event loop,
// the ACK held for ackDelay (timerAck; the loop keeps its held ACKs in a
// queue of its own, heldACKs).
type timerKind uint8

const (
	timerRetransmit timerKind = iota
	timerAck
	timerKinds
)

// timers are the timers of all the engine's connections, in one heap
// under one runtime timer, whose callbacks run one after the other on one
// goroutine that lives as long as the engine (serve). A runtime timer per
// connection (time.AfterFunc) starts a goroutine each time it fires, and
// Go keeps the stacks of finished goroutines, up to 63 per P, in a cache
// that collections do not empty: its size at any moment is chance, and it
// grows with the number of callbacks that were running at once. In a soak
// with the event loop (three Ps), the network process's private memory at
// the quiet points rose 90 KiB in 8 minutes in the Go heap's arena, and a
// test program firing bursts of 200-1,600 such callbacks, with the same
// release after each (one P, a collection, pages returned), kept 320-576
// KiB of stacks (docs/design.md, "Memory after traffic"). One goroutine
// per firing of the one runtime timer (AfterFunc) still made a stack
// afresh now and then: the release shrinks Go to one P, which hands the
// other Ps' finished goroutines to a list whose stacks the collection
// frees, and the pages of the next stack were more often new than not
// (pages of the Go heap's arena that became resident at a soak's quiet
// points held these goroutines' frames).
type timers struct {
	mu      sync.Mutex
	heap    []timerEntry
	t       *time.Timer
	armedAt int64 // when t fires, on the engine's clock; 0: stopped
	epoch   time.Time
	fire    func(c *conn, k timerKind) // runs with c.mu held
	quit    chan struct{}              // closed by close: serve returns
}

type timerEntry struct {
	at   int64 // on the engine's clock (now)
	c    *conn
	kind timerKind
	gen  uint32 // c.gen when set: run fires it only for that connection
}

// init sets up the heap; the runtime timer is made stopped.
func (ts *timers) init(fire func(*conn, timerKind)) {
	ts.epoch = time.Now()
	ts.fire = fire
	ts.quit = make(chan struct{})
	ts.t = time.NewTimer(time.Hour)
	ts.t.Stop()
}

// serve runs the callbacks as the runtime timer falls due, until close.
func (ts *timers) serve() {
	for {
		select {
		case <-ts.quit:
			return
		case <-ts.t.C:
			ts.run()
		}
	}
}

// now is the engine's clock: nanoseconds since init, monotonic.
func (ts *timers) now() int64 { return int64(time.Since(ts.epoch)) }

// set makes c's timer k fire in d, or in d from now if it is set already.
// c.mu is held.
func (ts *timers) set(c *conn, k timerKind, d time.Duration) {
	at := ts.now() + int64(max(d, 0))
	ts.mu.Lock()
	if i := int(c.timerIdx[k]); i > 0 {
		ts.heap[i-1].at, ts.heap[i-1].gen = at, c.gen
		ts.fix(i - 1)
	} else {
		ts.heap = append(ts.heap, timerEntry{at: at, c: c, kind: k, gen: c.gen})
		c.timerIdx[k] = int32(len(ts.heap))
		ts.up(len(ts.heap) - 1)
	}
	ts.rearm()
	ts.mu.Unlock()
}

// stop forgets c's timer k. c.mu is held.
func (ts *timers) stop(c *conn, k timerKind) {
	ts.mu.Lock()
	if i := int(c.timerIdx[k]); i > 0 {
		ts.remove(i - 1)
		if len(ts.heap) == 0 && ts.armedAt > 0 {
			ts.t.Stop() // no wake-up for nothing
			ts.armedAt = 0
		}
	}
	ts.mu.Unlock()
}

// close stops the runtime timer for good, and serve. Once.
func (ts *timers) close() {
	ts.mu.Lock()
	ts.t.Stop()
	ts.armedAt = -1
	ts.mu.Unlock()
	close(ts.quit)
}

// rearm points the runtime timer at the earliest entry when that is
// sooner than it fires (a later one is dealt with when it fires: run
// finds nothing due and points it further). ts.mu is held.
func (ts *timers) rearm() {
	if ts.armedAt < 0 || len(ts.heap) == 0 {
		return
	}
	at := ts.heap[0].at
	if ts.armedAt != 0 && ts.armedAt <= at {
		return
	}
	ts.armedAt = at
	ts.t.Reset(time.Duration(at - ts.now()))
}

// run fires what is due, each with its connection locked, and points the
// runtime timer at what comes next.
func (ts *timers) run() {
	var buf [16]timerEntry
	due := buf[:0]
	ts.mu.Lock()
	if ts.armedAt < 0 {
		ts.mu.Unlock()
		return
	}
	now := ts.now()
	for len(ts.heap) > 0 && ts.heap[0].at <= now {
		due = append(due, ts.heap[0])
		ts.remove(0)
	}
	ts.armedAt = 0
	ts.rearm()
	ts.mu.Unlock()
	for i := range due {
		c := due[i].c
		c.mu.Lock()
		if c.gen == due[i].gen { // else c was closed and is another connection now
			ts.fire(c, due[i].kind)
		}
		c.mu.Unlock()
		due[i] = timerEntry{}
	}
}

// The heap: entry i's children are 2i+1 and 2i+2; an entry's connection
// keeps its index plus one (0: not in the heap). ts.mu is held.

func (ts *timers) remove(i int) {
	e := ts.heap[i]
	e.c.timerIdx[e.kind] = 0
	last := len(ts.heap) - 1
	if i != last {
		ts.heap[i] = ts.heap[last]
		ts.place(i)
	}
	ts.heap[last] = timerEntry{}
	ts.heap = ts.heap[:last]
	if i != last {
		ts.fix(i)
	}
	if len(ts.heap) == 0 && cap(ts.heap) > minTimerCap {
		ts.heap = nil // the room of a burst goes with it
	}
}

// minTimerCap is the room the heap keeps when it empties.
const minTimerCap = 64

func (ts *timers) fix(i int) {
	if !ts.up(i) {
		ts.down(i)
	}
}

func (ts *timers) place(i int) {
	e := ts.heap[i]
	e.c.timerIdx[e.kind] = int32(i + 1)
}

func (ts *timers) up(i int) bool {
	moved := false
	for i > 0 {
		p := (i - 1) / 2
		if ts.heap[p].at <= ts.heap[i].at {
			break
		}
		ts.heap[p], ts.heap[i] = ts.heap[i], ts.heap[p]
		ts.place(i)
		i, moved = p, true
	}
	ts.place(i)
	return moved
}

func (ts *timers) down(i int) {
	n := len(ts.heap)
	for {
		l := 2*i + 1
		if l >= n {
			break
		}
		m := l
		if r := l + 1; r < n && ts.heap[r].at < ts.heap[l].at {
			m = r
		}
		if ts.heap[i].at <= ts.heap[m].at {
			break
		}
		ts.heap[i], ts.heap[m] = ts.heap[m], ts.heap[i]
		ts.place(i)
		i = m
	}
	ts.place(i)
}
