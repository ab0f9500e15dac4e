package portfwd

import (
	"net/netip"
	"sync"
	"time"

	"github.com/gonetns/gonetns/relay"
)

// The published ports' TCP connections: one budget for all ports
// (Config.MaxTCPConns, from the descriptor budget), shared among clients,
// and an idle timeout.
//
// The share. A client is a source address: an IPv4 address, or an IPv6
// /64 (the addresses one host picks for itself). Alone, a client may use
// the whole budget. When the budget is full and a connection arrives, its
// client takes a place from the client holding the most connections if it
// holds at least two fewer: that client's least recently active
// connection is reset (RST both ways) and the new one relayed. Otherwise
// the new connection is reset at once. Repeated, this is max-min
// fairness: with k clients asking for more, each ends with about 1/k of
// the budget, and none can keep another out by holding connections open,
// idle or not. Local clients are all 127.0.0.1 (or ::1) unless they bind
// another loopback address: one client, as far as the share can tell.
//
// The idle timeout. A connection that has moved no byte either way for
// Config.TCPIdleTimeout is reset. Nothing is spent on it while data moves:
// a sweep, every eighth of the timeout and at least once a minute,
// compares each relay's byte count (relay.Relay.Moved, an atomic add per
// write) with the count it saw the time before; a count that moved stamps
// the connection active, at that sweep, up to an eighth after the byte.
// So a connection is reset between the timeout and a quarter more after
// its last byte (3.05-3.71 s with a 3 s timeout). TCP keep-alive probes carry no data:
// they keep the peers' kernels from dropping a connection, not this
// timeout.

// TCPStats is what the published ports' TCP connections are, and what
// their limits have done since the Manager started.
type TCPStats struct {
	// Open is the connections relayed or being dialed; Max the budget;
	// Peak the most open at once; Clients the client addresses holding
	// connections now.
	Open, Max, Peak, Clients int
	// IdleTimeout is TCPIdleTimeout; 0 for none.
	IdleTimeout time.Duration
	// Reset counts connections reset at once: the budget was full and
	// their client held as many as any other, or one fewer.
	Reset uint64
	// Preempted counts connections reset to give their place to a client
	// holding at least two fewer.
	Preempted uint64
	// IdleClosed counts connections reset after moving nothing for the
	// idle timeout.
	IdleClosed uint64
}

// tcpTable is the relayed connections of all published ports, by client.
type tcpTable struct {
	max  int
	idle time.Duration    // 0: no idle timeout
	now  func() time.Time // time.Now; tests move it

	mu      sync.Mutex
	clients map[netip.Prefix]*tcpClient
	closing bool // Close has begun: nothing more is admitted
	seq     uint64
	stats   TCPStats
}

// tcpClient is one client address's connections.
type tcpClient struct {
	key    netip.Prefix
	relays map[*tcpRelay]struct{}
}

// tcpSlot is what the table keeps of a relay, under tcpTable.mu.
type tcpSlot struct {
	client *tcpClient // nil once the relay is out of the table
	seq    uint64     // admission order: the older goes first on a tie
	seen   int64      // relay.Moved at the last look
	active time.Time  // when seen last changed, or admission
}

func newTCPTable(max int, idle time.Duration) *tcpTable {
	return &tcpTable{max: max, idle: idle, now: time.Now, clients: make(map[netip.Prefix]*tcpClient), stats: TCPStats{Max: max}}
}

// clientKey is the client a published port's connection or UDP flow is
// counted for, in the shares of the budgets: an IPv4 address, or the /64
// an IPv6 host picks its addresses from.
func clientKey(a netip.Addr) netip.Prefix {
	a = a.Unmap()
	if a.Is4() {
		return netip.PrefixFrom(a, 32)
	}
	p, _ := a.WithZone("").Prefix(64)
	return p
}

