package portfwd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/backoff"
	"github.com/gonetns/gonetns/internal/flowtable"
	"github.com/gonetns/gonetns/internal/limitlog"
	"github.com/gonetns/gonetns/port"
)

const (
	// maxQueued bounds the datagrams a new flow holds while its socket in
	// the namespace is being dialed; more are dropped.
	maxQueued = 16
	// maxQueuedBytes bounds the bytes all of a port's new flows hold while
	// dialing, so that a burst of new clients with large datagrams cannot
	// grow the parent without limit (16 x 64 KiB per flow would be 64 MiB
	// per 1,000 flows); beyond it, datagrams of dialing flows are dropped.
	maxQueuedBytes = 1 << 20
	// maxBurst is how many replies one flow passes on in a row before the
	// poller turns to the others (its socket stays ready: epoll is level
	// triggered), as nat's UDP flows.
	maxBurst = 64
)

// The published ports' UDP flows live in one flowtable.Table of the
// Manager (one cap, MaxUDPFlows, for all ports, shared among clients: a
// full table closes the idlest flow of the client holding the most) and
// are read by one flowtable.Poller: a flow costs a socket in the namespace
// and a small struct, no goroutine and no buffer of its own, so memory
// follows the cap, not the traffic. The expiry of idle flows
// (UDPIdleTimeout) runs on a goroutine of its own; both start with the
// first UDP port.

// udpKey names a flow: the port, the client, and the host address it sent
// to (zero unless the port listens on the unspecified address).
type udpKey struct {
	port   int
	client netip.AddrPort
	local  netip.Addr
}

// clientOf is the client a flow's share of the table is counted for, as
// for TCP connections (clientKey).
func clientOf(k udpKey) any { return clientKey(k.client.Addr()) }

// udpFlows starts the poller and the expiry of the Manager's UDP flows,
// once.
func (m *Manager) udpFlows() (*flowtable.Poller, error) {
	m.udpOnce.Do(func() {
		p, err := flowtable.NewPoller()
		if err != nil {
			m.udpErr = fmt.Errorf("udp flows: %w", err)
			return
		}
		m.udpPoll = p
		m.wg.Go(p.Run)
		every := min(max(m.cfg.UDPIdleTimeout/8, 10*time.Millisecond), time.Second)
		m.wg.Go(func() {
			flowtable.ExpireEvery(m.ctx, every, time.Now, func(n int) {
				m.log.Debug("portfwd: udp flows idle, ended", "count", n, "idle_timeout", m.cfg.UDPIdleTimeout)
			}, m.udpWake, m.udp)
		})
	})
	return m.udpPoll, m.udpErr
}

// UDPStats is what the published ports' UDP flows are, and what their
// limits have done since the Manager started: Flows of Max (the flows'
// cap, MaxUDPFlows), the Peak, the flows Evicted for new ones when the cap
// was reached, and those Expired after UDPIdleTimeout.
func (m *Manager) UDPStats() flowtable.Stats { return m.udp.Stats() }

// udpPort is one published UDP port: a host socket and a flow per client
// address, each with its own connected socket in the namespace, so that
// replies go back to the client that caused them, from the host address
// the client sent to.
type udpPort struct {
	m     *Manager
	id    int
	spec  port.Spec
	child netip.AddrPort
	log   *slog.Logger
	conn  *net.UDPConn    // host side
	ctx   context.Context // ends at stop: aborts flow dials
	full  limitlog.Warner // flows evicted for new ones
	// pktinfo is the host socket's family (AF_INET or AF_INET6) when it
	// listens on the unspecified address and so learns each datagram's
	// destination (IP_PKTINFO); 0 otherwise.
	pktinfo int
	queued  atomic.Int64 // bytes in all flows' queues

	mu     sync.Mutex
	closed bool // no new flows

	cancel   context.CancelFunc
	done     chan struct{} // closed when the read loop has returned
	stopOnce sync.Once
	stopErr  error
}

