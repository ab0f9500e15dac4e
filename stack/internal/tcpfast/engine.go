// Package tcpfast is the TCP fast path: each TCP connection the sandbox
// opens to the outside is a mirror of one host socket, with no TCP
// implementation of its own in between. What the sandbox sends is written
// to the host socket and acknowledged when the socket took it, the window
// being the room left in the socket's send buffer; what the host sends
// stays in the socket's receive queue, is read with MSG_PEEK and sent to
// the sandbox, and is dropped from the queue only when the sandbox
// acknowledges it, so a lost frame is sent again from the socket's own
// queue. The TAP reader handles each segment inline; one epoll poller
// watches every host socket; no connection has a goroutine or a buffer of
// its own. pasta's TCP (passt's tcp.c) is the model.
//
// The engine takes only what it fully understands: connections opened by
// a SYN it saw, in plain IPv4 or IPv6 frames. Everything else goes to the
// stack, which answers it.
package tcpfast

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/gonetns/gonetns/internal/epoll"
	"github.com/gonetns/gonetns/tap"
)

// Host is the host socket of a new connection, as Config.Dial makes it.
type Host struct {
	// FD is a non-blocking TCP socket whose connect to the destination
	// is under way or done. The engine owns it from here on.
	FD int
	// ConnectTimeout is how long the connect may take; the sandbox then
	// gets a reset.
	ConnectTimeout time.Duration
	// Done, when not nil, is called once when the connection is over.
	Done func()
}

// Config of an Engine. Device, MTU, MAC and Dial are required.
type Config struct {
	// Device carries the frames to the sandbox.
	Device tap.Device
	// MTU of the link: it sets the MSS the engine offers.
	MTU uint32
	// MAC is the stack's end of the link.
	MAC tcpip.LinkAddress
	// Dial makes the host socket for the sandbox's connection from src to
	// dst, or refuses it (the sandbox gets a reset). It runs on the
	// reader goroutine: it must not block.
	Dial func(src, dst netip.AddrPort) (Host, error)
	// Local reports whether dst is a service of the stack itself (a
	// listener): connections to it are left to the stack.
	Local func(dst netip.AddrPort) bool
	// MaxHalfOpen bounds connections whose handshake is not complete;
	// a SYN beyond it evicts the oldest, or is dropped while the oldest
	// may still have its ACK waiting in the link (LinkQueue). Default
	// 4096.
	MaxHalfOpen int
	// LinkQueue is the most frames the link holds for the engine to read
	// (the TAP's transmit queue). Default tap.TxQueueLen.
	LinkQueue int
	// HandshakeTimeout bounds how long a connection may wait for the
	// sandbox's ACK once the SYN-ACK went out. Default 10 s.
	HandshakeTimeout time.Duration
	// Link, when set, makes the engine's poller the reader of the link
	// too (docs/design.md, "The event loop").
	Link *LinkReader
	// NoPeekOffset uses the path for kernels without SO_PEEK_OFF on TCP
	// even where the kernel has it (tests).
	NoPeekOffset bool
	Logger       *slog.Logger
}

// LinkReader is the link the engine's poller reads when Config.Link is
// set: it waits for the TAP in the epoll set of the host sockets, in
// epoll_wait itself on a thread of its own, and calls Pump when frames are
// there; the segments of the fast path come back to Handle on that thread.
// A segment from the sandbox and the host's answer to it are then handled
// without any goroutine being woken, and the ACKs the engine holds (see
// ackDelay) are sent by that loop when its wait times out, not by timers.
type LinkReader struct {
	// FD is the TAP's descriptor (tap.Pollable).
	FD int
	// Pump reads at most max frames waiting on FD, without waiting, and
	// hands each on; it returns how many it read, and an error when the
	// device failed or was closed (it is not called again).
	Pump func(max int) (int, error)
	// Done is called once the loop reads the link no more.
	Done func()
	// BusyPoll, when positive, is the longest the loop polls for the next
	// event before it sleeps (see busyPoll).
	BusyPoll time.Duration
}

// The event loop's epoll keys: connections' ids below flowBase; from it,
// the flows of another owner the loop watches (WatchFlow), flowBase plus
// their ids; the link's descriptor last.
const (
	flowBase = 1 << 31
	linkKey  = epoll.ReservedKey - 1
	// MaxFlowID bounds the ids of WatchFlow.
	MaxFlowID = linkKey - flowBase
)

// ErrNoLoop is AttachFlows's error when the engine does not read the link
// (Config.Link is nil).
var ErrNoLoop = errors.New("the TCP fast path runs no event loop")

