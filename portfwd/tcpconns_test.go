package portfwd

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gonetns/gonetns/port"
)

// fakeClock is a tcpTable's clock that moves only when told.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

// clientConn connects to a published port from address from (port 0), and
// checks that the connection is relayed with a byte echoed.
func clientConn(t *testing.T, from netip.Addr, st port.Status) (net.Conn, error) {
	t.Helper()
	d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(from, 0)), Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", hostAddr(st))
	if err != nil {
		return nil, err
	}
	if err := echoes(c); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// echoes sends a byte and reads it back.
func echoes(c net.Conn) error {
	c.SetDeadline(time.Now().Add(5 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := c.Write([]byte("x")); err != nil {
		return err
	}
	_, err := io.ReadFull(c, make([]byte, 1))
	return err
}

// isReset: the relay reset c (or closed it), as a read shows.
func isReset(c net.Conn) bool {
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := c.Read(make([]byte, 1))
	return err != nil && !errors.Is(err, os.ErrDeadlineExceeded)
}

// waitMoved waits until the relays of m's published TCP connections have
// counted want bytes between them. A relay adds what it wrote to its
// count after the write, so a client can read an echo before the count
// shows it; a test that moves the clock must wait for the counts first,
// or a late add stamps a connection active at the wrong time.
func waitMoved(t *testing.T, m *Manager, want int64) {
	t.Helper()
	var got int64
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		m.tcp.mu.Lock()
		got = 0
		for _, c := range m.tcp.clients {
			for r := range c.relays {
				got += r.moved()
			}
		}
		m.tcp.mu.Unlock()
		if got == want {
			return
		}
	}
	t.Fatalf("the relays counted %d bytes moved after 5 s; want %d", got, want)
}

// TestTCPShare: alone, a client may take the whole budget; a second
// client then takes places from it, each time from its least recently
// active connection, until both hold half; beyond that both are reset.
func TestTCPShare(t *testing.T) {
	const budget = 8
	clock := &fakeClock{now: time.Unix(1e9, 0)}
	m := newTestManager(t, Config{MaxTCPConns: budget})
	m.tcp.now = clock.Now
	st := publishLoop(t, m, "tcp4", echoServer(t))
	a, b := netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("127.0.0.2")

	var as []net.Conn
	for i := range budget {
		c, err := clientConn(t, a, st)
		if err != nil {
			t.Fatalf("client A's connection %d, within the budget: %v", i, err)
		}
		defer c.Close()
		as = append(as, c)
	}
	if c, err := clientConn(t, a, st); err == nil {
		c.Close()
		t.Fatalf("client A got a connection beyond the budget while alone")
	}
	// All of A's connections but the fourth move data later (a sweep in
	// between, as every minute with the default timeout).
	waitMoved(t, m, 2*budget) // each echoed a byte
	m.resetIdle()
	clock.Add(time.Minute)
	for i, c := range as {
		if i != 3 {
			if err := echoes(c); err != nil {
				t.Fatalf("client A's connection %d: %v", i, err)
			}
		}
	}
	waitMoved(t, m, 2*budget+2*(budget-1))
	var bs []net.Conn
	for i := range budget / 2 {
		c, err := clientConn(t, b, st)
		if err != nil {
			t.Fatalf("client B's connection %d, while A holds %d: %v", i, budget-i, err)
		}
		defer c.Close()
		bs = append(bs, c)
		if i == 0 && !isReset(as[3]) {
			t.Fatalf("client B's first connection displaced another than A's least active one")
		}
	}
	if c, err := clientConn(t, b, st); err == nil {
		c.Close()
		t.Fatalf("client B got more than half the budget while A holds the rest")
	}
	if c, err := clientConn(t, a, st); err == nil {
		c.Close()
		t.Fatalf("client A got a connection back while B holds as many")
	}
	open := 0
	for _, c := range append(as, bs...) {
		if echoes(c) == nil {
			open++
		}
	}
	s := m.TCPStats()
	t.Logf("%+v", s)
	if open != budget || s.Open != budget || s.Preempted != budget/2 || s.Reset != 3 || s.Clients != 2 {
		t.Errorf("%d connections still relayed, stats %+v; want %d open, %d preempted, 3 reset, 2 clients", open, s, budget, budget/2)
	}
}

// TestTCPIdleTimeout: a connection that moves nothing for the timeout is
// reset; one that moved data within it is not.
func TestTCPIdleTimeout(t *testing.T) {
	clock := &fakeClock{now: time.Unix(1e9, 0)}
	m := newTestManager(t, Config{TCPIdleTimeout: time.Hour})
	m.tcp.now = clock.Now
	// As the sweep does: every sweepInterval (a minute here).
	advance := func(d time.Duration) {
		for step := sweepInterval(time.Hour); d > 0; d -= step {
			clock.Add(min(step, d))
			m.resetIdle()
		}
	}
	st := publishLoop(t, m, "tcp4", echoServer(t))
	idle, err := clientConn(t, ip4, st)
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	busy, err := clientConn(t, ip4, st)
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	waitMoved(t, m, 4)

	advance(40 * time.Minute)
	if err := echoes(busy); err != nil {
		t.Fatal(err)
	}
	waitMoved(t, m, 6)
	advance(30 * time.Minute) // idle: 70 min; busy: 30 min
	if !isReset(idle) {
		t.Fatal("a connection idle for 70 minutes is still relayed, with a timeout of an hour")
	}
	if err := echoes(busy); err != nil {
		t.Fatalf("a connection that moved data 30 minutes ago was reset: %v", err)
	}
	waitMoved(t, m, 6) // busy's alone now
	if s := m.TCPStats(); s.IdleClosed != 1 || s.Open != 1 {
		t.Errorf("stats %+v; want 1 closed idle, 1 open", s)
	}
	advance(62 * time.Minute)
	if !isReset(busy) {
		t.Fatal("a connection idle for 62 minutes is still relayed")
	}
	if s := m.TCPStats(); s.IdleClosed != 2 || s.Open != 0 {
		t.Errorf("stats %+v; want 2 closed idle, none open", s)
	}
}

// TestTCPIdleTimeoutSweeps: the sweep runs by itself; with a timeout of
// 300 ms an idle connection is reset, and its client sees it.
func TestTCPIdleTimeoutSweeps(t *testing.T) {
	m := newTestManager(t, Config{TCPIdleTimeout: 300 * time.Millisecond})
	st := publishLoop(t, m, "tcp4", echoServer(t))
	c, err := clientConn(t, ip4, st)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	_, err = c.Read(make([]byte, 1))
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("an idle connection, read: %v; want a reset", err)
	}
	if s := m.TCPStats(); s.IdleClosed != 1 {
		t.Errorf("stats %+v; want 1 closed idle", s)
	}
}

// A negative TCPIdleTimeout keeps idle connections for ever: no sweep.
func TestTCPIdleTimeoutOff(t *testing.T) {
	clock := &fakeClock{now: time.Unix(1e9, 0)}
	m := newTestManager(t, Config{TCPIdleTimeout: -1})
	m.tcp.now = clock.Now
	st := publishLoop(t, m, "tcp4", echoServer(t))
	c, err := clientConn(t, ip4, st)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	waitMoved(t, m, 2)
	clock.Add(1000 * time.Hour)
	m.resetIdle()
	if err := echoes(c); err != nil {
		t.Fatalf("with no idle timeout, a connection idle for 1000 hours: %v", err)
	}
}

func TestClientKey(t *testing.T) {
	for _, tc := range []struct{ addr, want string }{
		{"127.0.0.1", "127.0.0.1/32"},
		{"::ffff:192.0.2.7", "192.0.2.7/32"},
		{"2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"},
		{"2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"},
		{"fe80::1%eth0", "fe80::/64"},
		{"::1", "::/64"},
	} {
		if got := clientKey(netip.MustParseAddr(tc.addr)); got.String() != tc.want {
			t.Errorf("clientKey(%s) = %v, want %s", tc.addr, got, tc.want)
		}
	}
}
