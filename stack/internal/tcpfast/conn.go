package tcpfast

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/seqnum"

	"github.com/gonetns/gonetns/internal/rawconn"
)

// Connection states.
const (
	stConnecting  = iota // the host socket's connect is under way; no SYN-ACK yet
	stSynAcked           // SYN-ACK sent; waiting for the sandbox's ACK
	stEstablished        // data both ways
	stClosed
)

var stateNames = [...]string{stConnecting: "connecting", stSynAcked: "SYN-ACK sent", stEstablished: "established", stClosed: "closed"}

// The window scale the engine offers: a host socket's send buffer grows to
// 4 MiB by default (net.ipv4.tcp_wmem), which a scale of 7 expresses
// (65535 << 7 is 8 MiB).
const rcvWS = 7

// Retransmission timeout towards the sandbox. The link loses nothing
// unless the sandbox's kernel drops a frame (its backlog full), and then
// SACK and duplicate ACKs recover at once; the timeout is for the tail of a
// burst. It stays above the delay of a sandbox's delayed ACK (Linux waits
// up to 200 ms), which would otherwise resend every short answer. After
// maxBackoff timeouts in a row the sandbox is taken for gone.
const (
	rtoBase    = 300 * time.Millisecond
	rtoMax     = 10 * time.Second
	maxBackoff = 12
)

// ackDelay bounds how long a pure ACK waits for the host's answer to carry
// it. A connection taking turns (the last segment we sent carried data: we
// answered, now the sandbox asks) gets its ACK with the answer, as from
// the kernel's delayed ACK, instead of in a frame of its own, which costs
// as much as the answer (a TAP write and the sandbox's kernel handling it
// inside that write). The 1-byte request/response of the benchmark
// answers in 30-200 µs through the host's loopback here; a sender held
// back by Nagle waits at most this long for the ACK (the kernel's own
// delayed ACK is 40 ms; libslirp, behind slirp4netns, sends its delayed
// ACKs every 2 ms). A bulk transfer's ACKs (we send nothing but ACKs) go
// out once per two segments, or at the end of the event loop's read burst
// (heldACKs.holdBurst); duplicate ACKs and window updates at once.
//
// Why 2 ms and not less: the event loop sleeps in epoll_pwait2 until the
// oldest ACK held is due, and on this project's 2-CPU virtual machine a
// sleep bounded by 500 µs cost 4-5 µs more to start and 4-5 µs more to
// wake from than an unbounded one, while one bounded by 2 ms cost the
// same as unbounded (the loop's thread from being switched in to
// epoll_pwait2 returning, median of some 8,000 wakes each: 8-9 µs bounded
// by 500 µs, 4 µs by 2 ms or unbounded; 5 µs by 1 ms). A round trip
// sleeps twice; at 500 µs the event loop spent 47-52 µs of CPU per round
// trip, at 2 ms (with heldACKs.wait skipping the ACKs carried) 34-40 µs
// (docs/design.md, "Timers on the event loop").
const ackDelay = 2 * time.Millisecond

// synAckRTO is how long the fast path waits for the sandbox's ACK of its
// SYN-ACK before it sends the SYN-ACK again, then twice as long each
// time until the handshake's deadline: RFC 6298's first retransmission
// timeout, which the sandbox's kernel uses for its SYN too. Without it, a
// lost ACK of the handshake held a connection to a host that speaks first
// (SMTP, SSH, a download) half-open until the deadline, then reset it.
const synAckRTO = time.Second

// conn is one fast-path connection: the sandbox's TCP connection and the
// host socket it mirrors. All fields are guarded by mu.
//
// A closed conn is kept for the engine's next connection (Engine.spare):
// the fields before connState outlive the connection, connState is made
// afresh. Whoever took c out of a table or queue before locking c.mu may
// find it closed, or already another connection: the timers check gen,
// the poller's events id, the held ACKs ackHeld; the tables themselves
// are read and c reused only on the reader's goroutine (Handle).
type conn struct {
	e  *Engine
	mu sync.Mutex

	// gen counts the connections c has been: a timer entry taken for
	// one does not fire for the next.
	gen uint32
	// ackHeld names the ACK held (see ackDelay), 0 when none is: with
	// Config.Link, the heldACKs entry whose gen it is. Atomic: the event
	// loop reads it without c.mu to skip the entries of ACKs a segment
	// has carried since, so that it does not set its sleep by them
	// (heldACKs.wait). ackGen never goes back, across connections too.
	ackHeld atomic.Uint64
	ackGen  uint64 // the last gen given to an ACK of c's

	timerIdx [timerKinds]int32 // places in the engine's timers (guarded by their lock)
	qbuf     []chunk           // queue's array (length 0): queue is a part of it (queueSlot)

	connState
}

// connState is a conn's state for one connection.
type connState struct {
	id   uint32
	k    key
	ends ends
	done func()

	fd    int // -1 once closed
	state int

	prev, next *conn // in the engine's half-open list
	listed     bool

	timerOn  bool      // the retransmission timer is set
	deadline time.Time // of the handshake
	synFrame uint64    // Engine.frames at the SYN, then at the SYN-ACK (Engine.evict)
	synAt    int64     // and the time (timers.now)

	// The sandbox's data, towards the host socket.
	rcvNxt   uint32    // next sequence number expected: what is acknowledged
	wrNxt    uint32    // next sequence number for the host socket: bytes from wrNxt to rcvNxt wait in queue
	rcvRight uint32    // the right edge of the window advertised (never moves back)
	sndWSOK  bool      // window scaling is on (both offered it)
	queue    []chunk   // data not yet written to the host socket, by sequence: in order (acknowledged), then past a hole
	queued   int       // bytes in queue
	dsack    sackBlock // a duplicate received, reported once (RFC 2883); empty when none
	finRcvd  bool      // the sandbox's FIN is acknowledged: the host socket's writing is shut once the queue is written
	wndSmall bool      // the window advertised is small: waiting for EPOLLOUT to reopen it
	lastWnd  int       // the window last advertised, in bytes
	lastAck  uint32    // the acknowledgement last sent with it
	roomEst  int       // the host socket's send room as last read, less what was written since
	sndbuf   int       // the host socket's send buffer as last read
	lastData bool      // the last segment sent carried data: the sandbox's next data is likely a turn
	dataAt   int64     // when a segment with data or a FIN last came from the sandbox, or the window shut for want of room opened again (the timers' clock): Sending tells a sender from an idle end by it

	// The host's data, towards the sandbox.
	iss          uint32
	rdSeq        uint32 // the first byte still in the host socket's receive queue: sndUna, or the FIN's sequence number
	sndUna       uint32 // oldest byte not acknowledged by the sandbox
	sndNxt       uint32 // next byte to send
	sndMax       uint32 // highest sequence number sent
	sndWnd       uint32 // the sandbox's window, in bytes
	sndWS        uint8
	mss          int
	sackOK       bool
	tsOK         bool      // timestamps (RFC 7323) on: every segment carries one
	tsRecent     uint32    // the sandbox's timestamp to echo
	peekOff      bool      // the socket's SO_PEEK_OFF is on and tracks sndNxt
	hostReadable bool      // the socket may have bytes not sent yet
	rdhup        bool      // the host has shut its writing (FIN seen by the kernel)
	hostErr      error     // the host socket's error (its peer's reset): the sandbox gets it after the bytes before it
	resetAt      time.Time // a host reset waits until then: earlyResetHold after the handshake
	stalled      bool      // in-order bytes found no room in the queue while the host socket refuses bytes: the window is 0 until it takes them
	hostEOF      bool      // every byte up to finSeq is known: finSeq is the FIN's
	finSeq       uint32
	dupAcks      int
	inRecovery   bool
	recover      uint32
	backoff      int
	lastProgress time.Time

	iov [8][]byte // scratch for writes to the host socket
}