// maxPump bounds the frames the loop reads from the link in a row before
// it looks at the host sockets again (the reader goroutine's yieldEvery).
const maxPump = 64

// Defaults of Config.
const (
	// A handshake with a host that answers at once completes in one
	// round trip over the link, microseconds: a burst of connects, or a
	// flood of SYNs from spoofed sources (which never complete theirs),
	// fills the table. The oldest then go first, but only once the link
	// has delivered more frames since their SYN-ACK than it can queue
	// (Engine.evict): before, their ACK may be waiting there.
	DefaultMaxHalfOpen      = 4096
	DefaultHandshakeTimeout = 10 * time.Second
)

// maxQueued bounds the memory all connections' chunks take (chunkCost):
// the bytes they hold out of order or not yet taken by their host socket,
// each connection also within its window.
const maxQueued = 64 << 20

// Stats are the engine's counters.
type Stats struct {
	Open         int    // connections now
	Opened       uint64 // connections accepted since the start
	Refused      uint64 // SYNs answered with a reset (Dial refused, connect failed or timed out)
	Evicted      uint64 // half-open connections dropped for a new one
	Deferred     uint64 // SYNs dropped at MaxHalfOpen, for their sender to send again (the oldest might still complete)
	HalfOpen     int    // connections whose handshake is not complete, now
	MaxHalfOpen  int    // Config.MaxHalfOpen
	PeakHalfOpen int    // the most at once since the start
	Retransmits  uint64 // segments sent again to the sandbox
	Dropped      uint64 // segments from the sandbox not kept (beyond the window, or the queue bound)
	MTUReduced   uint64 // times a connection's segments were made smaller for a link inside the sandbox (pmtu.go)
}

// Engine is the fast path of one stack. Create it with New, start it with
// Start, stop it with Close.
type Engine struct {
	cfg     Config
	log     *slog.Logger
	vnet    bool
	mss4    int // the MSS the engine offers, from the MTU
	mss6    int
	peekOff atomic.Int32 // 0 unknown, 1 the kernel has SO_PEEK_OFF for TCP, -1 it has not
	// sandboxMAC is the source MAC of the last SYN: the sandbox has one,
	// and each connection's frames take it without a string of their own.
	sandboxMAC atomic.Pointer[tcpip.LinkAddress]

	set *epoll.Set

	mu       sync.RWMutex
	state    int // 0 new, 1 started, 2 closed
	conns    map[key]*conn
	byID     map[uint32]*conn
	mostConn int // the most connections the maps held since ReleaseMemory
	nextID   uint32
	halfOpen connList // oldest first
	peakHalf int      // the most halfOpen held
	spare    []*conn  // closed conns for the next connections (maxSpare)
	wg       sync.WaitGroup

	tsBase time.Time // the clock of the timestamps we send: milliseconds since tsBase, plus tsOff
	tsOff  uint32

	txPool sync.Pool
	queued atomic.Int64 // bytes held by all connections' queues

	timers   timers                          // the connections' timers
	acks     heldACKs                        // with Config.Link: the ACKs the loop sends when due
	pumping  bool                            // the loop is reading the link (the loop's goroutine only)
	flowRecv atomic.Pointer[func(id uint32)] // with Config.Link: AttachFlows's receive, set once

	opened, refused, evicted, deferred, retransmits, dropped, mtuReduced atomic.Uint64
	halfOpenWarned                                                       atomic.Int64 // unix seconds of the last warnHalfOpen
	// frames counts the frames Handle has seen: a connection's handshake
	// is as old as the frames the link delivered since (conn.synFrame).
	frames atomic.Uint64
}

type key struct{ src, dst netip.AddrPort }

// New validates cfg. It starts nothing.
func New(cfg Config) (*Engine, error) {
	if cfg.Device == nil || cfg.Dial == nil || len(cfg.MAC) != 6 {
		return nil, errors.New("tcpfast: a device, a MAC and a dialer are required")
	}
	if cfg.MTU < 1280 || cfg.MTU > 65535 {
		return nil, fmt.Errorf("tcpfast: MTU %d out of range", cfg.MTU)
	}
	if cfg.MaxHalfOpen <= 0 {
		cfg.MaxHalfOpen = DefaultMaxHalfOpen
	}
	if cfg.LinkQueue <= 0 {
		cfg.LinkQueue = tap.TxQueueLen
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = DefaultHandshakeTimeout
	}
	e := &Engine{
		cfg:   cfg,
		log:   cfg.Logger,
		vnet:  cfg.Device.VNetHdr(),
		mss4:  int(cfg.MTU) - 40,
		mss6:  int(cfg.MTU) - 60,
		conns: make(map[key]*conn),
		byID:  make(map[uint32]*conn),
	}
	if e.log == nil {
		e.log = slog.New(slog.DiscardHandler)
	}
	if cfg.NoPeekOffset {
		e.peekOff.Store(-1)
	}
	e.tsBase = time.Now()
	var r [4]byte
	rand.Read(r[:])
	e.tsOff = binary.BigEndian.Uint32(r[:])
	e.txPool.New = func() any { return &tx{payload: make([]byte, maxPayload)} }
	e.timers.init(fireTimer)
	return e, nil
}