func (m *Manager) listenUDP(ctx context.Context, id int, spec port.Spec) (*udpPort, error) {
	if _, err := m.udpFlows(); err != nil {
		return nil, err
	}
	var lc net.ListenConfig
	pc, err := lc.ListenPacket(ctx, spec.ListenNetwork(), hostPort(spec.ListenAddr()))
	if err != nil {
		return nil, err
	}
	conn := pc.(*net.UDPConn)
	var family int
	if a := spec.ListenAddr().Addr(); !a.IsValid() || a.IsUnspecified() {
		if family, err = enablePktinfo(conn); err != nil {
			conn.Close()
			return nil, fmt.Errorf("ask for the destination of datagrams (so that replies leave from the address clients sent to): %w", err)
		}
	}
	pctx, cancel := context.WithCancel(m.ctx)
	p := &udpPort{
		m:       m,
		id:      id,
		spec:    spec,
		child:   spec.ChildAddr(),
		log:     m.log.With("port_id", id, "proto", spec.Proto),
		conn:    conn,
		ctx:     pctx,
		pktinfo: family,
		cancel:  cancel,
		done:    make(chan struct{}),
	}
	m.wg.Go(p.serve)
	return p, nil
}

func (p *udpPort) status() port.Status { return port.Status{ID: p.id, Spec: p.spec} }

// stop closes the host socket and ends every flow.
func (p *udpPort) stop() error {
	p.stopOnce.Do(func() {
		p.cancel()
		p.mu.Lock()
		p.closed = true
		p.mu.Unlock()
		if err := p.conn.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			p.stopErr = err
		}
		<-p.done
		p.m.udp.CloseIf(func(k udpKey) bool { return k.port == p.id })
	})
	return p.stopErr
}

func (p *udpPort) serve() {
	defer close(p.done)
	buf := make([]byte, flowtable.DatagramMax)
	oob := make([]byte, pktinfoSpace)
	retry := backoff.Backoff{Min: time.Millisecond, Max: 100 * time.Millisecond}
	for {
		n, oobn, _, client, err := p.conn.ReadMsgUDPAddrPort(buf, oob)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			p.log.Debug("portfwd: udp read failed", "err", err)
			if !retry.Wait(p.ctx.Done()) {
				return
			}
			continue
		}
		retry.Reset()
		key := udpKey{port: p.id, client: client}
		if p.pktinfo != 0 {
			key.local = pktinfoDst(oob[:oobn])
		}
		if f := p.flow(key); f != nil {
			f.toChild(buf[:n])
		}
	}
}

// flow returns the flow for key, creating it (and starting its dial) if
// needed; nil when the port is stopping.
func (p *udpPort) flow(key udpKey) *udpFlow {
	if f, ok := p.m.udp.Get(key); ok {
		return f
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil
	}
	f := &udpFlow{p: p, key: key, log: p.log.With("client", key.client.String(), "child", p.child.String())}
	if key.local.IsValid() {
		f.oob = pktinfoSource(p.pktinfo, key.local)
	}
	f.touch()
	if old, evicted := p.m.udp.Add(key, f); evicted {
		p.full.Warn(p.log, "portfwd: too many UDP flows on the published ports; closing the idlest flow of the client holding the most for each new one; raise MaxUDPFlows (the open-files limit) if this is expected",
			"limit", p.m.cfg.MaxUDPFlows, "evicted_client", old.key.client.String())
	}
	// Safe against Close's Wait: the read loop calling us is in m.wg.
	p.m.wg.Go(f.dial)
	return f
}

// udpFlow is one client address and its connected socket in the namespace.
type udpFlow struct {
	p    *udpPort
	key  udpKey
	oob  []byte // IP_PKTINFO for replies: from key.local; nil for the default
	log  *slog.Logger
	last atomic.Int64 // UnixNano of the last datagram either way
	sent atomic.Int64 // datagrams to the client

	mu     sync.Mutex
	conn   net.Conn        // nil while dialing
	rc     syscall.RawConn // conn's, for the poller's reads
	id     uint32          // the poller's, once conn is there
	queue  [][]byte        // datagrams that came while dialing
	closed bool
}

var (
	_ flowtable.Flow     = (*udpFlow)(nil)
	_ flowtable.Receiver = (*udpFlow)(nil)
)

func (f *udpFlow) touch() { f.last.Store(time.Now().UnixNano()) }

// LastActive is when a datagram last went through the flow, either way.
func (f *udpFlow) LastActive() time.Time { return time.Unix(0, f.last.Load()) }

// toChild forwards one datagram from the client (or queues it while the
// socket in the namespace is being dialed). b is reused by the caller.
func (f *udpFlow) toChild(b []byte) {
	f.touch()
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return
	}
	c := f.conn
	if c == nil {
		if len(f.queue) < maxQueued {
			if f.p.queued.Add(int64(len(b))) <= maxQueuedBytes {
				f.queue = append(f.queue, bytes.Clone(b))
			} else {
				f.p.queued.Add(-int64(len(b)))
			}
		}
		f.mu.Unlock()
		return
	}
	f.mu.Unlock()
	f.write(c, b)
}