// chunk is sandbox data kept until the host socket takes it.
type chunk struct {
	seq  uint32
	data []byte
	buf  chunkHandle // where data's buffer goes back to
	fin  bool        // the FIN follows the data
}

func (k *chunk) end() uint32 { return k.seq + uint32(len(k.data)) }

// newConn makes the connection for the SYN s, over the host socket h: in
// a spare conn (Engine.spare) when there is one.
func (e *Engine) newConn(s *segment, h Host) *conn {
	var r [4]byte
	rand.Read(r[:])
	iss := binary.BigEndian.Uint32(r[:])
	st := connState{
		k:    key{s.src, s.dst},
		ends: ends{v6: s.v6, local: s.dst, remote: s.src, mac: e.cfg.MAC, remoteMAC: e.remoteMAC(s)},
		done: h.Done,
		fd:   h.FD,

		rcvNxt:   s.seq + 1,
		wrNxt:    s.seq + 1,
		rcvRight: s.seq + 1,
		iss:      iss,
		sndUna:   iss,
		sndNxt:   iss + 1,
		sndMax:   iss + 1,
		sndWnd:   uint32(s.wnd),
		sackOK:   s.sackOK,
		tsOK:     s.ts,
		tsRecent: s.tsVal,
		deadline: time.Now().Add(h.ConnectTimeout),
		synFrame: e.frames.Load(),
		synAt:    e.timers.now(),
	}
	if s.ws >= 0 {
		st.sndWSOK = true
		st.sndWS = uint8(s.ws)
	}
	mss := e.mss4
	if s.v6 {
		mss = e.mss6
	}
	st.mss = mss
	if s.mss != 0 {
		st.mss = min(mss, int(s.mss))
	}
	// Down to Linux's floor (tcp_min_snd_mss): a sandbox whose route to a
	// namespace inside it has a link of MTU 552 asks for 512, and larger
	// segments could not be forwarded there (the floor was 536: such a
	// download stalled).
	st.mss = max(st.mss, minSndMSS)
	c := e.takeSpare()
	if c == nil {
		c = &conn{e: e}
	}
	c.mu.Lock()
	c.gen++
	c.connState = st
	c.mu.Unlock()
	return c
}

// maxSpare is how many closed conns the engine keeps for its next
// connections. A conn is the only thing a new connection allocated (704
// bytes); in the soak (scripts/soak.sh) conns were 25,575 of the 32,744
// objects and 19.6 of the 27.4 MB the network process allocated in 3
// minutes, and with GOGC at 25 they set the pace of its collections. A
// few are enough: connections come and go one after the other even at
// thousands a second; a burst of many open at once takes new ones past
// these. ReleaseMemory lets them go.
const maxSpare = 64

// takeSpare takes a closed conn to use again, nil when none is kept.
func (e *Engine) takeSpare() *conn {
	e.mu.Lock()
	defer e.mu.Unlock()
	n := len(e.spare)
	if n == 0 {
		return nil
	}
	c := e.spare[n-1]
	e.spare[n-1] = nil
	e.spare = e.spare[:n-1]
	return c
}

// register enters c in the engine's tables and its socket in the poller;
// false (with c closed) if the engine is closed.
func (c *conn) register() bool {
	e := c.e
	c.mu.Lock()
	defer c.mu.Unlock()
	oobInline(c.fd)
	// Until the sandbox's FIN (takeFIN), the stream the host reads is
	// unfinished: should the network process die (SIGKILL, a crash), its
	// kernel ends the connection with a reset, not with the FIN that
	// would tell the host the stream was whole (killed during the wait
	// at exit, the host read 4,291,584 of 8,908,612 bytes and a clean
	// end). Two system calls per connection.
	resetOnClose(c.fd, true)
	c.peekOff = e.peekOff.Load() >= 0 && enablePeekOff(c.fd)
	if !c.peekOff && e.peekOff.Load() == 0 {
		e.peekOff.Store(-1)
		e.log.Info("the kernel has no SO_PEEK_OFF for TCP (Linux 6.10 and later have it): the TCP fast path reads past what it already sent at each peek")
	}
	e.mu.Lock()
	if e.state != 1 {
		e.mu.Unlock()
		unix.Close(c.fd)
		c.fd = -1
		if c.done != nil {
			c.done()
			c.done = nil
		}
		return false
	}
	for {
		e.nextID++
		if e.nextID >= flowBase {
			e.nextID = 0
			continue
		}
		if _, taken := e.byID[e.nextID]; !taken {
			break
		}
	}
	c.id = e.nextID
	e.conns[c.k] = c
	e.byID[c.id] = c
	e.mostConn = max(e.mostConn, len(e.conns))
	e.halfOpen.push(c)
	e.peakHalf = max(e.peakHalf, e.halfOpen.n)
	e.mu.Unlock()

	// Edge-triggered: an event says something new happened (connected,
	// bytes arrived, room freed after the socket refused a write); the
	// bytes already sent stay in the queue without waking anyone.
	if err := e.set.Add(c.fd, unix.EPOLLIN|unix.EPOLLOUT|unix.EPOLLRDHUP|unix.EPOLLET, c.id); err != nil {
		e.log.Warn("TCP fast path: cannot watch a host socket; resetting the connection", "err", err)
		c.reset(nil)
		return false
	}
	c.timerOn = true
	e.timers.set(c, timerRetransmit, time.Until(c.deadline))
	return true
}

// arm makes the timer fire in d, unless it is set already.
func (c *conn) arm(d time.Duration) {
	if c.timerOn || c.state == stClosed {
		return
	}
	c.timerOn = true
	c.e.timers.set(c, timerRetransmit, d)
}

// disarm stops the timer.
func (c *conn) disarm() {
	if c.timerOn {
		c.e.timers.stop(c, timerRetransmit)
		c.timerOn = false
	}
}

// hostEvent handles the poller's events for the host socket.
func (c *conn) hostEvent(ev uint32) {
	switch c.state {
	case stClosed:
		return
	case stConnecting:
		if ev&(unix.EPOLLOUT|unix.EPOLLERR|unix.EPOLLHUP) == 0 {
			return
		}
		c.connectDone(ev&(unix.EPOLLERR|unix.EPOLLHUP) != 0)
		if c.state == stClosed {
			return
		}
		// The event that says the connect is done may also say that
		// the host has spoken (a server that greets at once: SSH,
		// SMTP, MySQL). Edge-triggered, it is not said again: note it
		// for when the handshake completes.
	}
	if ev&unix.EPOLLERR != 0 {
		if err := socketError(c.fd); err != nil {
			// What the host sent before its reset is still in the
			// socket's queue, ahead of the error, as its kernel would
			// deliver it to a local reader: a server that answers and
			// closes with the request unread (an HTTP server refusing
			// an upload) resets right after its answer, and one that
			// turns a client away greets and resets at once (MySQL's
			// "too many connections"). The sandbox gets those bytes,
			// as its window takes them, then the reset (push).
			c.hostErr = err
			c.hostReadable = true
		}
	}
	if ev&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP) != 0 {
		c.hostReadable = true
		if ev&(unix.EPOLLRDHUP|unix.EPOLLHUP) != 0 {
			c.rdhup = true
		}
	}
	if c.state != stEstablished {
		return // the host spoke first: its bytes wait for the handshake
	}
	t := c.e.txPool.Get().(*tx)
	defer c.e.txPool.Put(t)
	ack := false
	if ev&unix.EPOLLOUT != 0 {
		if len(c.queue) > 0 && c.flush() {
			ack = true
		}
		if c.state == stClosed {
			return
		}
		if c.wndSmall {
			// The socket has room again: tell the sandbox (room
			// re-arms the poller if it is still short).
			c.wndSmall = false
			c.roomEst = 0
			c.reopened()
			ack = true
		}
	}
	sent := c.push(t)
	if ack && !sent && c.state == stEstablished && c.updateDue() {
		c.sendACK(t)
	}
	c.maybeFinish()
}