// Start starts the poller of host sockets.
func (e *Engine) Start() error {
	var set *epoll.Set
	var err error
	if e.cfg.Link != nil {
		set, err = epoll.NewBlocking("tcp fast path")
		if err == nil {
			if err = set.Add(e.cfg.Link.FD, unix.EPOLLIN, linkKey); err != nil {
				set.Close()
			}
		}
	} else {
		set, err = epoll.New("tcp fast path")
	}
	if err != nil {
		return err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.state != 0 {
		set.Close()
		return errors.New("tcpfast: already started")
	}
	e.set = set
	e.state = 1
	e.wg.Add(2)
	go func() {
		defer e.wg.Done()
		e.timers.serve()
	}()
	if e.cfg.Link != nil {
		demand := cpuDemand{fd: -1}
		if e.cfg.Link.BusyPoll > 0 {
			demand = openCPUDemand()
		}
		go e.loop(demand)
	} else {
		go e.poll()
	}
	return nil
}

// Sending reports whether the sandbox may still be sending on one of the
// engine's connections, as the engine is about to stop (the sandbox's
// command has exited): a program that closed its socket and exited
// leaves the rest of its bytes, and its FIN, to its kernel, which keeps
// sending them through the TAP (the namespace lives as long as the TAP's
// descriptor) as it would to a peer on its own machine. A connection
// counts while it has bytes the host socket has not taken, or its window
// is shut for want of room in the host socket (the sandbox's bytes wait
// behind it), or, its FIN not come, a segment with data came from the
// sandbox within settleIdle; a connection whose end is still open (a
// process left behind holds it) and sends nothing, or only acknowledges
// what the host sends, does not. The caller looks again while it waits
// (sandbox's settle).
func (e *Engine) Sending() bool {
	now := e.timers.now()
	e.mu.RLock()
	all := e.connsLocked()
	e.mu.RUnlock()
	for _, c := range all {
		c.mu.Lock()
		sending := c.state == stEstablished && (len(c.queue) > 0 ||
			!c.finRcvd && (c.wndSmall || c.stalled || now-c.dataAt < int64(settleIdle)))
		c.mu.Unlock()
		if sending {
			return true
		}
	}
	return false
}

// connsLocked returns the engine's connections, for a caller that then
// locks each in turn. e.mu is held.
func (e *Engine) connsLocked() []*conn {
	all := make([]*conn, 0, len(e.conns))
	for _, c := range e.conns {
		all = append(all, c)
	}
	return all
}

// settleIdle is how long a connection's sandbox end may stay silent, its
// FIN not come, before Sending stops counting it: a kernel sending the
// rest of a closed socket's bytes sends a segment every round trip, or,
// the window shut, a probe at its retransmission timeout, which starts
// at 200 ms and is covered by the window test.
const settleIdle = 250 * time.Millisecond

// Close ends every connection (closeOnExit: with a FIN where the
// sandbox's stream is complete, else a reset, both ways) and stops the
// poller; it waits for the engine's goroutines and timers in flight.
// Idempotent.
func (e *Engine) Close() error {
	e.mu.Lock()
	if e.state == 2 {
		e.mu.Unlock()
		e.wg.Wait()
		return nil
	}
	started := e.state == 1
	e.state = 2
	e.spare = nil
	all := e.connsLocked()
	e.mu.Unlock()
	for _, c := range all {
		c.mu.Lock()
		c.closeOnExit()
		c.mu.Unlock()
	}
	e.timers.close()
	if started {
		e.set.Close()
	}
	e.wg.Wait()
	return nil
}

// fireTimer runs c's timer k, fallen due. c.mu is held.
func fireTimer(c *conn, k timerKind) {
	switch k {
	case timerRetransmit:
		c.onTimer()
	case timerAck:
		c.sendHeldACK()
	}
}

// Stats returns the engine's counters.
func (e *Engine) Stats() Stats {
	e.mu.RLock()
	open, half, peak := len(e.conns), e.halfOpen.n, e.peakHalf
	e.mu.RUnlock()
	return Stats{
		Open:         open,
		HalfOpen:     half,
		MaxHalfOpen:  e.cfg.MaxHalfOpen,
		PeakHalfOpen: peak,
		Deferred:     e.deferred.Load(),
		Opened:       e.opened.Load(),
		Refused:      e.refused.Load(),
		Evicted:      e.evicted.Load(),
		Retransmits:  e.retransmits.Load(),
		MTUReduced:   e.mtuReduced.Load(),
		Dropped:      e.dropped.Load(),
	}
}

// Owns reports whether the engine holds a connection between src (the
// sandbox's end) and dst.
func (e *Engine) Owns(src, dst netip.AddrPort) bool {
	return e.lookup(key{src, dst}) != nil
}

func (e *Engine) lookup(k key) *conn {
	e.mu.RLock()
	c := e.conns[k]
	e.mu.RUnlock()
	return c
}

// Handle takes a frame from the sandbox, on the reader goroutine: vnetHdr
// is its virtio-net header (nil without one), head the frame's first
// buffer and tail the rest (nil when it fit). It returns true when the
// frame was a segment of the fast path's, which the stack then never
// sees; the frame's bytes are not used after Handle returns.
func (e *Engine) Handle(vnetHdr, head, tail []byte) bool {
	e.frames.Add(1)
	var s segment
	if !parse(&s, e.cfg.MAC, vnetHdr, head, tail) {
		return e.tooBig(head)
	}
	if c := e.lookup(key{s.src, s.dst}); c != nil {
		c.mu.Lock()
		if s.payloadLen > 0 || s.has(flagFIN) {
			c.dataAt = e.timers.now()
		}
		c.input(&s)
		c.mu.Unlock()
		return true
	}
	// A segment of no connection of ours: a SYN opens one; anything else
	// (a late segment of a closed connection, one of the stack's own)
	// is the stack's to answer, but for a SYN with a FIN or a reset,
	// which no TCP sends and Linux drops: gVisor's forwarder dialled
	// them as SYNs, past the half-open cap (MaxHalfOpen), so that a
	// flood of them kept the sandbox's own connections out (20 a second
	// to a host listener that never accepts: 13 of 30 curls refused).
	if s.has(flagSYN) && s.flags&(flagFIN|flagRST) != 0 {
		e.dropped.Add(1)
		return true
	}
	if s.flags&(flagSYN|flagACK|flagRST|flagFIN) != flagSYN {
		return false
	}
	if e.cfg.Local != nil && e.cfg.Local(s.dst) {
		return false
	}
	e.open(&s)
	return true
}

// evict resets the half-open connection c for a new one, unless the
// link may still hold the sandbox's ACK of c's SYN-ACK: in a burst of
// connections, each SYN-ACK's ACK waits in the link's queue behind the
// SYNs that followed, and a SYN that evicted the oldest half-open
// connection then reset a connection the sandbox had seen open (at an
// open-files limit of 1,024, 111 half-open allowed: a burst of 200
// connects lost 12-89 of them in 8 runs of 10, ECONNRESET at the first
// read). c may go once its ACK cannot be coming: the link has delivered
// more frames since c's SYN-ACK than it can queue (a flood of spoofed
// SYNs makes room at once), or a second has passed (Linux's first
// retransmission timeout: its ACK lost, or the flood stopped short of
// that many frames; before, new connections then waited for the
// handshakes' 10 s deadline). One whose host connect is still under way
// (no SYN-ACK sent) goes after a second too: its SYN has gone unanswered
// that long (120 connects to a host that drops them kept the sandbox's
// next connect to 10.0.2.2 waiting 11 s). It reports whether c is gone (it
// may have completed meanwhile).
func (e *Engine) evict(c *conn) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.state >= stEstablished {
		return true
	}
	if e.frames.Load()-c.synFrame <= uint64(e.cfg.LinkQueue) && e.timers.now()-c.synAt < int64(handshakeAge) {
		return false
	}
	e.evicted.Add(1)
	e.warnHalfOpen()
	c.reset(nil)
	return true
}

