package tcpfast

import (
	"runtime"
	"time"

	"golang.org/x/sys/unix"
)

// spin polls the set for up to w, or until the oldest ACK held is due,
// without sleeping; 0 events if none came. Between two polls it offers its
// CPU to any other thread ready to run there (sched_yield): the client or
// the server of the very round trip the loop waits for is often that
// thread, and a poll that kept the CPU would keep it waiting. A yield that
// comes back late means the CPU is wanted (a build beside the traffic):
// the spin ends and the window closes (busyPoll.contended), so that
// polling only ever takes CPU time nothing else wants.
func (e *Engine) spin(events []unix.EpollEvent, w time.Duration, bp *busyPoll) (int, error) {
	now := time.Now()
	if due := e.acks.wait(now); due >= 0 {
		w = min(w, due)
	}
	until := now.Add(w)
	for {
		n, err := e.set.Poll(events)
		if n > 0 || err != nil {
			bp.found()
			return n, err
		}
		before := time.Now()
		if !before.Before(until) {
			return 0, nil
		}
		yieldCPU()
		if after := time.Now(); after.Sub(before) > yieldContended {
			bp.contended(after)
			return 0, nil
		}
	}
}

// yieldCPU offers the calling thread's CPU to the threads ready to run
// there (sched_yield(2)); a variable for the test that needs a machine
// with nothing else to run.
var yieldCPU = func() { unix.RawSyscall(unix.SYS_SCHED_YIELD, 0, 0, 0) }

// yieldContended is how long a yield may keep the loop from its CPU
// before the CPU counts as wanted: a client or server that takes the CPU
// for the few microseconds it needs to answer, and gives it back, leaves
// the spin going; a thread that runs for a scheduler's slice (a
// millisecond or more) ends it.
const yieldContended = 100 * time.Microsecond

// busyPoll is how long the event loop polls for the next event before it
// sleeps (--busy-poll), adapting as the guest kernel's haltpoll does: a
// thread that sleeps in epoll_wait and is woken microseconds later pays
// for two context switches and, on an idle CPU, for the wake-up of the CPU
// itself (an interrupt between CPUs, and on a virtual machine an exit to
// the hypervisor). A round trip wakes the loop twice, once for the
// request and once for the answer. The window grows while the loop keeps
// being woken soon after it went to sleep (an event a longer poll would
// have caught), shrinks when it sleeps longer than max (a poll would have
// been in vain), and stays while polls find events. Measured on a 2-CPU
// virtual machine (docs/design.md, "Busy polling").
type busyPoll struct {
	max, cur time.Duration
	// After a contended spin the window stays shut until shutUntil, for
	// rest, which doubles while spins keep being contended.
	shutUntil time.Time
	rest      time.Duration
}

// The window's rest after a contended spin: it starts at contendedRest
// and doubles up to maxContendedRest while the CPU stays wanted (a
// build), so that spins cost such a machine one scheduler slice every
// second at most; a spin that finds its event uncontended starts over.
const (
	contendedRest    = 10 * time.Millisecond
	maxContendedRest = time.Second
)

// busyPollStart is the window's first step when it grows from nothing,
// and the least it shrinks to before it is off: a poll shorter than this
// would not outlast a host's answer over loopback.
const busyPollStart = 10 * time.Microsecond

// contended closes the window at now: a yield showed that other threads
// want the loop's CPU. It stays shut for the rest, then opens again, from
// busyPollStart, as the loop keeps being woken soon after it sleeps.
func (b *busyPoll) contended(now time.Time) {
	b.cur = 0
	b.rest = min(max(2*b.rest, contendedRest), maxContendedRest)
	b.shutUntil = now.Add(b.rest)
}

// quiet closes the window when the loop goes quiet (nothing came for
// quietAfter): it sleeps in Go's poller from then on, where sleeps do not
// shrink the window, and each lone frame that woke it there (neighbour
// discovery, a keepalive) would be followed by a spin in vain. Measured
// with 1,000 idle connections over 30 s (scripts/idle-cost.sh): the
// network process scheduled 231-290 times and used 20 ms of CPU with
// the window left open, 146-192 and 0-10 ms without polling.
func (b *busyPoll) quiet() { b.cur = 0 }

// found notes a spin that found its event uncontended.
func (b *busyPoll) found() { b.rest = 0 }

// window is how long to poll before the next sleep.
func (b *busyPoll) window() time.Duration { return b.cur }

// slept notes that the loop, having polled in vain for window, slept d
// before an event came at now.
func (b *busyPoll) slept(d time.Duration, now time.Time) {
	if b.max <= 0 || now.Before(b.shutUntil) {
		return
	}
	switch {
	case d > b.max:
		b.cur /= 2
		if b.cur < busyPollStart {
			b.cur = 0
		}
	case b.cur < b.max:
		b.cur = min(b.max, max(2*b.cur, busyPollStart))
	}
}

// cpuDemand tells the event loop whether every CPU it may run on has a
// thread ready to run beside it, from the machine's count of runnable
// threads (/proc/loadavg's fourth field, the loop's own thread among
// them): a spin then takes CPU time another thread wants, and the loop
// sleeps instead. On such a machine a spin that started would see it
// only when its yield came back late, a scheduler slice later (a
// millisecond or more of the round trip it waits for); the count is read
// before, at most every demandRecheck. Measured with two CPU-bound
// threads beside round trips on this 2-CPU machine (docs/design.md, "Busy
// polling").
type cpuDemand struct {
	fd      int // /proc/loadavg, or -1: unknown (the yield alone tells)
	cpus    int
	checked time.Time
	full    bool
	buf     [128]byte
}

// demandRecheck is how long the loop trusts a count of runnable threads:
// a build that starts stops the spins within it, and the reads cost a
// round trip of 60 µs every 16th one a system call.
const demandRecheck = time.Millisecond

// openCPUDemand opens /proc/loadavg for the loop; before the process
// confines itself (Landlock lets it open no more files after).
func openCPUDemand() cpuDemand {
	d := cpuDemand{fd: -1, cpus: runtime.NumCPU()}
	if fd, err := unix.Open("/proc/loadavg", unix.O_RDONLY|unix.O_CLOEXEC, 0); err == nil {
		d.fd = fd
	}
	return d
}

// close closes what openCPUDemand opened.
func (d *cpuDemand) close() {
	if d.fd >= 0 {
		unix.Close(d.fd)
		d.fd = -1
	}
}

// saturated reports, at now, whether more threads are ready to run than
// there are CPUs for them (the loop's own thread counted).
func (d *cpuDemand) saturated(now time.Time) bool {
	if d.fd < 0 || now.Sub(d.checked) < demandRecheck {
		return d.full
	}
	d.checked = now
	n, err := unix.Pread(d.fd, d.buf[:], 0)
	if err != nil {
		d.full = false
		return false
	}
	running, ok := loadavgRunning(d.buf[:n])
	d.full = ok && running > d.cpus
	return d.full
}

// loadavgRunning parses the runnable threads out of /proc/loadavg
// ("0.52 0.58 0.59 3/412 12345": the 3).
func loadavgRunning(b []byte) (int, bool) {
	field := 0
	for i := 0; i < len(b); i++ {
		if b[i] == ' ' {
			field++
			continue
		}
		if field != 3 {
			continue
		}
		n, digits := 0, 0
		for ; i < len(b) && b[i] >= '0' && b[i] <= '9'; i++ {
			n = n*10 + int(b[i]-'0')
			digits++
		}
		if digits == 0 || i == len(b) || b[i] != '/' {
			return 0, false
		}
		return n, true
	}
	return 0, false
}
