package api

import (
	"cmp"
	"container/list"
	"net"
	"slices"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// The connection limit. The API must stay answerable while a program
// holds thousands of connections open, and must not cost well-behaved
// clients anything for it: a client that sends its request promptly is
// served, however many connections others hold and however slowly the
// server gets the CPU to read it.
//
// A connection keeps the server waiting when nothing has arrived on it
// that the server has not read, and net/http is blocked reading it (the
// next request on a kept-alive connection, the rest of a request that
// stopped arriving) or has not read from it yet (a new connection whose
// client has sent nothing). The rule: when a new connection would pass
// MaxConns, one connection that keeps the server waiting is closed: of the
// client process (its PID, SO_PEERCRED) that has had the most connections
// end without a request, the one that has waited longest (ties: the
// process with the most connections keeping the server waiting).
//
// Time cannot tell a client that is about to write from one that never
// will: with a thousand requests in flight on two CPUs, Go's HTTP client
// took 250 ms from its connect to its write, as long as an idle client's
// connections had been open. Its record can: a program that holds
// connections open without a request has had thousands of them end that
// way, a client that sends has had none.
//
// Never closed for the limit:
//   - a request being handled, or whose answer is being written, unless
//     the writing has been blocked for stalledWrite: its client reads
//     nothing (one that sent hundreds of requests and read no answer held
//     every place until the 10 s write timeout, again and again, and a
//     prompt client's call waited 9.5 s; RootlessKit, with no cap, 0.7 s);
//   - a connection net/http has read from and is not reading now (it is
//     parsing a request that arrived);
//   - a connection with bytes in its socket that the server has not read:
//     its client has sent, the server has not got to it (a busy machine
//     starves the server, not the client).
//
// So a program that opens connections and sends nothing loses its own,
// and a client that connects and writes later is not caught between its
// connect and its write by another program's connections.
// When no connection keeps the server waiting (all have a request
// arriving or being handled), the new connection waits, and the listener
// accepts no other until one is answered or closes: the rest wait in the
// kernel's listen queue (net.core.somaxconn, 4096 by default), which costs
// the process no descriptor. What is closed has received nothing the
// server has not read, so an add or delete either arrives whole and is
// handled and answered, or does not happen.
//
// What no server can help: a program that connects faster than the server
// accepts and closes (tens of thousands a second) fills the kernel's
// listen queue, and then every client's connect fails (EAGAIN) or blocks,
// whatever the server does.

// ConnStats is what the connection limit has done since the server
// started.
type ConnStats struct {
	// Open is the connections open now; Max the limit; Peak the most
	// open at once.
	Open, Max, Peak int
	// Accepted counts every connection accepted.
	Accepted uint64
	// Closed counts connections closed for the limit: each kept the
	// server waiting when a new connection needed its place.
	Closed uint64
	// Waited counts new connections that found every place taken by a
	// request arriving or being handled, and waited for one to end
	// (while they waited, the listen queue held the others).
	Waited uint64
}

// connSet is the open connections by client process, under the Server's
// mutex.
type connSet struct {
	mu      *sync.Mutex
	cond    *sync.Cond      // signalled when a place may have come free
	peers   map[int32]*peer // by client process ID
	waiters int             // Accepts waiting in cond
	lnGone  bool            // the listener is closed: Accepts return
	stats   ConnStats
}

// peer is one client process's connections and record.
type peer struct {
	pid     int32
	conns   list.List // of *apiConn, in the order they began to wait
	waiting int       // how many of them keep the server waiting
	wasted  uint64    // its connections that ended without a request
}

// maxPeers bounds the records kept of processes with no connection open:
// beyond it, a process with none is forgotten.
const maxPeers = 4096

func (cs *connSet) init(mu *sync.Mutex, max int) {
	cs.mu = mu
	cs.cond = sync.NewCond(mu)
	cs.peers = make(map[int32]*peer)
	cs.stats.Max = max
}

// changed wakes an Accept waiting for a place, if there is one.
func (cs *connSet) changed() {
	if cs.waiters > 0 {
		cs.cond.Signal()
	}
}

// apiConn is a connection as the limit sees it. Its fields are guarded by
// the Server's mutex.
type apiConn struct {
	net.Conn
	s    *Server
	rc   syscall.RawConn // for the unread-bytes check; nil if Conn has no descriptor
	peer *peer           // its client process
	elem *list.Element   // in peer.conns; nil once gone

	reading bool      // net/http is in Read
	writing time.Time // when net/http's blocked Write began; zero when not in Write
	got     bool      // a Read has returned bytes
	busy    bool      // a request is being handled or answered
	served  bool      // a request has arrived whole on it
	gone    bool      // closed for the limit, or closed
}

// waits is the state that keeps the server waiting, but for unread bytes
// (checked only when a connection is to be closed: a system call).
func (c *apiConn) waits() bool { return (c.reading || !c.got) && !c.busy && !c.gone }

// updateLocked applies f to c's state and keeps its peer's tally.
func (cs *connSet) updateLocked(c *apiConn, f func()) {
	before := c.waits()
	f()
	switch after := c.waits(); {
	case after && !before:
		c.peer.waiting++
		cs.changed()
	case before && !after:
		c.peer.waiting--
	}
}

// Read tells the limit that the server waits for this connection's client
// until the read returns.
func (c *apiConn) Read(b []byte) (int, error) {
	cs := &c.s.conns
	cs.mu.Lock()
	cs.updateLocked(c, func() {
		if !c.gone {
			c.reading = true
			c.peer.conns.MoveToBack(c.elem)
		}
	})
	cs.mu.Unlock()
	n, err := c.Conn.Read(b)
	cs.mu.Lock()
	cs.updateLocked(c, func() {
		c.reading = false
		c.got = c.got || n > 0
	})
	cs.mu.Unlock()
	return n, err
}

// Write tells the limit how long the server has been waiting for this
// connection's client to take an answer.
func (c *apiConn) Write(b []byte) (int, error) {
	cs := &c.s.conns
	cs.mu.Lock()
	c.writing = time.Now()
	cs.mu.Unlock()
	n, err := c.Conn.Write(b)
	cs.mu.Lock()
	c.writing = time.Time{}
	cs.mu.Unlock()
	return n, err
}

// stalledWrite is how long a write of an answer may be blocked before the
// connection may be closed for a new one. An answer is a few hundred bytes
// that the socket's buffer takes at once: a write blocks only when the
// client has left its answers unread until the buffer filled.
const stalledWrite = time.Second

// stalled reports whether the server has been blocked writing to c's
// client for stalledWrite.
func (c *apiConn) stalled(now time.Time) bool {
	return !c.writing.IsZero() && now.Sub(c.writing) >= stalledWrite && !c.gone
}

// unread reports whether bytes have arrived that the server has not read
// (SIOCINQ: the socket's receive queue).
func (c *apiConn) unread() bool {
	if c.rc == nil {
		return false
	}
	var n int
	var err error
	if cerr := c.rc.Control(func(fd uintptr) { n, err = unix.IoctlGetInt(int(fd), unix.SIOCINQ) }); cerr != nil || err != nil {
		return false // closed under us: nothing to wait for
	}
	return n > 0
}

// peerPID is the process ID of a unix socket's client, 0 if unknown.
func peerPID(rc syscall.RawConn) int32 {
	if rc == nil {
		return 0
	}
	var cred *unix.Ucred
	var err error
	if cerr := rc.Control(func(fd uintptr) { cred, err = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) }); cerr != nil || err != nil {
		return 0
	}
	return cred.Pid
}