// handshakeAge is how long a half-open connection is kept from eviction
// at the cap (evict).
const handshakeAge = time.Second

// warnHalfOpen says, at most every 10 s, that the half-open cap was
// reached.
func (e *Engine) warnHalfOpen() {
	if now := time.Now().Unix(); e.halfOpenWarned.Swap(now) < now-10 {
		e.log.Warn("the sandbox has too many TCP handshakes pending; new connections wait for older ones (their SYNs are sent again), or evict those that never complete",
			"limit", e.cfg.MaxHalfOpen)
	}
}

// tooBig hands a report that a segment did not fit a link of the sandbox
// (pmtu.go) to its connection; false for any other frame, and for a
// report of no connection of the fast path's, which are the stack's.
func (e *Engine) tooBig(head []byte) bool {
	var p tooBig
	if !parseTooBig(&p, e.cfg.MAC, head) {
		return false
	}
	c := e.lookup(p.k)
	if c == nil {
		return false
	}
	c.mu.Lock()
	c.pathMTU(&p)
	c.mu.Unlock()
	return true
}

// open starts a connection for the SYN s: the host socket is dialled
// first; the SYN-ACK goes out once it is connected.
func (e *Engine) open(s *segment) {
	e.mu.Lock()
	if e.state != 1 {
		e.mu.Unlock()
		return
	}
	var oldest *conn
	if e.halfOpen.n >= e.cfg.MaxHalfOpen {
		oldest = e.halfOpen.head
	}
	e.mu.Unlock()
	if oldest != nil && !e.evict(oldest) {
		e.deferred.Add(1)
		e.warnHalfOpen()
		return // dropped: the sandbox sends its SYN again in a second
	}

	h, err := e.cfg.Dial(s.src, s.dst)
	if err != nil {
		e.refused.Add(1)
		e.resetFor(s)
		return
	}
	c := e.newConn(s, h)
	if !c.register() {
		return
	}
	e.opened.Add(1)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.state == stConnecting {
		if done, failed := connected(c.fd); done {
			c.connectDone(failed)
		}
	}
}

