package tcpfast

import (
	"net/netip"
	"slices"
	"testing"

	"golang.org/x/sys/unix"
)

// TestSpareConn: a closed connection's conn becomes the next connection's,
// which works as a new one (an id of its own, its own sequence numbers, its
// bytes to its own host socket), and a poller event still naming the
// closed connection does not reach the new one. ReleaseMemory lets the
// spare conns go.
func TestSpareConn(t *testing.T) {
	h := newFuzzHarness(t)
	defer h.close()
	first := h.e.lookup(key{h.src, h.dst})
	if first == nil {
		t.Fatal("no connection")
	}
	h.send(flagACK, h.irs+1, h.iss+1, 1000, 100, false)
	if !waitFor(func() bool { return h.received.Load() == 100 }) {
		t.Fatalf("the host got %d bytes of 100", h.received.Load())
	}
	first.mu.Lock()
	oldID, oldGen := first.id, first.gen
	first.mu.Unlock()
	h.send(flagRST, h.irs+101, 0, 0, 0, false)
	if !waitFor(func() bool { return h.e.lookup(key{h.src, h.dst}) == nil }) {
		t.Fatal("the sandbox's reset did not close the connection")
	}
	h.e.mu.RLock()
	kept := slices.Contains(h.e.spare, first)
	h.e.mu.RUnlock()
	if !kept {
		t.Fatal("the closed connection's conn was not kept for the next one")
	}

	// The next connection, from another port, with other numbers.
	h.src, h.irs = netip.MustParseAddrPort("10.0.2.100:40001"), 5000
	h.send(flagSYN, h.irs, 0, 65535, 0, true)
	c := h.waitConn(func(c *conn) bool { return c.state == stSynAcked })
	if c == nil {
		t.Fatal("the second connection never sent its SYN-ACK")
	}
	if c != first {
		t.Fatal("the second connection got a new conn; want the spare one")
	}
	c.mu.Lock()
	id, gen := c.id, c.gen
	h.iss = c.iss
	fresh := c.rcvNxt == h.irs+1 && c.sndUna == c.iss && !c.finRcvd && c.queued == 0 && c.k.src == h.src
	c.mu.Unlock()
	if id == oldID || gen != oldGen+1 || !fresh {
		t.Fatalf("the spare conn as the second connection: id %d (was %d), gen %d (was %d), fresh state %v", id, oldID, gen, oldGen, fresh)
	}
	h.send(flagACK, h.irs+1, h.iss+1, 65535, 0, false)
	h.send(flagACK, h.irs+1, h.iss+1, 1000, 100, false)
	if h.waitConn(func(c *conn) bool { return c.state == stEstablished && c.rcvNxt == h.irs+101 && c.queued == 0 }) == nil {
		t.Fatal("the second connection's 100 bytes did not go to its host socket")
	}

	// An event of the first connection's socket, taken from the poller
	// before its close and handed over after the reuse.
	h.e.mu.Lock()
	h.e.byID[oldID] = c
	h.e.mu.Unlock()
	h.e.hostEvent(&unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP, Fd: int32(oldID)})
	h.e.mu.Lock()
	delete(h.e.byID, oldID)
	h.e.mu.Unlock()
	c.mu.Lock()
	rdhup := c.rdhup
	c.mu.Unlock()
	if rdhup {
		t.Error("an event of the closed connection's socket reached the connection its conn became")
	}

	h.e.ReleaseMemory()
	h.e.mu.RLock()
	n := len(h.e.spare)
	h.e.mu.RUnlock()
	if n != 0 {
		t.Errorf("after ReleaseMemory %d spare conns are kept; want none", n)
	}
}

// TestTimerOfAnEarlierConnection: a timer entry set for the connection a
// conn was before does not fire for the one it is now (run takes entries
// out before it locks their conns), and one set again for the new
// connection while the old entry was still in the heap fires.
func TestTimerOfAnEarlierConnection(t *testing.T) {
	var ts timers
	fired := 0
	ts.init(func(*conn, timerKind) { fired++ })
	c := &conn{}
	c.mu.Lock()
	ts.set(c, timerRetransmit, 0)
	c.gen++ // closed and made another connection, the entry left behind
	c.mu.Unlock()
	ts.run()
	if fired != 0 {
		t.Fatalf("the earlier connection's timer fired %d times for the new one", fired)
	}
	c.mu.Lock()
	ts.set(c, timerRetransmit, 0)
	c.gen++
	ts.set(c, timerRetransmit, 0)
	c.mu.Unlock()
	ts.run()
	if fired != 1 {
		t.Errorf("the timer set for the new connection over the old entry fired %d times, want 1", fired)
	}
	ts.close()
}
