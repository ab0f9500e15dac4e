package flowtable

import (
	"context"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"
)

type fakeFlow struct {
	last   time.Time
	closed int
}

func (f *fakeFlow) LastActive() time.Time { return f.last }
func (f *fakeFlow) Close()                { f.closed++ }

var base = time.Unix(1e9, 0)

func minuteIdle[K any](K) time.Duration { return time.Minute }

func TestTableEvictsTheIdlest(t *testing.T) {
	tb := New[int, *fakeFlow](Config[int]{Max: 3, Idle: minuteIdle[int]})
	flows := []*fakeFlow{{last: base.Add(3)}, {last: base.Add(1)}, {last: base.Add(2)}}
	for i, f := range flows {
		if _, did := tb.Add(i, f); did {
			t.Fatalf("a table with room evicted a flow")
		}
	}
	extra := &fakeFlow{last: base.Add(4)}
	ev, did := tb.Add(3, extra)
	if !did || ev != flows[1] || flows[1].closed != 1 || tb.Len() != 3 {
		t.Errorf("full table evicted %v (did %v), want the idlest flow 1", ev, did)
	}
	if _, ok := tb.Get(1); ok {
		t.Error("the evicted flow is still there")
	}
	// Replacing a key closes the flow it had, and evicts nothing.
	repl := &fakeFlow{last: base.Add(5)}
	if _, did := tb.Add(3, repl); did || extra.closed != 1 || tb.Len() != 3 {
		t.Errorf("replacing a key: evicted %v, old flow closed %d times, %d flows", did, extra.closed, tb.Len())
	}
	// Remove does not close, and only removes the flow it names.
	tb.Remove(0, repl)
	if _, ok := tb.Get(0); !ok {
		t.Error("Remove of another flow's key removed it")
	}
	tb.Remove(0, flows[0])
	if _, ok := tb.Get(0); ok || flows[0].closed != 0 {
		t.Errorf("Remove: still there %v, closed %d times", ok, flows[0].closed)
	}
	s := tb.Stats()
	if s.Flows != 2 || s.Max != 3 || s.Peak != 3 || s.Evicted != 1 || s.Expired != 0 {
		t.Errorf("stats %+v", s)
	}
	tb.CloseAll()
	if tb.Len() != 0 || repl.closed != 1 || flows[2].closed != 1 {
		t.Error("CloseAll left flows")
	}
}

func TestTableExpiresIdleFlows(t *testing.T) {
	// Port 53's flows expire after 10 s, the rest after a minute.
	tb := New[uint16, *fakeFlow](Config[uint16]{Max: 10, Idle: func(port uint16) time.Duration {
		if port == 53 {
			return 10 * time.Second
		}
		return time.Minute
	}})
	dns, web := &fakeFlow{last: base}, &fakeFlow{last: base}
	tb.Add(53, dns)
	tb.Add(443, web)
	if n := tb.Expire(base.Add(10*time.Second - 1)); n != 0 {
		t.Errorf("expired %d flows before any timeout", n)
	}
	if n := tb.Expire(base.Add(10 * time.Second)); n != 1 || dns.closed != 1 || web.closed != 0 {
		t.Errorf("at 10 s: %d expired; dns closed %d, web closed %d", n, dns.closed, web.closed)
	}
	web.last = base.Add(30 * time.Second) // carried a datagram
	if n := tb.Expire(base.Add(time.Minute)); n != 0 {
		t.Errorf("a flow active 30 s ago expired at 1 min")
	}
	if n := tb.Expire(base.Add(90 * time.Second)); n != 1 || web.closed != 1 || tb.Len() != 0 {
		t.Errorf("at 90 s: %d expired, %d left", n, tb.Len())
	}
	if s := tb.Stats(); s.Expired != 2 {
		t.Errorf("stats %+v, want 2 expired", s)
	}
}

