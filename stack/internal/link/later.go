package link

import (
	"sync"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// Frames the endpoint writes later rather than at once, from a writer
// goroutine of its own:
//
//   - gVisor's TCP acknowledges every segment it receives at once: in a
//     request/response exchange, the ACK of the request goes to the
//     sandbox on its own, a few microseconds before the response that
//     would have carried it. Each such frame costs as much as the response
//     (a TAP write, and the sandbox's kernel handling it inside that
//     write: about 11 µs of our CPU per round trip here, 16% of gonetns's
//     CPU in a 1-byte request/response loop, measured with --cpuprofile).
//     So a pure ACK of a flow that is taking turns (the last segment we
//     sent on it carried data: we answered, now it asks) is held for
//     ackDelay and dropped if the response carrying a newer
//     acknowledgement goes out first, as a delayed ACK in the kernel.
//     Duplicate ACKs and window updates (which do not move the
//     acknowledgement forward) and the ACKs of a bulk transfer (we send
//     nothing but ACKs) go out at once, so fast retransmit and the
//     sender's pace are as before.
//   - a SYN-ACK is written by gVisor while it holds the new endpoint's
//     lock. The sandbox's kernel answers it within that very write; with
//     one scheduler P, if the write outlasts sysmon's 20 µs the P passes
//     to the reader, which hands the answer to gVisor's TCP processor, and
//     the processor spins on the held lock until it is preempted, 10 ms
//     later (one new connection in a few hundred took 11-17 ms in a
//     connect/echo/close loop). Written from the writer goroutine instead,
//     after the lock is released, the answer finds the endpoint free.

// ackDelay bounds how long a pure ACK waits for a response to carry it.
// The 1-byte request/response of the benchmark answers in 30-200 µs
// through the host's loopback here; a sender held back by Nagle waits at
// most this long for our ACK (the kernel's own delayed ACK is 40 ms).
const ackDelay = 500 * time.Microsecond

// maxTrackedFlows bounds the per-flow state; beyond it, new flows are not
// tracked and their ACKs go out at once, as without delaying. The bound is
// one of memory, not of speed: a flow costs its key (56 bytes), its state
// (64) and the map's share (~40), so at most ~2.6 MB; as many flows as
// nat's UDP table holds, and more TCP connections than the descriptor
// budget gives NAT at this machine's 20,000 open files.
const maxTrackedFlows = 16384

// flowKey is a TCP flow as this side sends it.
type flowKey struct {
	src, dst     tcpip.Address
	sport, dport uint16
}

// flowState is what is known of a flow from the segments we sent.
type flowState struct {
	lastAck  uint32 // the acknowledgement number last sent
	dataSent bool   // the last segment sent carried data (or a SYN)
	pending  *stack.PacketBuffer
	due      time.Time // when pending must go out
	seen     time.Time // last segment sent, for sweeping idle flows
}

// later holds the deferred frames. Its goroutine runs while the reader
// does.
type later struct {
	mu      sync.Mutex
	running bool // the writer goroutine runs: deferring is possible
	flows   map[flowKey]*flowState
	soon    []*stack.PacketBuffer // SYN-ACKs, written as soon as the writer runs
	nacks   int                   // delayed ACKs pending
	timer   *time.Timer
	armed   time.Time // when timer fires; zero when stopped
	kick    chan struct{}
	stop    chan struct{}
	now     func() time.Time
}

func (l *later) init() {
	l.flows = make(map[flowKey]*flowState)
	l.kick = make(chan struct{}, 1)
	l.stop = make(chan struct{})
	l.timer = time.NewTimer(time.Hour)
	l.timer.Stop()
	if l.now == nil {
		l.now = time.Now
	}
}

// tcpSegment describes an outgoing TCP segment; ok is false for anything
// else.
func tcpSegment(pkt *stack.PacketBuffer) (k flowKey, tcp header.TCP, ok bool) {
	if pkt.TransportProtocolNumber != header.TCPProtocolNumber {
		return k, nil, false
	}
	tcp = header.TCP(pkt.TransportHeader().Slice())
	if len(tcp) < header.TCPMinimumSize {
		return k, nil, false
	}
	nh := pkt.NetworkHeader().Slice()
	switch pkt.NetworkProtocolNumber {
	case header.IPv4ProtocolNumber:
		if len(nh) < header.IPv4MinimumSize {
			return k, nil, false
		}
		ip := header.IPv4(nh)
		k.src, k.dst = ip.SourceAddress(), ip.DestinationAddress()
	case header.IPv6ProtocolNumber:
		if len(nh) < header.IPv6MinimumSize {
			return k, nil, false
		}
		ip := header.IPv6(nh)
		k.src, k.dst = ip.SourceAddress(), ip.DestinationAddress()
	default:
		return k, nil, false
	}
	k.sport, k.dport = tcp.SourcePort(), tcp.DestinationPort()
	return k, tcp, true
}

// defer decides whether pkt is written later: it returns true when it
// kept a reference to pkt for the writer goroutine. A pending ACK that pkt
// makes stale is dropped.
func (l *later) deferWrite(pkt *stack.PacketBuffer) (deferred bool) {
	k, tcp, ok := tcpSegment(pkt)
	if !ok {
		return false
	}
	flags := tcp.Flags()
	payload := pkt.Data().Size()
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.running {
		return false
	}
	now := l.now()
	st := l.flows[k]
	if st != nil && st.pending != nil {
		// Every segment gVisor sends after the held ACK acknowledges at
		// least as much: the held one has nothing left to say.
		st.pending.DecRef()
		st.pending = nil
		l.nacks--
		if l.nacks == 0 && len(l.soon) == 0 {
			// Nothing left for the timer: a timer left armed woke the
			// parent 500 µs after every round trip for nothing, which
			// on an idle machine cost more than the ACK it saved.
			l.timer.Stop()
			l.armed = time.Time{}
		}
	}
	if len(l.soon) > 0 {
		// A SYN-ACK waits for the writer: what follows it goes after it.
		defer func() {
			if !deferred {
				l.soon = append(l.soon, pkt.IncRef())
				deferred = true
			}
		}()
	}
	switch {
	case flags&(header.TCPFlagRst|header.TCPFlagFin) != 0:
		delete(l.flows, k)
		return false
	case flags&header.TCPFlagSyn != 0:
		l.track(k, st, now, tcp.AckNumber(), true)
		if flags&header.TCPFlagAck != 0 {
			l.soon = append(l.soon, pkt.IncRef())
			l.signal()
			return true
		}
		return false
	case flags == header.TCPFlagAck && payload == 0:
		ack := tcp.AckNumber()
		if st != nil && st.dataSent && int32(ack-st.lastAck) > 0 {
			st.pending = pkt.IncRef()
			st.due = now.Add(ackDelay)
			st.lastAck, st.dataSent, st.seen = ack, false, now
			l.nacks++
			l.armLocked(st.due)
			return true
		}
		l.track(k, st, now, ack, false)
		return false
	default:
		l.track(k, st, now, tcp.AckNumber(), payload > 0)
		return false
	}
}

// track records the segment just sent on k.
func (l *later) track(k flowKey, st *flowState, now time.Time, ack uint32, data bool) {
	if st == nil {
		if !data {
			return // nothing to remember: its next ACK is not delayed anyway
		}
		if len(l.flows) >= maxTrackedFlows {
			l.sweepLocked(now)
			if len(l.flows) >= maxTrackedFlows {
				return
			}
		}
		st = &flowState{}
		l.flows[k] = st
	}
	st.lastAck, st.dataSent, st.seen = ack, data, now
}

// sweepLocked forgets flows that sent nothing for a while (closed by a
// reset from the sandbox, or idle).
func (l *later) sweepLocked(now time.Time) {
	for k, st := range l.flows {
		if st.pending == nil && now.Sub(st.seen) > time.Second {
			delete(l.flows, k)
		}
	}
}

func (l *later) signal() {
	select {
	case l.kick <- struct{}{}:
	default:
	}
}

// armLocked makes the timer fire by due at the latest.
func (l *later) armLocked(due time.Time) {
	if !l.armed.IsZero() && !l.armed.After(due) {
		return
	}
	l.armed = due
	l.timer.Reset(due.Sub(l.now()))
}

// takeDue removes and returns the frames to write now, and re-arms the
// timer for the ACKs that are not due yet.
func (l *later) takeDue(out []*stack.PacketBuffer) []*stack.PacketBuffer {
	l.mu.Lock()
	defer l.mu.Unlock()
	out = append(out, l.soon...)
	clear(l.soon)
	l.soon = l.soon[:0]
	l.armed = time.Time{}
	if l.nacks == 0 {
		return out
	}
	now := l.now()
	var next time.Time
	for _, st := range l.flows {
		if st.pending == nil {
			continue
		}
		if !st.due.After(now) {
			out = append(out, st.pending)
			st.pending = nil
			l.nacks--
			continue
		}
		if next.IsZero() || st.due.Before(next) {
			next = st.due
		}
	}
	if !next.IsZero() {
		l.armLocked(next)
	}
	return out
}

// run is the writer goroutine: it writes the deferred frames with write
// until stop is closed, then releases what is left.
func (l *later) run(write func(*stack.PacketBuffer) error) {
	var frames []*stack.PacketBuffer
	for {
		select {
		case <-l.stop:
			l.shutdown()
			return
		case <-l.kick:
		case <-l.timer.C:
		}
		frames = l.takeDue(frames[:0])
		for i, pkt := range frames {
			write(pkt) // a lost frame is a lost packet: TCP recovers
			pkt.DecRef()
			frames[i] = nil
		}
	}
}

// shutdown stops deferring and drops what is pending.
func (l *later) shutdown() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.running = false
	l.timer.Stop()
	for _, pkt := range l.soon {
		pkt.DecRef()
	}
	l.soon = nil
	for k, st := range l.flows {
		if st.pending != nil {
			st.pending.DecRef()
		}
		delete(l.flows, k)
	}
	l.nacks = 0
}