// admit takes a place for r, whose client is key. It returns false when r
// must be reset instead (the budget is full and r's client holds its
// share, or Close has begun), and the relay r displaces, if any, which the
// caller resets.
func (t *tcpTable) admit(r *tcpRelay, key netip.Prefix) (displaced *tcpRelay, ok bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closing {
		return nil, false
	}
	c := t.clients[key]
	if t.stats.Open >= t.max {
		held := 0
		if c != nil {
			held = len(c.relays)
		}
		big := t.biggestLocked()
		if big == nil || len(big.relays) < held+2 {
			t.stats.Reset++
			return nil, false
		}
		displaced = t.leastActiveLocked(big)
		t.removeLocked(displaced)
		t.stats.Preempted++
	}
	if c == nil {
		c = &tcpClient{key: key, relays: make(map[*tcpRelay]struct{})}
		t.clients[key] = c
	}
	t.seq++
	r.slot = tcpSlot{client: c, seq: t.seq, active: t.now()}
	c.relays[r] = struct{}{}
	t.stats.Open++
	t.stats.Peak = max(t.stats.Peak, t.stats.Open)
	return displaced, true
}

// release gives r's place back when its relay has ended (unless it was
// displaced or swept already).
func (t *tcpTable) release(r *tcpRelay) {
	t.mu.Lock()
	t.removeLocked(r)
	t.mu.Unlock()
}

func (t *tcpTable) removeLocked(r *tcpRelay) {
	c := r.slot.client
	if c == nil {
		return
	}
	r.slot.client = nil
	delete(c.relays, r)
	if len(c.relays) == 0 {
		delete(t.clients, c.key)
	}
	t.stats.Open--
}

// biggestLocked is the client holding the most connections (the lowest
// address on a tie), or nil.
func (t *tcpTable) biggestLocked() *tcpClient {
	var big *tcpClient
	for _, c := range t.clients {
		if big == nil || len(c.relays) > len(big.relays) ||
			len(c.relays) == len(big.relays) && c.key.Addr().Less(big.key.Addr()) {
			big = c
		}
	}
	return big
}

// leastActiveLocked is c's connection that moved data the longest ago
// (the oldest on a tie), its stamps brought up to now first.
func (t *tcpTable) leastActiveLocked(c *tcpClient) *tcpRelay {
	now := t.now()
	var least *tcpRelay
	for r := range c.relays {
		t.lookLocked(r, now)
		if least == nil || r.slot.active.Before(least.slot.active) ||
			r.slot.active.Equal(least.slot.active) && r.slot.seq < least.slot.seq {
			least = r
		}
	}
	return least
}

// lookLocked stamps r active at now if it has moved data since the last
// look.
func (t *tcpTable) lookLocked(r *tcpRelay, now time.Time) {
	if n := r.moved(); n != r.slot.seen {
		r.slot.seen = n
		r.slot.active = now
	}
}

// sweepInterval is how often the idle timeout is checked: an eighth of
// it, at least once a minute and at most ten times a second.
func sweepInterval(idle time.Duration) time.Duration {
	return min(max(idle/8, 100*time.Millisecond), time.Minute)
}

// sweep takes the connections idle for the timeout out of the table and
// returns them, for the caller to reset.
func (t *tcpTable) sweep() []*tcpRelay {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.idle <= 0 || t.closing {
		return nil
	}
	now := t.now()
	var idle []*tcpRelay
	for _, c := range t.clients {
		for r := range c.relays {
			t.lookLocked(r, now)
			if now.Sub(r.slot.active) >= t.idle {
				idle = append(idle, r)
			}
		}
	}
	for _, r := range idle {
		t.removeLocked(r)
	}
	t.stats.IdleClosed += uint64(len(idle))
	return idle
}

// busy reports whether a relay in the table has moved bytes within quiet
// of now (each looked at now), or holds bytes its client has not yet
// acknowledged: Manager.Sending.
func (t *tcpTable) busy(now time.Time, quiet time.Duration) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, c := range t.clients {
		for r := range c.relays {
			t.lookLocked(r, now)
			if now.Sub(r.slot.active) < quiet || relay.Unsent(r.outer) > 0 {
				return true
			}
		}
	}
	return false
}

// close stops admitting and returns every relay, for Close to reset.
func (t *tcpTable) close() []*tcpRelay {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.closing = true
	var all []*tcpRelay
	for _, c := range t.clients {
		for r := range c.relays {
			all = append(all, r)
		}
	}
	return all
}

func (t *tcpTable) statsNow() TCPStats {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := t.stats
	s.Clients = len(t.clients)
	s.IdleTimeout = t.idle
	return s
}
