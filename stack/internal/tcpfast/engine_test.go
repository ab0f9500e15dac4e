package tcpfast

import (
	"fmt"
	"runtime"
	"testing"
	"time"

	"github.com/gonetns/gonetns/internal/epoll"
	"golang.org/x/sys/unix"
)

// TestBusyPollWindow: the window grows from nothing while the loop is
// woken soon after it sleeps, never beyond max, shrinks and turns off when
// it sleeps long, and stays off without a max.
func TestBusyPollWindow(t *testing.T) {
	const us = time.Microsecond
	for _, tc := range []struct {
		name  string
		max   time.Duration
		slept []time.Duration
		want  []time.Duration // the window after each sleep
	}{
		{"off", 0, []time.Duration{5 * us, 5 * us}, []time.Duration{0, 0}},
		{"grows to max", 50 * us, []time.Duration{20 * us, 30 * us, 40 * us, 10 * us}, []time.Duration{10 * us, 20 * us, 40 * us, 50 * us}},
		{"a sleep of max itself still grows it", 50 * us, []time.Duration{50 * us}, []time.Duration{10 * us}},
		{"max below the first step", 5 * us, []time.Duration{1 * us, 1 * us}, []time.Duration{5 * us, 5 * us}},
		{"shrinks after long sleeps, then off", 40 * us, []time.Duration{1 * us, 1 * us, 1 * us, time.Second, time.Second, time.Second}, []time.Duration{10 * us, 20 * us, 40 * us, 20 * us, 10 * us, 0}},
		{"off stays off through long sleeps", 40 * us, []time.Duration{time.Second, time.Second}, []time.Duration{0, 0}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := busyPoll{max: tc.max}
			for i, d := range tc.slept {
				b.slept(d, time.Now())
				if got := b.window(); got != tc.want[i] {
					t.Fatalf("after sleeps %v: window %v, want %v", tc.slept[:i+1], got, tc.want[i])
				}
			}
		})
	}
	// A loop gone quiet polls no more, until traffic opens the window again.
	b := busyPoll{max: 50 * us}
	b.slept(us, time.Now())
	b.quiet()
	if b.window() != 0 {
		t.Errorf("quiet: window %v, want 0", b.window())
	}
	b.slept(us, time.Now())
	if b.window() != busyPollStart {
		t.Errorf("woken soon after going quiet: window %v, want %v", b.window(), busyPollStart)
	}
}

// TestBusyPollContended: a contended spin shuts the window for a rest that
// doubles while spins keep being contended, up to maxContendedRest; sleeps
// in the rest do not open it; after the rest it grows again, and a spin
// that finds its event uncontended starts the rest over.
func TestBusyPollContended(t *testing.T) {
	const us = time.Microsecond
	b := busyPoll{max: 50 * us}
	t0 := time.Now()
	b.slept(us, t0)
	b.slept(us, t0)
	if b.window() != 20*us {
		t.Fatalf("before contention: window %v, want 20µs", b.window())
	}
	at := t0
	for i, want := range []time.Duration{contendedRest, 2 * contendedRest, 4 * contendedRest} {
		b.contended(at)
		if b.window() != 0 {
			t.Fatalf("contention %d: window %v, want 0", i+1, b.window())
		}
		b.slept(us, at.Add(want-us))
		if b.window() != 0 {
			t.Fatalf("contention %d: a sleep within the rest of %v opened the window to %v", i+1, want, b.window())
		}
		at = at.Add(want)
		b.slept(us, at)
		if b.window() != busyPollStart {
			t.Fatalf("contention %d: after the rest of %v, window %v, want %v", i+1, want, b.window(), busyPollStart)
		}
	}
	for range 20 {
		b.contended(at)
	}
	if b.rest != maxContendedRest {
		t.Errorf("after many contended spins: rest %v, want the bound %v", b.rest, maxContendedRest)
	}
	b.found()
	b.contended(at)
	if b.rest != contendedRest {
		t.Errorf("contended after an uncontended spin: rest %v, want %v again", b.rest, contendedRest)
	}
}