// remoteMAC is s's source MAC as the address of the frames that answer
// it; a new one is allocated only when the sandbox's MAC changes.
func (e *Engine) remoteMAC(s *segment) tcpip.LinkAddress {
	if m := e.sandboxMAC.Load(); m != nil && string(*m) == string(s.srcMAC[:]) {
		return *m
	}
	m := s.remoteMAC()
	e.sandboxMAC.Store(&m)
	return m
}

// appendTS appends a timestamp option (with two NOPs before it) that
// echoes ecr.
func (e *Engine) appendTS(o []byte, ecr uint32) []byte {
	val := uint32(time.Since(e.tsBase)/time.Millisecond) + e.tsOff
	return append(o, header.TCPOptionNOP, header.TCPOptionNOP, header.TCPOptionTS, header.TCPOptionTSLength,
		byte(val>>24), byte(val>>16), byte(val>>8), byte(val),
		byte(ecr>>24), byte(ecr>>16), byte(ecr>>8), byte(ecr))
}

// resetFor answers s, a segment of no connection, with a reset.
func (e *Engine) resetFor(s *segment) {
	ep := ends{v6: s.v6, local: s.dst, remote: s.src, mac: e.cfg.MAC, remoteMAC: e.remoteMAC(s)}
	f := fields{flags: flagRST | flagACK, ack: s.end()}
	if s.has(flagACK) {
		f = fields{flags: flagRST, seq: s.ack}
	}
	t := e.txPool.Get().(*tx)
	e.write(t, &ep, f, nil, e.mss4)
	e.txPool.Put(t)
}

// poll waits for the host sockets' events and hands each to its
// connection.
func (e *Engine) poll() {
	defer e.wg.Done()
	events := make([]unix.EpollEvent, 128)
	for {
		n, err := e.set.Wait(events)
		if err != nil {
			if !errors.Is(err, epoll.ErrClosed) {
				e.log.Error("the TCP fast path's poller failed; its connections stall", "err", err)
			}
			return
		}
		for i := range events[:n] {
			e.hostEvent(&events[i])
		}
	}
}

// hostEvent hands a host socket's event to its connection.
func (e *Engine) hostEvent(ev *unix.EpollEvent) {
	e.mu.RLock()
	id := epoll.Key(ev)
	c := e.byID[id]
	e.mu.RUnlock()
	if c != nil {
		c.mu.Lock()
		if c.id == id { // else c has become another connection since
			c.hostEvent(ev.Events)
		}
		c.mu.Unlock()
	}
}