// connectDone finishes the host side's connect: the sandbox gets its
// SYN-ACK, or a reset if the connect failed. The poll that said it is
// done also says how: a socket that connected is writable (and readable
// if the host spoke first), one that failed has an error or is hung up;
// only then is the socket asked for its error, for the log (a getsockopt
// less per connection).
func (c *conn) connectDone(failed bool) {
	var err error
	if failed {
		err = socketError(c.fd)
		if err == nil || errors.Is(err, unix.ECONNRESET) {
			// Connected, then reset by the host at once (its greeting,
			// if it sent one, waits in the socket): the sandbox's
			// connect succeeds, then it reads what came and the reset,
			// as a local client would, rather than "refused".
			c.hostErr = unix.ECONNRESET
			c.hostReadable = true
			failed = false
		}
	}
	if failed {
		c.e.refused.Add(1)
		if c.e.log.Enabled(context.Background(), slog.LevelDebug) {
			c.e.log.Debug("tcp fast path: connect failed; resetting", "src", c.k.src, "dst", c.k.dst, "err", err)
		}
		c.reset(nil)
		return
	}
	c.state = stSynAcked
	c.synFrame, c.synAt = c.e.frames.Load(), c.e.timers.now() // its ACK follows in the link's queue from here
	c.deadline = time.Now().Add(c.e.cfg.HandshakeTimeout)
	c.disarm()
	c.arm(min(synAckRTO, c.e.cfg.HandshakeTimeout))
	t := c.e.txPool.Get().(*tx)
	c.sendSynAck(t)
	c.e.txPool.Put(t)
}

func (c *conn) sendSynAck(t *tx) {
	o := t.opts[:0]
	o = o[:4]
	header.EncodeMSSOption(uint32(c.mss4or6()), o)
	if c.sndWSOK {
		o = append(o, header.TCPOptionNOP, header.TCPOptionWS, 3, rcvWS)
	}
	if c.sackOK {
		o = append(o, header.TCPOptionNOP, header.TCPOptionNOP, header.TCPOptionSACKPermitted, 2)
	}
	if c.tsOK {
		o = c.e.appendTS(o, c.tsRecent)
	}
	room := max(c.room(true), 0)
	f := fields{flags: flagSYN | flagACK, seq: c.iss, ack: c.rcvNxt, wnd: uint16(min(room, 65535)), opts: o}
	c.rcvRight = c.rcvNxt + uint32(min(room, 65535))
	c.e.write(t, &c.ends, f, nil, c.mss)
}

// mss4or6 is the MSS the engine offers for this connection's family.
func (c *conn) mss4or6() int {
	if c.ends.v6 {
		return c.e.mss6
	}
	return c.e.mss4
}

// input handles a segment from the sandbox.
func (c *conn) input(s *segment) {
	switch c.state {
	case stClosed:
		return
	case stConnecting:
		if s.has(flagRST) {
			c.close(true)
		}
		return // a SYN sent again: the SYN-ACK follows the host's connect
	case stSynAcked:
		if s.has(flagRST) {
			if s.seq == c.rcvNxt {
				c.close(true)
			}
			return
		}
		if s.has(flagSYN) {
			if !s.has(flagACK) && s.seq+1 == c.rcvNxt {
				t := c.e.txPool.Get().(*tx)
				c.sendSynAck(t) // ours was lost
				c.e.txPool.Put(t)
			}
			return
		}
		if !s.has(flagACK) {
			return
		}
		if s.ack != c.iss+1 {
			c.e.resetFor(s)
			return
		}
		c.established()
	}

	t := c.e.txPool.Get().(*tx)
	defer c.e.txPool.Put(t)
	if s.has(flagRST) {
		// RFC 5961, 3.2, as Linux: a reset at the next sequence number
		// ends the connection; one elsewhere in the window gets a
		// challenge ACK, which the sandbox's kernel answers with a
		// reset at the number it acknowledges, if it has indeed lost
		// the connection. Any reset in the window used to end it: one
		// frame with a guessed number reset a live connection.
		switch {
		case s.seq == c.rcvNxt:
			c.close(true)
		case seqLT(c.rcvNxt, s.seq) && seqLEQ(s.seq, c.rcvRight):
			c.sendACK(t)
		}
		return
	}
	if s.has(flagSYN) || !s.has(flagACK) {
		c.sendACK(t) // a challenge: the sandbox resets if it lost this connection
		return
	}
	if c.probe(s) {
		c.sendACK(t)
		return
	}
	if s.ts && c.tsOK && seqLEQ(s.seq, c.rcvNxt) && !seqLT(s.tsVal, c.tsRecent) {
		c.tsRecent = s.tsVal // RFC 7323, 4.3
	}
	if !c.ackIn(s, t) {
		return
	}
	// In order, with nothing queued before it: a segment that fills a
	// hole is acknowledged at once, as the sender is in recovery.
	needAck, inOrder := false, s.seq == c.rcvNxt && len(c.queue) == 0
	if s.payloadLen > 0 || s.has(flagFIN) {
		needAck = c.dataIn(s)
		if c.state == stClosed {
			return
		}
	}
	if err := c.consumeAcked(); err != nil {
		c.reset(err)
		return
	}
	sent := c.push(t)
	if needAck && !sent && c.state == stEstablished {
		plain := s.payloadLen > 0 && !s.has(flagFIN) && len(c.queue) == 0 && !c.wndSmall
		switch {
		case plain && c.lastData:
			c.holdACK()
		case plain && inOrder && c.e.pumping && !c.ackIsHeld():
			c.e.acks.holdBurst(c)
		case s.has(flagFIN) && inOrder && c.finRcvd && !c.hostEOF && !c.wndSmall:
			// The sandbox is done sending; the host's FIN, or its
			// last answer, is likely to follow at once (a client
			// that closes first, its server closing when it reads
			// the end): it carries the ACK, as Linux delays the ACK
			// of a FIN that finds its socket open. One TAP write
			// less per connection.
			c.holdACK()
		default:
			c.sendACK(t)
		}
	}
	c.maybeFinish()
}

// probe reports whether s is a segment without data that falls outside
// the window, which is answered with an ACK and otherwise ignored (RFC
// 9293, 3.10.7.4). The sandbox's kernel sends such a segment, one below
// what it knows was received, as a keepalive probe of an idle connection
// and as its probe of a zero window; left unanswered, it takes the
// connection for dead after its keepalive probes (a program that sets
// TCP_KEEPIDLE, and Go's dialer by default) and after its zero-window
// probes (a host server that stops reading for minutes), and ends it.
// The right edge itself is in the window, as Linux takes it: a pure ACK
// sent after data that filled the window, which the engine could not
// keep, still carries its acknowledgement.
func (c *conn) probe(s *segment) bool {
	if s.payloadLen > 0 || s.has(flagFIN) {
		return false
	}
	return seqLT(s.seq, c.rcvNxt) || seqLT(c.rcvRight, s.seq)
}