// TestHeldACKs: the held ACKs fall due in order, one carried by a segment
// since is not sent, and the queue stays as long as what is held while
// round trips keep it from ever emptying.
func TestHeldACKs(t *testing.T) {
	var h heldACKs
	if w := h.wait(time.Now()); w != -1 {
		t.Fatalf("empty: wait %v, want -1", w)
	}
	roundTrips(&h, new([heldInFlight + 1]conn), 1000, func(i, held int) {
		if held > heldInFlight+1 {
			t.Fatalf("round trip %d: %d ACKs held, want at most %d", i, held, heldInFlight+1)
		}
	})
	h.fire(time.Now().Add(time.Hour))
	if w := h.wait(time.Now()); w != -1 || h.head != 0 || len(h.q) != 0 {
		t.Errorf("after every ACK fell due: wait %v, head %d, len %d", w, h.head, len(h.q))
	}
}

// TestHeldACKsWait: the loop's sleep is bounded by the oldest ACK still
// held, not by the entries of ACKs that a segment carried since (which
// fire would skip), and is unbounded when every ACK held was carried.
func TestHeldACKsWait(t *testing.T) {
	var h heldACKs
	var a, b conn
	h.hold(&a)
	h.hold(&b)
	a.ackHeld.Store(0) // a's answer carried its ACK; b's is still held
	now := time.Now()
	if w := h.wait(now); w <= 0 || w > ackDelay {
		t.Fatalf("b's ACK held: wait %v, want at most %v", w, ackDelay)
	}
	if got := len(h.q) - h.head; got != 1 {
		t.Errorf("after wait: %d entries, want 1 (b's)", got)
	}
	b.ackHeld.Store(0)
	if w := h.wait(now); w != -1 || h.head != 0 || len(h.q) != 0 {
		t.Errorf("every ACK carried: wait %v, head %d, len %d; want -1, 0, 0", w, h.head, len(h.q))
	}
	// A connection that holds again: its older entry is not the live one.
	h.hold(&a)
	h.hold(&b)
	a.ackHeld.Store(0)
	h.hold(&a)
	if w := h.wait(now); w <= 0 || len(h.q)-h.head != 2 || !h.q[h.head].live() || h.q[h.head].c != &b {
		t.Errorf("a held again after b: wait %v, %d entries, front is b's: %v", w, len(h.q)-h.head, h.q[h.head].c == &b)
	}
}

// heldInFlight is how many round trips' ACKs roundTrips leaves held.
const heldInFlight = 4

// roundTrips makes n round trips' worth of held ACKs on h: each holds one
// that its answer carries, and the ACKs of the round trip heldInFlight
// before fall due, over conns. check sees how many are held after each.
func roundTrips(h *heldACKs, conns *[heldInFlight + 1]conn, n int, check func(i, held int)) {
	var dues [heldInFlight + 1]time.Time
	for i := range n {
		c := &conns[i%len(conns)]
		h.hold(c)
		dues[i%len(dues)] = h.q[len(h.q)-1].due
		c.ackHeld.Store(0) // the answer carried it: fire must not send it
		if i >= heldInFlight {
			h.fire(dues[(i-heldInFlight)%len(dues)])
		}
		if check != nil {
			check(i, len(h.q)-h.head)
		}
	}
}