// loop is the poller when the engine reads the link too (Config.Link): it
// sleeps in epoll_wait until the TAP or a host socket is ready, or until
// the oldest ACK held is due; with Link.BusyPoll it polls first while no
// other thread wants a CPU (demand, which it closes).
func (e *Engine) loop(demand cpuDemand) {
	defer e.wg.Done()
	link := e.cfg.Link
	linkOpen := true
	done := func() {}
	if link.Done != nil {
		done = sync.OnceFunc(link.Done)
	}
	defer done()
	events := make([]unix.EpollEvent, 128)
	streak := 0 // loop turns in a row that found the link ready
	bp := busyPoll{max: link.BusyPoll}
	defer demand.close()
	p := pace{quiet: true}
	for {
		p.yield()
		n, err := 0, error(nil)
		if w := bp.window(); w > 0 && !demand.saturated(time.Now()) {
			n, err = e.spin(events, w, &bp)
		}
		if err == nil && n == 0 {
			n, err = e.sleep(events, &p, &bp)
		}
		if err != nil {
			if !errors.Is(err, epoll.ErrClosed) {
				e.log.Error("the TCP fast path's poller failed; the sandbox's network stalls", "err", err)
			}
			return
		}
		linkReady := false
		for i := range events[:n] {
			ev := &events[i]
			switch k := epoll.Key(ev); {
			case k == linkKey:
				linkReady = true
			case k >= flowBase:
				e.receiveFlow(k - flowBase)
			default:
				e.hostEvent(ev)
			}
		}
		if linkReady && linkOpen {
			// A lone frame (a request, its ACK) is read alone, so that
			// no read is made in vain; frames that keep coming (a bulk
			// upload, a flood) are read in growing bursts.
			e.pumping = true
			_, err := link.Pump(min(1<<min(streak, 16), maxPump))
			e.pumping = false
			e.acks.endBurst()
			if err != nil {
				linkOpen = false
				e.set.Delete(link.FD)
				done()
			}
			streak++
		} else {
			streak = 0
		}
		e.acks.fire(time.Now())
	}
}

// quietAfter is how long the event loop waits on its P (epoll.WaitBrief)
// before it goes quiet and sleeps in Go's poller (epoll.Sleep), where it
// costs nothing at rest; and two wake-ups closer than this in the poller
// bring it back. On its P the loop wakes straight into the next event and
// makes no call the scheduler hears of, but a P that is not idle keeps
// the runtime's monitor ticking, every 20 µs at first; in the poller the
// wake-up comes through the poller's thread. So traffic that keeps coming
// (round trips, a transfer, a server that answers within milliseconds)
// is handled on the P, and lone frames (a sandbox at rest: neighbour
// discovery, a keepalive) in the poller. Measured on this 2-CPU VM:
// sleeping always on its P, an empty sandbox's network process woke
// 464-558 times in 20 s, against 111-130 for the goroutine readers; with
// the two sleeps, 222-261 (docs/design.md, "The loop at rest").
const quietAfter = epoll.MaxBrief

// pace is where the event loop sleeps: on its P or, once quiet, in Go's
// poller.
type pace struct {
	quiet     bool
	lastWake  time.Time // the last wake-up from the poller
	scheduled time.Time // when the loop last went through the scheduler
}

// yieldEvery is how long the loop keeps its P before it goes through the
// scheduler of its own accord: the runtime's monitor preempts a goroutine
// that has run 10 ms without, with a signal that lands in the middle of
// whatever the loop is doing (a round trip of every 100 or so, at 80 µs a
// round trip). A yield costs a trip through the scheduler, which runs
// any goroutine waiting for the P first. Measured (4 alternating runs of
// 40,000 round trips, MTU 65520): p99 146-206 µs with it, 163-220 without.
const yieldEvery = 5 * time.Millisecond

// yield goes through the scheduler when the loop has kept its P for
// yieldEvery: on every turn of the loop, so that one that never sleeps
// (busy polling that keeps finding events) yields too.
func (p *pace) yield() {
	if now := time.Now(); now.Sub(p.scheduled) >= yieldEvery {
		runtime.Gosched()
		p.scheduled = now
	}
}