// setBusyLocked marks c's request as being handled, or no longer.
func (cs *connSet) setBusyLocked(c *apiConn, busy bool) {
	cs.updateLocked(c, func() {
		c.busy = busy
		c.served = c.served || busy
	})
	if !busy {
		cs.changed()
	}
}

// removeLocked forgets c (closed by net/http, or for the limit).
func (cs *connSet) removeLocked(c *apiConn) {
	if c.gone {
		return
	}
	cs.updateLocked(c, func() { c.gone = true })
	c.peer.conns.Remove(c.elem)
	c.elem = nil
	if !c.served {
		c.peer.wasted++
	}
	if c.peer.conns.Len() == 0 && (c.peer.wasted == 0 || len(cs.peers) > maxPeers) {
		delete(cs.peers, c.peer.pid)
	}
	cs.stats.Open--
	cs.changed()
}

// admit counts nc in, making room for it as the rule says; it waits while
// no other connection keeps the server waiting.
func (cs *connSet) admit(s *Server, nc net.Conn) (*apiConn, error) {
	c := &apiConn{Conn: nc, s: s}
	var pid int32
	if sc, ok := nc.(syscall.Conn); ok {
		c.rc, _ = sc.SyscallConn()
		pid = peerPID(c.rc)
	}
	cs.mu.Lock()
	defer cs.mu.Unlock()
	if c.peer = cs.peers[pid]; c.peer == nil {
		c.peer = &peer{pid: pid}
		cs.peers[pid] = c.peer
	}
	c.elem = c.peer.conns.PushBack(c)
	c.peer.waiting++
	cs.stats.Open++
	cs.stats.Accepted++
	waited := false
	for cs.stats.Open > cs.stats.Max {
		if cs.lnGone {
			cs.removeLocked(c)
			nc.Close()
			return nil, net.ErrClosed
		}
		if v := cs.victimLocked(c); v != nil {
			cs.removeLocked(v)
			v.Conn.Close()
			cs.stats.Closed++
			continue
		}
		if !waited {
			waited = true
			cs.stats.Waited++
		}
		// Looked at again when a place may have come free, or when a
		// blocked answer may have become a stalled one.
		wake := time.AfterFunc(stalledWrite, func() {
			cs.mu.Lock()
			cs.cond.Broadcast()
			cs.mu.Unlock()
		})
		cs.waiters++
		cs.cond.Wait()
		cs.waiters--
		wake.Stop()
	}
	cs.stats.Peak = max(cs.stats.Peak, cs.stats.Open)
	return c, nil
}