// refusedHeld reports whether the queue holds in-order bytes, the next the
// host socket is to take: bytes it refused.
func (c *conn) refusedHeld() bool {
	return len(c.queue) > 0 && !seqLT(c.wrNxt, c.queue[0].seq)
}

// holdACK delays the ACK due (see ackDelay).
func (c *conn) holdACK() {
	if c.ackIsHeld() {
		return
	}
	if c.e.cfg.Link != nil {
		c.e.acks.hold(c) // the event loop sends it
		return
	}
	c.markHeld()
	c.e.timers.set(c, timerAck, ackDelay)
}

// markHeld notes that an ACK is held, under a gen of its own. c.mu is held.
func (c *conn) markHeld() uint64 {
	c.ackGen++
	c.ackHeld.Store(c.ackGen)
	return c.ackGen
}

// ackIsHeld reports whether an ACK is held. c.mu is held.
func (c *conn) ackIsHeld() bool { return c.ackHeld.Load() != 0 }

// sendHeldACK sends the ACK held, if it is still due.
func (c *conn) sendHeldACK() {
	if c.ackIsHeld() && c.state == stEstablished {
		t := c.e.txPool.Get().(*tx)
		c.sendACK(t)
		c.e.txPool.Put(t)
	}
}

// consumeAcked drops the acknowledged bytes from the host socket. input
// calls it once what the segment carried has gone to the host, so that a
// round trip's request does not wait behind this syscall (a resend
// before it reckons from rdSeq), and before the next push, whose peek
// without SO_PEEK_OFF would copy the bytes again, and before a close,
// which would turn unread bytes into a reset. Later than that, they pin
// the kernel's buffers: a host socket's
// receive memory is counted per buffer, a 64 KiB segment of the host's
// stays whole until its last byte is read, and peeking does not grow the
// buffer as reading does, so a few hundred acknowledged bytes left in two
// such segments fill the default 128 KiB; the socket's window closes,
// the host stops sending, the sandbox has nothing more to acknowledge,
// and the connection waits for good (seen when dropping them in 8 KiB
// batches: the host's sender rwnd_limited 100%, our Recv-Q 5320).
func (c *conn) consumeAcked() error {
	end := c.sndUna
	if c.hostEOF && seqLT(c.finSeq, end) {
		end = c.finSeq // the FIN is no byte of the queue
	}
	if !seqLT(c.rdSeq, end) {
		return nil
	}
	// Dropping bytes moves the kernel's peek offset back by as many, but
	// not below zero, which is where it belongs after an ACK past a
	// resend.
	if err := consume(c.fd, end-c.rdSeq); err != nil {
		return err
	}
	c.rdSeq = end
	return nil
}

// established completes the handshake.
func (c *conn) established() {
	c.state = stEstablished
	c.backoff = 0
	c.sndUna = c.iss + 1 // the SYN is acknowledged
	c.rdSeq = c.sndUna
	c.disarm()
	c.resetAt = time.Now().Add(earlyResetHold)
	c.e.mu.Lock()
	c.e.halfOpen.remove(c)
	c.e.mu.Unlock()
}

// earlyResetHold is how soon after the handshake a host's reset may reach
// the sandbox. Dialling first, the engine completes the sandbox's
// handshake only once the host has accepted, and a server that turns a
// client away (MySQL's "too many connections", "421 too busy") greets and
// resets by then or just after: sent at once, the reset reached the
// sandbox's kernel before its program returned from connect, which then
// failed with ECONNRESET, where a local client's connect succeeds and its
// read gets the greeting, then the reset (a blocking connect against a
// server that accepts, greets and resets, 30 tries: 2-10 failed in the
// sandbox, none on the host). Across a network the reset comes a round
// trip after the handshake at least. 2 ms did as well as 10 (50 tries,
// 3 runs each, and 2 with both CPUs kept busy: no connect failed), and a
// client that a server resets at once waits that long per connection
// (with 10 ms, a probe's 4 clients made 333 such connections a second,
// against 3,800 on the netstack path).
const earlyResetHold = 2 * time.Millisecond

// holdReset reports whether the host's reset is to wait (resetAt), and
// sets the timer for it.
func (c *conn) holdReset() bool {
	d := time.Until(c.resetAt)
	if d <= 0 {
		return false
	}
	c.arm(d)
	return true
}

// ackIn processes the acknowledgement and window of s; false if s is to
// be dropped.
func (c *conn) ackIn(s *segment, t *tx) bool {
	ack := s.ack
	if seqLT(c.sndMax, ack) {
		c.sendACK(t) // acknowledges what was never sent
		return false
	}
	wnd := uint32(s.wnd)
	if c.sndWSOK {
		wnd <<= c.sndWS
	}
	if seqLT(ack, c.sndUna) {
		return true // an old ACK: its window is stale too
	}
	if ack == c.sndUna {
		if s.payloadLen == 0 && !s.has(flagFIN) && wnd == c.sndWnd && c.sndUna != c.sndMax {
			c.dupAcks++
			if c.dupAcks == 3 {
				c.fastRetransmit(s, t)
			}
		}
		c.sndWnd = wnd
		return true
	}
	// New data acknowledged: it leaves the host socket.
	c.sndUna = ack
	c.sndWnd = wnd
	if seqLT(c.sndNxt, ack) {
		c.sndNxt = ack // past what a resend reached: those bytes arrived the first time
	}
	c.dupAcks = 0
	c.backoff = 0
	c.lastProgress = time.Now()
	if c.inRecovery {
		if seqLT(ack, c.recover) {
			c.retransmitHole(s, t) // a partial ACK: the next hole
		} else {
			c.inRecovery = false
		}
	}
	if c.sndUna == c.sndMax {
		c.disarm() // nothing in flight
	}
	return true
}

// dataIn takes the data (and FIN) of s; it reports whether an ACK is due.
func (c *conn) dataIn(s *segment) bool {
	seq := s.seq
	parts := s.payload
	n := s.payloadLen
	fin := s.has(flagFIN)
	if seqLT(seq, c.rcvNxt) {
		skip := int(c.rcvNxt - seq)
		if skip > n || (skip == n && !fin) {
			// All old: the sandbox missed an ACK, or sent again what
			// arrived late. A D-SACK tells it so, and a sender that
			// took reordering for loss undoes its recovery.
			if n > 0 {
				c.dsack = sackBlock{seq, seq + uint32(n)}
			}
			return true
		}
		parts = trimParts(parts, skip)
		n -= skip
		seq = c.rcvNxt
	}
	if c.finRcvd {
		return true
	}
	// The window bounds the data (a FIN needs none): keep what fits,
	// answer the rest (a probe of a zero window, a sandbox that ignores
	// the window) with an ACK that says the window again.
	if avail := int32(c.rcvRight - seq); int(max(avail, 0)) < n {
		n = int(max(avail, 0))
		parts = truncParts(parts, n)
		fin = false
		c.e.dropped.Add(1)
		if n == 0 {
			return true
		}
	}
	if seq != c.rcvNxt || len(c.queue) > 0 {
		inOrder := seq == c.rcvNxt
		c.hold(seq, parts, n, fin)
		if inOrder {
			c.flush()
		}
		return true
	}
	// In order with nothing queued: straight to the host socket.
	if n > 0 {
		w, err := c.send(parts)
		if err != nil {
			c.reset(err)
			return false
		}
		c.rcvNxt += uint32(w)
		c.wrNxt = c.rcvNxt
		if w < n {
			c.hold(c.rcvNxt, trimParts(parts, w), n-w, fin)
			return true
		}
	}
	if fin {
		c.takeFIN()
	}
	return true
}