// sleep waits for the next event: in Go's poller while the loop is quiet
// and no ACK is held; else on the loop's P until the oldest ACK held is
// due or for quietAfter, after which, if nothing came, the loop is quiet.
func (e *Engine) sleep(events []unix.EpollEvent, p *pace, bp *busyPoll) (int, error) {
	start := time.Now()
	due := e.acks.wait(start)
	if p.quiet && due < 0 {
		n, err := e.set.Sleep(events)
		now := time.Now()
		p.scheduled = now
		if n > 0 {
			if now.Sub(p.lastWake) < quietAfter {
				p.quiet = false
			}
			p.lastWake = now
		}
		return n, err
	}
	w := quietAfter
	if due >= 0 {
		w = min(due, quietAfter)
	}
	n, err := e.set.WaitBrief(events, w)
	switch {
	case n > 0 && bp.max > 0:
		now := time.Now()
		bp.slept(now.Sub(start), now)
	case n == 0 && err == nil && due < 0 && time.Since(start) >= quietAfter:
		p.quiet = true
		bp.quiet()
	}
	return n, err
}

// AttachFlows makes the event loop the reader of another owner's sockets
// (the UDP NAT's flows): receive runs on the loop's thread, with a flow's
// id, whenever that flow's socket, put in the loop's epoll set by
// WatchFlow, is readable (level-triggered: until receive has read what
// makes it so), until the socket is closed. The host's answers are then
// read by the thread that also reads the TAP, in the same wait, without a
// goroutine being woken or a second epoll set being asked. One owner;
// ErrNoLoop without Config.Link.
func (e *Engine) AttachFlows(receive func(id uint32)) error {
	if e.cfg.Link == nil {
		return ErrNoLoop
	}
	if !e.flowRecv.CompareAndSwap(nil, &receive) {
		return errors.New("TCP fast path: the event loop reads another owner's flows already")
	}
	return nil
}

// WatchFlow puts fd into the event loop's epoll set as the flow id (below
// MaxFlowID), after AttachFlows. Closing fd takes it out.
func (e *Engine) WatchFlow(fd int, id uint32) error {
	if id >= MaxFlowID {
		return fmt.Errorf("TCP fast path: flow id %d out of range", id)
	}
	// Under the lock, as a connection's register: Close does not close
	// the set (and its number go to another file) under the Add.
	e.mu.RLock()
	defer e.mu.RUnlock()
	switch {
	case e.flowRecv.Load() == nil:
		return errors.New("TCP fast path: WatchFlow before AttachFlows")
	case e.state != 1:
		return epoll.ErrClosed
	}
	if err := e.set.Add(fd, unix.EPOLLIN, flowBase+id); err != nil {
		return fmt.Errorf("TCP fast path: watch a flow's socket from the event loop: %w", err)
	}
	return nil
}

// receiveFlow runs AttachFlows's receive for the flow id: once per
// answer from the host, without the engine's lock (the function is set
// once, before any flow is watched).
func (e *Engine) receiveFlow(id uint32) {
	if fn := e.flowRecv.Load(); fn != nil {
		(*fn)(id)
	}
}

// heldACKs are the ACKs held (see ackDelay) when the event loop sends
// them, in the order they fall due (the delay is the same for all).
// Round trips keep the queue from ever emptying (an entry stays until it
// is due or reaches the front, whether or not an answer carried its ACK),
// so it slides along its array and moves back to the front when it
// reaches the end, rather than growing a new array (one allocation every
// few round trips, before).
type heldACKs struct {
	mu    sync.Mutex
	q     []heldACK // q[head:] are held, or were
	head  int
	burst []heldACK // held until the end of the loop's read burst (holdBurst); the loop's goroutine only
}

type heldACK struct {
	c   *conn
	gen uint64 // c.ackHeld while this ACK is held
	due time.Time
}

// live says whether a's ACK is still held: no segment has carried it.
func (a *heldACK) live() bool { return a.c.ackHeld.Load() == a.gen }

// hold notes c's ACK, due after ackDelay. c.mu is held.
func (h *heldACKs) hold(c *conn) {
	gen := c.markHeld()
	h.mu.Lock()
	if h.head > 0 && len(h.q) == cap(h.q) {
		n := copy(h.q, h.q[h.head:])
		clear(h.q[n:])
		h.q, h.head = h.q[:n], 0
	}
	h.q = append(h.q, heldACK{c, gen, time.Now().Add(ackDelay)})
	h.mu.Unlock()
}

// holdBurst holds c's ACK of in-order data until the loop has read the
// frames ready on the link (endBurst) or the connection's next segment
// comes, whichever is first: one ACK for two segments of a bulk upload, as
// the sandbox's own kernel acknowledges, rather than one per segment.
// c.mu is held.
func (h *heldACKs) holdBurst(c *conn) {
	h.burst = append(h.burst, heldACK{c: c, gen: c.markHeld()})
}