// TestProbesAnswered: a segment without data outside the window (the
// sandbox's keepalive probe and its zero-window probe, one below what it
// knows was received) gets an ACK at once; before, it got none, and the
// sandbox's kernel ended idle connections whose programs ask for
// keepalive probes as dead (ETIMEDOUT). A pure ACK in the window gets
// none.
func TestProbesAnswered(t *testing.T) {
	h := newFuzzHarness(t)
	defer h.close()
	if c := h.waitConn(func(c *conn) bool { return c.state == stEstablished }); c == nil {
		t.Fatal("no connection")
	}
	seq := h.irs + 1
	h.send(flagACK, seq, h.iss+1, 1000, 100, false)
	seq += 100
	if !waitFor(func() bool { return h.received.Load() == 100 }) {
		t.Fatalf("the host got %d bytes of 100", h.received.Load())
	}
	answered := func(what string, probeSeq uint32) {
		t.Helper()
		base := h.pureACKs.Load()
		h.send(flagACK, probeSeq, h.iss+1, 1000, 0, false)
		if !waitFor(func() bool { return h.pureACKs.Load() > base }) {
			t.Fatalf("%s was not answered", what)
		}
		if got := h.lastACK.Load(); got != seq {
			t.Fatalf("%s was answered with ACK %d, want %d", what, got-h.irs, seq-h.irs)
		}
	}
	if !waitFor(func() bool { return h.lastACK.Load() == seq }) {
		t.Fatal("the data was not acknowledged")
	}
	for i := range 3 { // each probe of a run
		answered(fmt.Sprintf("keepalive probe %d", i+1), seq-1)
	}
	answered("a segment beyond the window", seq+1<<30)

	c := h.waitConn(func(*conn) bool { return true })
	c.mu.Lock()
	right := c.rcvRight
	c.mu.Unlock()
	for _, s := range []uint32{seq, right} { // its left edge, and its right (as Linux takes it)
		base := h.pureACKs.Load()
		h.send(flagACK, s, h.iss+1, 1000, 0, false)
		time.Sleep(100 * time.Millisecond)
		if n := h.pureACKs.Load() - base; n != 0 {
			t.Fatalf("a pure ACK in the window (%d past what was received) got %d ACKs back", s-seq, n)
		}
	}
}

// TestBurstACKs: while the event loop reads a burst of frames, in-order
// data is acknowledged once per two segments, and the burst's end sends
// an ACK still held; data out of order and data outside a burst are
// acknowledged at once.
func TestBurstACKs(t *testing.T) {
	h := newFuzzHarness(t)
	defer h.close()
	c := h.waitConn(func(c *conn) bool { return c.state == stEstablished })
	if c == nil {
		t.Fatal("no connection")
	}
	held := func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.ackIsHeld()
	}
	acks := func(want int64) {
		t.Helper()
		if !waitFor(func() bool { return h.pureACKs.Load() >= want }) || h.pureACKs.Load() != want {
			t.Fatalf("%d ACKs sent, want %d", h.pureACKs.Load(), want)
		}
	}
	base := h.pureACKs.Load()
	seq := h.irs + 1
	data := func() {
		h.send(flagACK, seq, h.iss+1, 1000, 100, false)
		seq += 100
	}

	h.e.pumping = true // as the loop does around the link's Pump
	data()
	if !held() {
		t.Fatal("the first segment of a burst was acknowledged at once")
	}
	data()
	if held() {
		t.Fatal("the second segment left its ACK held")
	}
	acks(base + 1)
	data()
	h.e.pumping = false
	h.e.acks.endBurst()
	if held() {
		t.Fatal("the burst's end left an ACK held")
	}
	acks(base + 2)

	// Out of order, inside a burst: a duplicate ACK at once.
	h.e.pumping = true
	h.send(flagACK, seq+100, h.iss+1, 1000, 100, false)
	if held() {
		t.Fatal("data out of order was not acknowledged at once")
	}
	acks(base + 3)
	data() // fills the hole: the ACK of both goes at once
	acks(base + 4)
	h.e.pumping = false
	h.e.acks.endBurst()

	// Outside a burst (no event loop, or a frame handed in on its own).
	data()
	if held() {
		t.Fatal("data outside a burst was not acknowledged at once")
	}
	acks(base + 5)
	if !waitFor(func() bool { return h.received.Load() == int64(seq-h.irs-1) }) {
		t.Fatalf("the host got %d bytes of %d", h.received.Load(), seq-h.irs-1)
	}
}