// victimLocked is the connection to close for newest, or nil: of the
// process that has had the most connections end without a request, the
// one that has kept the server waiting longest (if none of its does, the
// next process's). newest itself is not a candidate: net/http has not
// seen it.
func (cs *connSet) victimLocked(newest *apiConn) *apiConn {
	var peers []*peer
	for _, p := range cs.peers {
		if p.waiting > 0 {
			peers = append(peers, p)
		}
	}
	slices.SortFunc(peers, func(a, b *peer) int {
		return cmp.Or(cmp.Compare(b.wasted, a.wasted), cmp.Compare(b.waiting, a.waiting), cmp.Compare(a.pid, b.pid))
	})
	for _, p := range peers {
		if p.wasted == 0 && peers[0].wasted > 0 {
			// A process whose connections have all carried requests
			// is not closed for one that has wasted some: when the
			// wasteful one has none keeping the server waiting just
			// now (its new ones still in the listen queue), the new
			// connection waits for a place. Before, a prompt client's
			// connection between its connect and its write was closed
			// then (EOF, no answer: 1 or 2 runs in 12 of
			// TestServerBurstWhileIdleConnectionsHeld).
			break
		}
		for e := p.conns.Front(); e != nil; e = e.Next() {
			if c := e.Value.(*apiConn); c != newest && c.waits() && !c.unread() {
				return c
			}
		}
	}
	// None keeps the server waiting for a request: the one whose client
	// has left an answer unread longest, if it has for stalledWrite.
	now := time.Now()
	var stalled *apiConn
	for _, p := range cs.peers {
		for e := p.conns.Front(); e != nil; e = e.Next() {
			if c := e.Value.(*apiConn); c != newest && c.stalled(now) && (stalled == nil || c.writing.Before(stalled.writing)) {
				stalled = c
			}
		}
	}
	return stalled
}

// listener applies the limit to what net/http accepts.
type listener struct {
	net.Listener
	s *Server
}

func (l *listener) Accept() (net.Conn, error) {
	nc, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	c, err := l.s.conns.admit(l.s, nc)
	if err != nil {
		return nil, err
	}
	return c, nil
}

// Close closes the listener and ends an Accept waiting for a place.
func (l *listener) Close() error {
	err := l.Listener.Close()
	l.s.mu.Lock()
	l.s.conns.lnGone = true
	l.s.conns.cond.Broadcast()
	l.s.mu.Unlock()
	return err
}

// Limit describes the connection limit for GET /v1/info.
func (s ConnStats) Limit() LimitInfo {
	return LimitInfo{Name: "api.connections", Max: s.Max, InUse: s.Open, Peak: s.Peak,
		Events: map[string]uint64{"closed": s.Closed, "waited": s.Waited}}
}