// hold keeps n bytes of parts, at seq, until the host socket takes them
// (store). Bytes in order are acknowledged once kept: the queue extends
// the socket's buffer, within the window, which counts what the queue
// holds. Left unacknowledged, the bytes a socket refused (its reader
// slower than the sandbox, or the room it had overestimated) were sent
// again by the sandbox after its retransmission timeout, as if lost:
// iperf3 from the sandbox to a server on the host's loopback, 4 s at MTU
// 1500, counted 1,718 and 2,846 retransmissions on the fast path, none on
// the netstack path. In-order bytes that find the queue full (maxQueued)
// wait for the sandbox to send them again, under a zero window (window).
func (c *conn) hold(seq uint32, parts [2][]byte, n int, fin bool) {
	if !c.store(seq, parts, n, fin) {
		if seq == c.rcvNxt && n > 0 && c.refusedHeld() {
			c.stalled = true
		}
		return
	}
	if seq != c.rcvNxt {
		return // past a hole
	}
	// rcvNxt moves past the chunks that now follow it without a hole,
	// and past the FIN, which the host socket gets once the bytes
	// before it are written (flush): a FIN left unacknowledged behind
	// bytes a slow reader had not taken made the sandbox resend it, a
	// loss probe and then a timeout. The walk starts at the chunk just
	// kept: every chunk before it ends at the old rcvNxt or before.
	i := c.chunkAfter(c.rcvNxt)
	if i > 0 {
		i-- // the chunk just kept, or the one that held it already
	}
	for _, k := range c.queue[i:] {
		if seqLT(c.rcvNxt, k.seq) {
			break
		}
		if seqLT(c.rcvNxt, k.end()) {
			c.rcvNxt = k.end()
		}
		if k.fin && c.rcvNxt == k.end() {
			c.ackFIN()
			break
		}
	}
}

// chunkAfter returns the index of the first chunk in the queue that
// starts after seq, by halving.
func (c *conn) chunkAfter(seq uint32) int {
	i, j := 0, len(c.queue)
	for i < j {
		m := int(uint(i+j) >> 1)
		if seqLT(seq, c.queue[m].seq) {
			j = m
		} else {
			i = m + 1
		}
	}
	return i
}

// send writes parts to the host socket; a socket that takes less (its
// buffer full) is not an error.
func (c *conn) send(parts [2][]byte) (int, error) {
	iov := c.iov[:0]
	for _, p := range parts {
		if len(p) > 0 {
			iov = append(iov, p)
		}
	}
	n, err := rawconn.Send(c.fd, iov, unix.MSG_NOSIGNAL|unix.MSG_DONTWAIT)
	clear(c.iov[:])
	if errors.Is(err, unix.EAGAIN) {
		c.roomEst = 0 // read it again
		return 0, nil
	}
	// The kernel counts each buffer's overhead too (a few hundred bytes).
	c.roomEst -= n + 512
	return n, err
}

// store keeps n bytes of parts, at seq, until the host socket takes them;
// it reports whether they are kept.
//
// The queue is in order of seq, and its place is found by halving: a
// sandbox that sends its segments backwards made every one of them walk
// the whole queue, and the queue may hold tens of thousands of chunks
// (maxQueued of 2 KiB buffers). What is held already is found by the
// chunk before that place (the resend of a segment held: same start),
// not by a walk either; a rarer overlap is held twice, which flush
// handles. An insertion before the tail moves the chunks after it, so
// past maxInserted chunks only an append, or the segment that fills the
// hole at rcvNxt, is kept: the sandbox sends the others again once the
// hole is filled, as after a loss.
func (c *conn) store(seq uint32, parts [2][]byte, n int, fin bool) bool {
	end := seq + uint32(n)
	i := c.chunkAfter(seq)
	if i > 0 {
		if k := &c.queue[i-1]; seqLEQ(end, k.end()) && (!fin || k.fin) {
			return true // held already
		}
	}
	if i < len(c.queue) && len(c.queue) >= maxInserted && seq != c.rcvNxt {
		c.e.dropped.Add(1)
		return false
	}
	if cost := chunkCost(n); cost > 0 && c.e.queued.Add(cost) > maxQueued {
		c.e.queued.Add(-cost)
		c.e.dropped.Add(1)
		return false
	}
	data, buf := chunkBuf(n)
	data = append(append(data, parts[0]...), parts[1]...)
	data = data[:n]
	c.queued += n
	c.queueSlot()
	copy(c.queue[i+1:], c.queue[i:])
	c.queue[i] = chunk{seq: seq, data: data, buf: buf, fin: fin}
	return true
}

// maxInserted bounds the queue a segment is inserted into before its
// tail (store). A sandbox that lost segments sends them again into a
// queue of the segments that followed: at MTU 1500 without GSO and a
// 4 MiB window, some 2,900; each insertion moves at most 4,096 chunks
// (224 KiB). 30,000 1-byte segments sent backwards took store 2.0 s of
// CPU before the bound and the halving, 46 ms after (4,096 held).
const maxInserted = 4096

// flush writes the queued bytes that follow wrNxt to the host socket; it
// reports whether the socket took any, or the FIN.
func (c *conn) flush() bool {
	moved := false
	for len(c.queue) > 0 && c.state != stClosed {
		k := &c.queue[0]
		if seqLT(c.wrNxt, k.seq) {
			break // a hole
		}
		if seqLT(c.wrNxt, k.end()) {
			skip := int(c.wrNxt - k.seq)
			w, err := c.send([2][]byte{k.data[skip:]})
			if err != nil {
				c.reset(err)
				return moved
			}
			if w > 0 {
				c.wrNxt += uint32(w)
				if c.stalled {
					c.stalled = false
					c.reopened()
				}
				moved = true
			}
			if w < len(k.data)-skip {
				break // the socket is full: EPOLLOUT resumes
			}
		}
		fin := k.fin && c.wrNxt == k.end()
		c.dropChunk()
		if fin {
			c.takeFIN()
			moved = true
		}
	}
	return moved
}

func (c *conn) dropChunk() {
	n := len(c.queue[0].data)
	c.queued -= n
	c.e.queued.Add(-chunkCost(n))
	putChunkBuf(c.queue[0].buf)
	c.queuePop()
}

// queuePop takes the first chunk off the queue.
func (c *conn) queuePop() {
	c.queue[0] = chunk{}
	c.queue = c.queue[1:]
	if len(c.queue) == 0 {
		c.queue = c.qbuf[:0]
		if cap(c.qbuf) > maxKeptQueue {
			c.queue, c.qbuf = nil, nil
		}
	}
}

