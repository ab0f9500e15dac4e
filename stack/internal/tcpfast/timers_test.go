package tcpfast

import (
	"math/rand/v2"
	"runtime"
	"runtime/metrics"
	"sync"
	"testing"
	"time"
)

// TestTimers sets, moves and stops the timers of many connections and
// checks that each fires once, not before it is due, in the order of
// their deadlines, that a stopped one never fires, that the heap
// empties and the runtime timer stops when nothing is set, and that the
// firings start no goroutine (they run on serve's).
func TestTimers(t *testing.T) {
	var (
		mu    sync.Mutex
		fired []*conn
		at    = map[*conn]time.Time{}
	)
	var ts timers
	ts.init(func(c *conn, k timerKind) {
		if k != timerAck {
			t.Errorf("fired kind %d, set timerAck", k)
		}
		mu.Lock()
		defer mu.Unlock()
		if now := time.Now(); now.Before(at[c]) {
			t.Errorf("a timer fired %v early", at[c].Sub(now))
		}
		fired = append(fired, c)
	})
	served := make(chan struct{})
	go func() {
		defer close(served)
		ts.serve()
	}()

	runtime.GC() // the collector's own goroutines start at its first cycle
	started := goroutinesStarted()
	const n = 300
	conns := make([]*conn, n)
	stopped := map[*conn]bool{}
	for i := range conns {
		c := &conn{}
		conns[i] = c
		d := time.Duration(50+rand.IntN(40)) * time.Millisecond
		c.mu.Lock()
		mu.Lock()
		at[c] = time.Now().Add(d)
		mu.Unlock()
		ts.set(c, timerAck, d)
		c.mu.Unlock()
	}
	// Move a third later, stop a third.
	for i, c := range conns {
		c.mu.Lock()
		switch i % 3 {
		case 1:
			mu.Lock()
			at[c] = time.Now().Add(120 * time.Millisecond)
			mu.Unlock()
			ts.set(c, timerAck, 120*time.Millisecond)
		case 2:
			ts.stop(c, timerAck)
			stopped[c] = true
		}
		c.mu.Unlock()
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		mu.Lock()
		got := len(fired)
		mu.Unlock()
		if got >= n-len(stopped) || time.Now().After(deadline) {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(20 * time.Millisecond) // room for a wrong one more
	if d := goroutinesStarted() - started; d > 2 {
		t.Errorf("%d goroutines started while the timers fired; want none", d)
	}
	ts.mu.Lock()
	armed := ts.armedAt
	ts.mu.Unlock()
	ts.close()
	<-served // and serve returns
	mu.Lock()
	defer mu.Unlock()
	if len(fired) != n-len(stopped) {
		t.Fatalf("%d timers fired, want %d", len(fired), n-len(stopped))
	}
	seen := map[*conn]bool{}
	for i, c := range fired {
		if stopped[c] {
			t.Errorf("a stopped timer fired")
		}
		if seen[c] {
			t.Errorf("a timer fired twice")
		}
		seen[c] = true
		if i > 0 && at[c].Before(at[fired[i-1]].Add(-time.Millisecond)) {
			t.Errorf("timer %d fired after one due %v later", i, at[fired[i-1]].Sub(at[c]))
		}
	}
	ts.mu.Lock()
	if l := len(ts.heap); l != 0 {
		t.Errorf("%d timers left in the heap", l)
	}
	if armed != 0 {
		t.Errorf("the runtime timer is still armed with nothing set")
	}
	ts.mu.Unlock()
	for _, c := range conns {
		if c.timerIdx != [timerKinds]int32{} {
			t.Fatalf("a connection keeps a place in the heap after its timer fired or stopped: %v", c.timerIdx)
		}
	}
}

// TestTimersHeap checks the heap's order and every entry's index through
// random sets, moves and stops, without the runtime timer firing.
func TestTimersHeap(t *testing.T) {
	var ts timers
	ts.init(func(*conn, timerKind) {})
	defer ts.close()
	conns := make([]*conn, 500)
	for i := range conns {
		conns[i] = &conn{}
	}
	for step := 0; step < 20000; step++ {
		c := conns[rand.IntN(len(conns))]
		k := timerKind(rand.IntN(int(timerKinds)))
		if rand.IntN(3) == 0 {
			ts.stop(c, k)
		} else {
			ts.set(c, k, time.Hour+time.Duration(rand.IntN(1000))*time.Second)
		}
		if step%997 == 0 {
			checkHeap(t, &ts)
		}
	}
	checkHeap(t, &ts)
}

func checkHeap(t *testing.T, ts *timers) {
	t.Helper()
	ts.mu.Lock()
	defer ts.mu.Unlock()
	for i, e := range ts.heap {
		if got := int(e.c.timerIdx[e.kind]); got != i+1 {
			t.Fatalf("entry %d's connection says it is at %d", i, got-1)
		}
		if i > 0 && ts.heap[(i-1)/2].at > e.at {
			t.Fatalf("entry %d is due before its parent", i)
		}
	}
}

// goroutinesStarted is how many goroutines the process has started.
func goroutinesStarted() uint64 {
	s := []metrics.Sample{{Name: "/sched/goroutines-created:goroutines"}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}