// endBurst sends the ACKs holdBurst held that no segment carried since.
func (h *heldACKs) endBurst() {
	for i := range h.burst {
		a := &h.burst[i]
		a.c.mu.Lock()
		if a.live() {
			a.c.sendHeldACK()
		}
		a.c.mu.Unlock()
	}
	clear(h.burst)
	h.burst = h.burst[:0]
}

// wait is how long the loop may sleep before the next ACK still held is
// due; -1 for no limit. It forgets the entries at the front whose ACK a
// segment has carried: a sleep bounded by one of them would end for
// nothing, and a bounded sleep costs more than an unbounded one even when
// it is not cut short (see ackDelay).
func (h *heldACKs) wait(now time.Time) time.Duration {
	h.mu.Lock()
	defer h.mu.Unlock()
	for h.head < len(h.q) && !h.q[h.head].live() {
		h.pop()
	}
	if h.head == len(h.q) {
		return -1
	}
	return max(h.q[h.head].due.Sub(now), 0)
}

// pop forgets the front entry. h.mu is held.
func (h *heldACKs) pop() {
	h.q[h.head] = heldACK{}
	if h.head++; h.head == len(h.q) {
		h.q, h.head = h.q[:0], 0
	}
}

// fire sends the ACKs due by now that no segment carried since.
func (h *heldACKs) fire(now time.Time) {
	for {
		h.mu.Lock()
		if h.head == len(h.q) || h.q[h.head].due.After(now) {
			h.mu.Unlock()
			return
		}
		a := h.q[h.head]
		h.pop()
		h.mu.Unlock()
		a.c.mu.Lock()
		if a.live() {
			a.c.sendHeldACK()
		}
		a.c.mu.Unlock()
	}
}

// connList is a list of connections, oldest first (the half-open ones).
type connList struct {
	head, tail *conn
	n          int
}

func (l *connList) push(c *conn) {
	c.prev, c.next = l.tail, nil
	if l.tail != nil {
		l.tail.next = c
	} else {
		l.head = c
	}
	l.tail = c
	c.listed = true
	l.n++
}

func (l *connList) remove(c *conn) {
	if !c.listed {
		return
	}
	if c.prev != nil {
		c.prev.next = c.next
	} else {
		l.head = c.next
	}
	if c.next != nil {
		c.next.prev = c.prev
	} else {
		l.tail = c.prev
	}
	c.prev, c.next, c.listed = nil, nil, false
	l.n--
}

// Describe says, one line a connection, where each connection's sequence
// numbers, window, queue and timers stand: for a person diagnosing a
// connection that does not move.
func (e *Engine) Describe() string {
	e.mu.RLock()
	all := make([]*conn, 0, len(e.conns))
	for _, c := range e.conns {
		all = append(all, c)
	}
	e.mu.RUnlock()
	var b strings.Builder
	for _, c := range all {
		c.mu.Lock()
		progress := "never"
		if !c.lastProgress.IsZero() {
			progress = time.Since(c.lastProgress).Round(time.Millisecond).String() + " ago"
		}
		fmt.Fprintf(&b, "%v -> %v: %s fd %d; from the sandbox: rcvNxt %d wrNxt -%d rcvRight +%d queued %d in %d chunks finRcvd %t wndSmall %t lastWnd %d roomEst %d sndbuf %d ackDue %t; to the sandbox: sndUna %d sndNxt +%d sndMax +%d sndWnd %d rdSeq -%d readable %t rdhup %t hostEOF %t finSeq +%d dupAcks %d inRecovery %t backoff %d timerOn %t; last progress %s\n",
			c.k.src, c.k.dst, stateNames[c.state], c.fd,
			c.rcvNxt, c.rcvNxt-c.wrNxt, c.rcvRight-c.rcvNxt, c.queued, len(c.queue), c.finRcvd, c.wndSmall, c.lastWnd, c.roomEst, c.sndbuf, c.ackIsHeld(),
			c.sndUna, c.sndNxt-c.sndUna, c.sndMax-c.sndUna, c.sndWnd, c.sndUna-c.rdSeq, c.hostReadable, c.rdhup, c.hostEOF, c.finSeq-c.sndUna,
			c.dupAcks, c.inRecovery, c.backoff, c.timerOn, progress)
		for _, k := range c.queue {
			fmt.Fprintf(&b, "\tchunk %+d..%+d fin %t\n", int32(k.seq-c.rcvNxt), int32(k.end()-c.rcvNxt), k.fin)
		}
		c.mu.Unlock()
	}
	return b.String()
}