// queueSlot adds a zero chunk at the end of the queue. The queue takes
// from its front (queuePop) and adds at its end; when it reaches the end
// of its array it moves back to the front if there is room there, and an
// empty queue starts again at the front, so that an upload whose chunks
// wait for the host socket keeps one array instead of growing a new one
// each time the queue slides to its end (most of what a connection
// allocated besides itself, in the soak's uploads).
func (c *conn) queueSlot() {
	if len(c.queue) == cap(c.queue) && len(c.queue) < cap(c.qbuf) {
		n := copy(c.qbuf[:cap(c.qbuf)], c.queue)
		clear(c.qbuf[n:cap(c.qbuf)])
		c.queue = c.qbuf[:n]
	}
	grows := len(c.queue) == cap(c.queue)
	c.queue = append(c.queue, chunk{})
	if grows {
		c.qbuf = c.queue[:0]
	}
}

// maxKeptQueue is the longest queue array (in chunks) an emptied queue
// keeps for the connection's next bytes: an idle connection holds no more
// than this (3.5 KiB) for a burst long past.
const maxKeptQueue = 64

// reopened notes that the window, shut while the host socket had no
// room, is open again: the sandbox's bytes that waited behind it come
// next, so Sending counts the connection from now on, as it
// did while the window was shut (it took the moment between as idle and
// reset a connection whose sandbox still had 3.6 of 8 MiB to send, 1 run
// in 6 on the packet link).
func (c *conn) reopened() { c.dataAt = c.e.timers.now() }

// ackFIN acknowledges the sandbox's FIN, which follows every byte
// acknowledged.
func (c *conn) ackFIN() {
	if c.finRcvd {
		return
	}
	c.finRcvd = true
	c.rcvNxt++
}

// takeFIN passes the sandbox's FIN on once the bytes before it are
// written: the host socket's writing is shut.
func (c *conn) takeFIN() {
	c.ackFIN()
	resetOnClose(c.fd, false)
	unix.Shutdown(c.fd, unix.SHUT_WR)
}

// maybeFinish closes the connection once both FINs are through.
func (c *conn) maybeFinish() {
	if c.state == stEstablished && c.finRcvd && c.hostEOF && seqLT(c.finSeq, c.sndUna) && len(c.queue) == 0 {
		c.close(false)
	}
}

// room is the window to advertise: the room in the host socket's send
// buffer, less what is queued for it; below zero when the queue holds
// more than the socket has room for. A small window asks the poller to
// say when the socket has room again (EPOLLOUT comes only after the kernel
// found the socket short of room when polled).
func (c *conn) room(fresh bool) int {
	// The kernel's figure is read again only once the estimate has
	// fallen to half the buffer, or to shrink the window: a getsockopt
	// per segment cost as much as the rest of a 1-byte round trip's user
	// CPU.
	if fresh || c.roomEst <= c.sndbuf/2 {
		room, sndbuf, err := sendRoom(c.fd)
		if err != nil {
			return 0
		}
		c.roomEst, c.sndbuf = room, sndbuf
		// The kernel calls a socket writable when its free space is
		// at least half what it holds: a third of the buffer.
		if small := 3*room < sndbuf; small && !c.wndSmall {
			c.wndSmall = true
			// Re-arming makes the kernel poll the socket now and note
			// that it is short of room, so that it wakes the poller
			// when it has room again.
			c.e.set.Modify(c.fd, unix.EPOLLIN|unix.EPOLLOUT|unix.EPOLLRDHUP|unix.EPOLLET, c.id)
		} else if !small && c.wndSmall {
			c.wndSmall = false
			c.reopened()
		}
	}
	return c.roomEst - c.queued
}

// window returns the window field for an outgoing segment and moves the
// advertised right edge.
//
// The window keeps its size until the room in the host socket differs
// from it by an eighth of the socket's buffer: a sender counts an ACK
// whose window changed as no duplicate (Linux), and gVisor's ignores a
// partial ACK in recovery that changes the window, so a window that
// follows every byte of room would stall their loss recovery.
//
// The edge never moves back (RFC 7323, 2.4): a sender may have filled the
// window it was given, and the bytes it holds back for a hole must stay
// inside it, or a sender that does not retransmit beyond the window
// (Linux) would wait for a zero window to open while we wait for the
// hole.
func (c *conn) window() uint16 {
	field, right := c.nextWindow()
	c.lastWnd = field << c.rcvScale()
	c.lastAck = c.rcvNxt
	if seqLT(c.rcvRight, right) {
		c.rcvRight = right
	}
	return uint16(field)
}

// rcvScale is the shift of the window field of our segments.
func (c *conn) rcvScale() uint {
	if c.sndWSOK {
		return rcvWS
	}
	return 0
}

// updateDue reports whether a segment without data would tell the
// sandbox anything: a held ACK, an acknowledgement or a window it has not
// been sent. One that tells nothing counts as a duplicate ACK, and three
// of those make the sandbox resend what is in flight.
func (c *conn) updateDue() bool {
	field, _ := c.nextWindow()
	return c.ackIsHeld() || c.lastAck != c.rcvNxt || field<<c.rcvScale() != c.lastWnd
}

// nextWindow computes the window field for an outgoing segment and the
// right edge it advertises (see window).
func (c *conn) nextWindow() (field int, right uint32) {
	if c.stalled && c.refusedHeld() {
		// The host has stopped taking bytes and the sandbox resends
		// them: a window left open made it count every resend towards
		// giving the connection up (ETIMEDOUT after tcp_retries2, some
		// 15 minutes), while a zero window makes it probe for as long as
		// it is answered, as when a local peer stops reading. The edge
		// stays (what the sandbox sent inside it is kept), the window
		// shrinks to nothing until the socket takes bytes again
		// (hostEvent's EPOLLOUT: flush, then the window's update).
		return 0, c.rcvRight
	}
	ws := c.rcvScale()
	free := c.room(false)
	w := c.lastWnd
	g := max(c.sndbuf/8, c.mss)
	if free+g < w {
		free = c.room(true) // the estimate only falls: is the room really less?
	}
	// free counts below zero: the bytes kept past the socket's room
	// (acknowledged, see hold) close a window smaller than g too.
	if free > w+g || free+g < w {
		w = max(free, 0)
	}
	right = c.rcvNxt + uint32(w)
	if seqLT(right, c.rcvRight) {
		right = c.rcvRight
	}
	field = min((int(right-c.rcvNxt)+1<<ws-1)>>ws, 65535)
	return field, c.rcvNxt + uint32(field<<ws)
}

// sendACK sends a bare ACK, with SACK blocks for what is queued out of
// order.
func (c *conn) sendACK(t *tx) {
	f := fields{flags: flagACK, seq: c.sndNxt, ack: c.rcvNxt, wnd: c.window(), opts: c.options(t)}
	c.sent(false)
	c.e.write(t, &c.ends, f, nil, c.mss)
}

// sent notes a segment going out: it carries the ACK due, if one was held.
func (c *conn) sent(data bool) {
	c.lastData = data
	if c.ackIsHeld() {
		c.ackHeld.Store(0)
		if c.e.cfg.Link == nil {
			c.e.timers.stop(c, timerAck)
		}
	}
}