// TestSpinStandsDownForAWantedCPU: a spin that shares its CPU with a
// thread that wants it (pinned together, as a build's compiler and the
// loop can be) yields to it, sees the yield come back late, ends before
// its window and shuts the window; alone on its CPU it polls its whole
// window, yielding between the polls.
func TestSpinStandsDownForAWantedCPU(t *testing.T) {
	set, err := epoll.NewBlocking("test")
	if err != nil {
		t.Fatal(err)
	}
	defer set.Close()
	e := &Engine{set: set}
	events := make([]unix.EpollEvent, 4)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var cpus unix.CPUSet
	cpus.Set(0)
	if err := unix.SchedSetaffinity(0, &cpus); err != nil {
		t.Fatalf("pin the test's thread to CPU 0: %v", err)
	}

	// Alone (a yield that comes back at once): the spin polls its whole
	// window and keeps it. The machine may still take the CPU from the
	// test (other tests run beside it): one spin of many will do.
	yields := 0
	realYield := yieldCPU
	yieldCPU = func() { yields++ }
	const window = 200 * time.Microsecond
	var bp busyPoll
	var spun time.Duration
	for range 100 {
		yields = 0
		bp = busyPoll{max: window, cur: window}
		start := time.Now()
		if n, err := e.spin(events, window, &bp); n != 0 || err != nil {
			t.Fatalf("alone: spin = %d, %v", n, err)
		}
		if spun = time.Since(start); spun >= window && bp.window() == window {
			break
		}
	}
	yieldCPU = realYield
	if spun < window || bp.window() != window || yields == 0 {
		t.Fatalf("alone on its CPU: the last spin of 100 took %v with %d yields, window %v after; want the whole %v, yields between the polls and the window kept", spun, yields, bp.window(), window)
	}

	stop := make(chan struct{})
	hogging := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		var cpus unix.CPUSet
		cpus.Set(0)
		hogging <- unix.SchedSetaffinity(0, &cpus)
		for {
			select {
			case <-stop:
				return
			default:
			}
		}
	}()
	defer close(stop)
	if err := <-hogging; err != nil {
		t.Fatalf("pin the hog to CPU 0: %v", err)
	}
	const long = 2 * time.Second
	bp = busyPoll{max: long, cur: long}
	start := time.Now()
	if n, err := e.spin(events, long, &bp); n != 0 || err != nil {
		t.Fatalf("beside a hog: spin = %d, %v", n, err)
	}
	if d := time.Since(start); d >= long || bp.window() != 0 || bp.rest != contendedRest {
		t.Fatalf("beside a thread that wants the CPU: spun %v of %v, window %v, rest %v; want the spin ended early, window 0, rest %v", d, long, bp.window(), bp.rest, contendedRest)
	}
}

// TestLoadavgRunning: the runnable threads of /proc/loadavg, and nothing
// from a line that is not one.
func TestLoadavgRunning(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int
		ok   bool
	}{
		{"0.52 0.58 0.59 3/412 12345\n", 3, true},
		{"12.00 11.50 9.10 17/2048 99\n", 17, true},
		{"0.00 0.00 0.00 1/1 1", 1, true},
		{"0.52 0.58 0.59 /412 12345\n", 0, false},
		{"0.52 0.58 0.59 3 12345\n", 0, false},
		{"0.52 0.58 0.59 x/412 1\n", 0, false},
		{"0.52 0.58\n", 0, false},
		{"", 0, false},
	} {
		n, ok := loadavgRunning([]byte(tc.in))
		if n != tc.want || ok != tc.ok {
			t.Errorf("loadavgRunning(%q) = %d, %v; want %d, %v", tc.in, n, ok, tc.want, tc.ok)
		}
	}
}

// TestCPUDemand: the count is read from /proc/loadavg, at most every
// demandRecheck, and a machine with a thread ready for every CPU but the
// loop's own is saturated.
func TestCPUDemand(t *testing.T) {
	d := openCPUDemand()
	defer d.close()
	if d.fd < 0 {
		t.Fatal("cannot open /proc/loadavg: busy polling would rely on its yields alone")
	}
	now := time.Now()
	d.saturated(now)
	if d.checked != now {
		t.Fatalf("first call: not read")
	}
	d.cpus = 0 // every runnable thread, the test's own included, is more than the CPUs
	if got := d.saturated(now.Add(demandRecheck)); !got {
		t.Errorf("with no CPU for the running test: saturated = false, want true")
	}
	d.cpus = 1 << 20
	if got := d.saturated(now.Add(demandRecheck + demandRecheck/2)); !got {
		t.Errorf("within demandRecheck of the last read: answer changed, want the last (true)")
	}
	if got := d.saturated(now.Add(3 * demandRecheck)); got {
		t.Errorf("with a CPU for every thread: saturated = true, want false")
	}
}