// With groups, a full table takes the place for a new flow from the group
// holding the most: a client flooding new flows recycles its own, and the
// others keep theirs however idle.
func TestTableGroupShare(t *testing.T) {
	type key struct {
		client netip.Addr
		port   uint16
	}
	a, b := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2")
	tb := New[key, *fakeFlow](Config[key]{Max: 4, Idle: minuteIdle[key], Group: func(k key) any { return k.client }})
	quiet := &fakeFlow{last: base} // b's, the idlest of all
	tb.Add(key{b, 1}, quiet)
	for p := range uint16(3) {
		tb.Add(key{a, p}, &fakeFlow{last: base.Add(time.Duration(p+1) * time.Second)})
	}
	for p := uint16(3); p < 20; p++ {
		ev, did := tb.Add(key{a, p}, &fakeFlow{last: base.Add(time.Duration(p+1) * time.Second)})
		if !did || ev == quiet {
			t.Fatalf("a's new flow %d evicted %v (%v), want one of a's own", p, ev, did)
		}
	}
	if quiet.closed != 0 || tb.Len() != 4 {
		t.Errorf("b's idle flow closed %d times; %d flows", quiet.closed, tb.Len())
	}
	// b, holding fewer, takes its place from a.
	if ev, _ := tb.Add(key{b, 2}, &fakeFlow{last: base.Add(time.Hour)}); ev == quiet || quiet.closed != 0 {
		t.Error("b's new flow evicted b's own while a held more")
	}
	if len(tb.groups[a]) != 2 || len(tb.groups[b]) != 2 {
		t.Errorf("groups: a %d, b %d flows; want 2 and 2", len(tb.groups[a]), len(tb.groups[b]))
	}
	tb.CloseAll()
	if len(tb.groups) != 0 {
		t.Errorf("%d groups left after CloseAll", len(tb.groups))
	}
}

// BenchmarkAddFull is one new flow in a full table of MaxFlows: what
// eviction costs on the packet path.
func BenchmarkAddFull(b *testing.B) {
	tb := New[int, *fakeFlow](Config[int]{Max: MaxFlows, Idle: minuteIdle[int]})
	for i := range MaxFlows {
		tb.Add(i, &fakeFlow{last: base.Add(time.Duration(i) * time.Millisecond)})
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		tb.Add(MaxFlows+i, &fakeFlow{last: base.Add(time.Duration(MaxFlows+i) * time.Millisecond)})
	}
}

// TestExpireEveryRestsWhileEmpty: the expiry does not tick while its
// tables are empty, starts when a flow comes, and stops again once the
// last is gone.
func TestExpireEveryRestsWhileEmpty(t *testing.T) {
	wake := make(chan struct{}, 1)
	tb := New[int, *fakeFlow](Config[int]{Max: 4, Idle: minuteIdle[int], Wake: wake})
	var ticks atomic.Int32
	now := func() time.Time { ticks.Add(1); return base }
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		ExpireEvery(ctx, 2*time.Millisecond, now, nil, wake, tb)
		close(done)
	}()
	time.Sleep(50 * time.Millisecond)
	if n := ticks.Load(); n != 0 {
		t.Errorf("%d ticks with the table empty, want 0", n)
	}
	f := &fakeFlow{last: base}
	tb.Add(1, f)
	deadline := time.Now().Add(5 * time.Second)
	for ticks.Load() < 3 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if n := ticks.Load(); n < 3 {
		t.Fatalf("%d ticks in 5 s with a flow, want them every 2 ms", n)
	}
	tb.Remove(1, f)
	time.Sleep(20 * time.Millisecond) // a tick sees the table empty
	n := ticks.Load()
	time.Sleep(50 * time.Millisecond)
	if m := ticks.Load(); m > n+1 {
		t.Errorf("%d ticks in 50 ms after the last flow went, want at most 1", m-n)
	}
	if f.closed != 0 {
		t.Error("the flow was closed by an expiry it was not due for")
	}
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("ExpireEvery still running after its context ended")
	}
}