// options encodes the options of a segment after the handshake: the
// timestamp, when they are on, and SACK blocks for the ranges queued past
// a hole.
func (c *conn) options(t *tx) []byte {
	o := t.opts[:0]
	if c.tsOK {
		o = c.e.appendTS(o, c.tsRecent)
	}
	if !c.sackOK {
		return o
	}
	room := (len(t.opts) - len(o) - 4) / 8 // NOP, NOP, kind, length, then 8 bytes a block
	var blocks [maxSACK]header.SACKBlock
	nb := 0
	if c.dsack != (sackBlock{}) {
		blocks[0] = header.SACKBlock{Start: seqnum.Value(c.dsack.start), End: seqnum.Value(c.dsack.end)}
		nb = 1
		c.dsack = sackBlock{}
	}
	dup := nb
	for _, k := range c.queue {
		if !seqLT(c.rcvNxt, k.seq) {
			continue
		}
		// A FIN held past a hole is reported too, its sequence number
		// the block's last, as Linux and gVisor report one. Without
		// it the sender learns of nothing past the hole: a gVisor
		// guest's 64 MiB upload over a lossy link stalled for good 480
		// bytes before its end (its FIN queued here, the guest in
		// FIN-WAIT-1 sending nothing more; CI waited 18 minutes).
		end := k.end() // a chunk holds data, a FIN, or both
		if k.fin {
			end++
		}
		if nb > dup && seqLEQ(k.seq, uint32(blocks[nb-1].End)) {
			if seqLT(uint32(blocks[nb-1].End), end) {
				blocks[nb-1].End = seqnum.Value(end)
			}
			continue
		}
		if nb == min(maxSACK, room) {
			break
		}
		blocks[nb] = header.SACKBlock{Start: seqnum.Value(k.seq), End: seqnum.Value(end)}
		nb++
	}
	if nb == 0 {
		return o
	}
	o = append(o, header.TCPOptionNOP, header.TCPOptionNOP)
	n := header.EncodeSACKBlocks(blocks[:nb], t.opts[len(o):])
	return t.opts[:len(o)+n]
}

// inflight is what was sent and not acknowledged (the FIN counts one).
func (c *conn) inflight() uint32 { return c.sndNxt - c.sndUna }

// dataNxt is sndNxt without our FIN: where the next peek starts.
func (c *conn) dataNxt() uint32 {
	if c.hostEOF && seqLT(c.finSeq, c.sndNxt) {
		return c.finSeq
	}
	return c.sndNxt
}

// maxSkip bounds the bytes in flight without SO_PEEK_OFF (see peek).
const maxSkip = (rawconnMaxIov - 1) * 64 << 10

// push sends what the host sent, as far as the sandbox's window allows;
// it reports whether a segment went out (which carried the ACK).
func (c *conn) push(t *tx) bool {
	if c.state != stEstablished {
		return false
	}
	sent := false
	for {
		if c.hostEOF && c.sndNxt == c.finSeq {
			c.sendData(t, c.sndNxt, nil, flagFIN|flagACK)
			c.sndNxt++
			c.sndMax = seqMax(c.sndMax, c.sndNxt)
			sent = true
			continue // a reset behind it
		}
		if c.hostEOF && seqLT(c.finSeq, c.sndNxt) {
			// Everything, the FIN too, is out. A host that resets after
			// its FIN (it closed, then got bytes: its kernel resets)
			// resets the sandbox too, which would otherwise end in a
			// clean close, its last bytes lost without an error.
			if c.hostErr != nil && !c.holdReset() {
				c.reset(c.hostErr)
			}
			return sent
		}
		resend := seqLT(c.sndNxt, c.sndMax)
		if !c.hostReadable && !resend {
			return sent
		}
		// The window's right edge; what was sent once may be sent again
		// whatever the window says now (a receiver that shrinks its
		// window, as gVisor's does when it holds segments past a hole,
		// still takes the hole).
		limit := c.sndUna + c.sndWnd
		if seqLT(limit, c.sndMax) {
			limit = c.sndMax
		}
		if !seqLT(c.sndNxt, limit) {
			if c.inflight() == 0 {
				c.arm(rtoBase) // a zero window with bytes to send: probe it
			}
			return sent
		}
		want := min(int(limit-c.sndNxt), maxPayload)
		if c.hostEOF {
			want = min(want, int(c.finSeq-c.sndNxt))
		}
		skip := c.dataNxt() - c.rdSeq
		if !c.peekOff {
			if skip >= maxSkip {
				return sent
			}
			want = min(want, int(maxSkip-skip))
		}
		n, err := peek(c.fd, t.payload[:want], skip, c.peekOff)
		switch {
		case c.hostErr != nil && (n == 0 || errors.Is(err, unix.EAGAIN)):
			if errors.Is(c.hostErr, unix.EPIPE) && !c.hostEOF {
				// The reset came after the host's FIN (Linux says
				// EPIPE for a reset that finds its socket in
				// CLOSE_WAIT): the FIN goes first, then the reset, as
				// when they come in separate polls, and the
				// sandbox's reader gets the end of the stream, as a
				// local one does.
				c.hostEnds()
				continue
			}
			// Every byte the host sent is out: the stream ends in
			// the host's reset, not a FIN.
			if !c.holdReset() {
				c.reset(c.hostErr)
			}
			return sent
		case errors.Is(err, unix.EAGAIN):
			if c.rdhup && !resend {
				// Nothing new, and the host's FIN has come: the
				// stream ends here (the path without SO_PEEK_OFF
				// never reads 0 while bytes are in flight).
				c.hostEnds()
				continue
			}
			c.hostReadable = false
			return sent
		case err != nil:
			c.reset(err)
			return sent
		case n == 0:
			c.hostEnds()
			continue
		}
		flags := flagACK
		if n < want {
			flags |= flagPSH
			// The queue is drained: the next byte to arrive raises a
			// new edge. (Unless the FIN is there: the next peek says so.)
			if !resend && !c.rdhup && c.hostErr == nil {
				c.hostReadable = false
			}
		}
		c.sendData(t, c.sndNxt, t.payload[:n], flags)
		c.sndNxt += uint32(n)
		c.sndMax = seqMax(c.sndMax, c.sndNxt)
		sent = true
	}
}

// hostEnds notes that the host's stream ends where the engine has read it
// to: its FIN is the next sequence number to send.
func (c *conn) hostEnds() { c.hostEOF, c.finSeq = true, c.sndNxt }

// sendData sends a segment of the host's data (or the FIN) at seq and
// starts the retransmission timer if nothing was in flight.
func (c *conn) sendData(t *tx, seq uint32, payload []byte, flags header.TCPFlags) {
	if c.sndUna == c.sndNxt {
		c.lastProgress = time.Now()
	}
	f := fields{flags: flags, seq: seq, ack: c.rcvNxt, wnd: c.window(), opts: c.options(t)}
	c.sent(len(payload) > 0)
	c.e.write(t, &c.ends, f, payload, c.mss)
	c.arm(c.rto())
}

func (c *conn) rto() time.Duration {
	return min(rtoBase<<c.backoff, rtoMax)
}

// fastRetransmit resends the first hole after three duplicate ACKs.
func (c *conn) fastRetransmit(s *segment, t *tx) {
	c.inRecovery = true
	c.recover = c.sndMax
	c.retransmitHole(s, t)
}

// retransmitHole resends the bytes from sndUna up to the first range the
// sandbox reports holding (SACK), at most one frame's worth; or the FIN,
// when only it is missing.
func (c *conn) retransmitHole(s *segment, t *tx) {
	dataMax := c.sndMax
	if c.hostEOF && seqLT(c.finSeq, dataMax) {
		dataMax = c.finSeq
	}
	if seqLT(c.sndUna, dataMax) {
		end := dataMax
		if lim := c.sndUna + uint32(maxPayload); seqLT(lim, end) {
			end = lim
		}
		for i := range s.nsack {
			if b := s.sack[i]; seqLT(c.sndUna, b.start) && seqLT(b.start, end) {
				end = b.start
			}
		}
		c.resend(t, int(end-c.sndUna))
		return
	}
	if c.hostEOF && c.finSeq == c.sndUna && seqLT(c.finSeq, c.sndMax) {
		c.e.retransmits.Add(1)
		c.sendData(t, c.finSeq, nil, flagFIN|flagACK)
	}
}