func (f *udpFlow) write(c net.Conn, b []byte) {
	// ECONNREFUSED here reports an earlier datagram that nothing in the
	// namespace received; the flow stays, as the server may start later.
	if _, err := c.Write(b); err != nil && !errors.Is(err, net.ErrClosed) {
		f.log.Debug("portfwd: udp send to the namespace failed", "err", err)
	}
}

// dropQueue forgets the queued datagrams; f.mu is held.
func (f *udpFlow) dropQueue() {
	for _, b := range f.queue {
		f.p.queued.Add(-int64(len(b)))
	}
	f.queue = nil
}

// Close ends the flow: out of the poller, its socket closed. The table
// calls it (evicted, expired, its port stopped); a dial that failed too.
func (f *udpFlow) Close() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return
	}
	f.closed = true
	f.dropQueue()
	if f.conn != nil {
		f.p.m.udpPoll.Remove(f.id)
		f.conn.Close()
		f.log.Debug("portfwd: udp flow ended", "datagrams_to_client", f.sent.Load())
	}
}

// dial gets the flow's socket in the namespace (from the client's address,
// with SourceIPTransparent), sends what was queued meanwhile, and hands the
// socket to the poller. A flow whose dial fails goes: the client's next
// datagram tries again with a new one.
func (f *udpFlow) dial() {
	p := f.p
	start := time.Now()
	ctx, cancel := context.WithTimeout(p.ctx, p.m.cfg.DialTimeout)
	c, err := p.m.cfg.Dialer.Dial(ctx, "udp", p.child, p.m.source(f.key.client))
	cancel()
	fail := func(msg string, args ...any) {
		if c != nil {
			c.Close()
		}
		p.m.udp.Remove(f.key, f)
		f.Close()
		f.log.Debug(msg, args...)
	}
	if err != nil {
		fail("portfwd: udp flow cannot reach the namespace", "err", err)
		return
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		fail("portfwd: the ChildDialer returned a UDP connection without a descriptor; dropping the flow", "type", fmt.Sprintf("%T", c))
		return
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		fail("portfwd: udp flow", "err", err)
		return
	}
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		c.Close()
		return
	}
	for _, b := range f.queue { // in order, before any newer datagram
		f.write(c, b)
	}
	f.dropQueue()
	f.rc = rc // before the poller may call Receive
	var addErr error
	if err := errors.Join(rc.Control(func(fd uintptr) { f.id, addErr = p.m.udpPoll.Add(int(fd), f) }), addErr); err != nil {
		f.mu.Unlock()
		fail("portfwd: udp flow: cannot watch its socket", "err", err)
		return
	}
	f.conn = c
	f.mu.Unlock()
	f.log.Debug("portfwd: udp flow", "duration", time.Since(start), "local", c.LocalAddr().String())
}

// Receive passes the replies waiting on the flow's socket to the client,
// up to maxBurst, reading into the poller's buffer.
func (f *udpFlow) Receive(buf []byte) {
	for range maxBurst {
		var n int
		var rerr error
		if err := f.rc.Read(func(fd uintptr) bool {
			n, rerr = unix.Read(int(fd), buf)
			return true // never wait: the poller says when there is more
		}); err != nil {
			return // closed
		}
		switch {
		case rerr == nil:
		case errors.Is(rerr, unix.EAGAIN):
			return
		case errors.Is(rerr, unix.ECONNREFUSED), errors.Is(rerr, unix.EINTR):
			continue // an ICMP port unreachable: nothing listens (yet)
		default:
			f.log.Debug("portfwd: udp flow read failed", "err", rerr)
			return
		}
		f.touch()
		if err := f.p.sendToClient(buf[:n], f); err != nil && !errors.Is(err, net.ErrClosed) {
			f.log.Debug("portfwd: udp send to the client failed", "err", err)
		}
		f.sent.Add(1)
	}
}

// sendToClient sends b to f's client from the host address it sent to.
func (p *udpPort) sendToClient(b []byte, f *udpFlow) error {
	if f.oob == nil {
		_, err := p.conn.WriteToUDPAddrPort(b, f.key.client)
		return err
	}
	_, _, err := p.conn.WriteMsgUDPAddrPort(b, f.oob, f.key.client)
	return err
}