// resend sends n bytes from sndUna again, without moving sndNxt.
func (c *conn) resend(t *tx, n int) {
	n = min(n, maxPayload)
	if c.peekOff {
		if err := setPeekOff(c.fd, c.sndUna-c.rdSeq); err != nil {
			c.reset(err)
			return
		}
	}
	m, err := peek(c.fd, t.payload[:n], c.sndUna-c.rdSeq, c.peekOff)
	if c.peekOff {
		if err := setPeekOff(c.fd, c.dataNxt()-c.rdSeq); err != nil {
			c.reset(err)
			return
		}
	}
	if err != nil && !errors.Is(err, unix.EAGAIN) {
		c.reset(err)
		return
	}
	if m > 0 {
		c.e.retransmits.Add(1)
		c.sendData(t, c.sndUna, t.payload[:m], flagACK)
	}
}

// onTimer runs when the connection's timer fires: the handshake's
// deadline, a retransmission, or a probe of a zero window. c.mu is held.
func (c *conn) onTimer() {
	if !c.timerOn {
		return // stopped after it fell due
	}
	c.timerOn = false
	now := time.Now()
	switch c.state {
	case stClosed:
		return
	case stConnecting, stSynAcked:
		switch d := c.deadline.Sub(now); {
		case d <= 0:
			if c.state == stConnecting {
				c.e.refused.Add(1)
			}
			c.reset(nil)
		case c.state == stSynAcked:
			// Our SYN-ACK, or the sandbox's ACK of it, was lost: a
			// sandbox that waits for the host to speak first would
			// send nothing more, and a SYN-ACK sent again makes it
			// acknowledge again.
			t := c.e.txPool.Get().(*tx)
			c.sendSynAck(t)
			c.e.txPool.Put(t)
			c.backoff = min(c.backoff+1, maxBackoff)
			c.arm(min(d, synAckRTO<<c.backoff))
		default:
			c.arm(d) // the host's connect is still under way
		}
		return
	}
	t := c.e.txPool.Get().(*tx)
	defer c.e.txPool.Put(t)
	if c.sndUna != c.sndMax {
		if d := c.lastProgress.Add(c.rto()).Sub(now); d > 0 {
			c.arm(d)
			return
		}
		if c.backoff >= maxBackoff {
			c.reset(nil) // the sandbox acknowledges nothing any more
			return
		}
		c.backoff++
		c.lastProgress = now
		c.goBackN(t)
		return
	}
	if c.sndWnd == 0 && (c.hostReadable || c.hostEOF) {
		// A zero window, and bytes to send: an old sequence number
		// makes the sandbox answer with its window now.
		c.e.write(t, &c.ends, fields{flags: flagACK, seq: c.sndUna - 1, ack: c.rcvNxt, wnd: c.window(), opts: c.options(t)}, nil, c.mss)
		c.backoff = min(c.backoff+1, maxBackoff)
		c.arm(c.rto())
		return
	}
	if c.hostErr != nil {
		c.push(t) // the host's reset, held (holdReset)
	}
}

// goBackN sends everything in flight again, from sndUna on.
func (c *conn) goBackN(t *tx) {
	c.e.retransmits.Add(1)
	c.inRecovery = false
	c.dupAcks = 0
	if c.peekOff {
		if err := setPeekOff(c.fd, c.sndUna-c.rdSeq); err != nil {
			c.reset(err)
			return
		}
	}
	c.sndNxt = c.sndUna
	if !c.push(t) {
		c.arm(c.rto())
	}
}

// reset ends the connection with a reset both ways: the sandbox gets a
// RST, the host socket is closed with one.
func (c *conn) reset(err error) {
	if c.state == stClosed {
		return
	}
	if err != nil && c.e.log.Enabled(context.Background(), slog.LevelDebug) {
		c.e.log.Debug("tcp fast path: connection reset", "src", c.k.src, "dst", c.k.dst, "err", err)
	}
	c.sendReset()
	c.close(true)
}

// sendReset sends the sandbox a reset of the connection.
func (c *conn) sendReset() {
	t := c.e.txPool.Get().(*tx)
	f := fields{flags: flagRST | flagACK, seq: c.sndNxt, ack: c.rcvNxt}
	if c.state == stConnecting {
		f.seq = 0
	}
	c.e.write(t, &c.ends, f, nil, c.mss)
	c.e.txPool.Put(t)
}

// close releases the connection: the host socket is closed (with a reset
// to its peer when abort), the tables forget it, and Done is called.
func (c *conn) close(abort bool) {
	if c.state == stClosed {
		return
	}
	c.state = stClosed
	c.disarm()
	c.ackHeld.Store(0)
	c.e.timers.stop(c, timerAck)
	if c.fd >= 0 {
		if abort {
			abortClose(c.fd)
		} else {
			unix.Close(c.fd)
		}
		c.fd = -1
	}
	for len(c.queue) > 0 {
		c.dropChunk()
	}
	e := c.e
	e.mu.Lock()
	if e.conns[c.k] == c {
		delete(e.conns, c.k)
	}
	delete(e.byID, c.id)
	e.halfOpen.remove(c)
	if e.state == 1 && len(e.spare) < maxSpare {
		e.spare = append(e.spare, c)
	}
	e.mu.Unlock()
	if c.done != nil {
		c.done()
		c.done = nil
	}
}

// closeOnExit ends the connection as the engine stops (the sandbox's
// command has exited, or the network process is told to stop; the wait
// for Sending has
// given the sandbox's kernel its time to finish). A connection whose
// stream from the sandbox is complete (its FIN came, and the host socket
// took the queue whole) is closed as an exiting program's socket is, its
// kernel sending what is left, then a FIN (a reset, should the host's
// unread bytes still be there: they are dropped first): a program inside
// that wrote 2 MB to a server reading late, closed and exited had its
// bytes dropped from the host socket's queue when every connection was
// reset (the server got some 128 KB, then ECONNRESET). Any other is
// reset: the sandbox had not ended its stream, and a FIN would tell the
// host it had. A program that closed with 10 MiB still in its kernel for
// a server reading 800 KB a second, and exited, had the host read 7.5-8.1
// MiB and a clean end of stream in 4 runs of 7. The sandbox gets a reset
// either way.
func (c *conn) closeOnExit() {
	if c.state == stEstablished && len(c.queue) > 0 {
		c.flush()
	}
	if c.state != stEstablished || len(c.queue) > 0 || !c.finRcvd {
		c.reset(nil)
		return
	}
	consume(c.fd, ^uint32(0)) // until EAGAIN or the FIN
	c.sendReset()
	c.close(false)
}

// trimParts drops the first n bytes of parts.
func trimParts(p [2][]byte, n int) [2][]byte {
	if n <= len(p[0]) {
		return [2][]byte{p[0][n:], p[1]}
	}
	return [2][]byte{nil, p[1][n-len(p[0]):]}
}

// truncParts keeps the first n bytes of parts.
func truncParts(p [2][]byte, n int) [2][]byte {
	if n <= len(p[0]) {
		return [2][]byte{p[0][:n], nil}
	}
	return [2][]byte{p[0], p[1][:n-len(p[0])]}
}
