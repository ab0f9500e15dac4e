package portfwd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/limitlog"
	"github.com/gonetns/gonetns/internal/rawconn"
	"github.com/gonetns/gonetns/port"

	"github.com/gonetns/gonetns/internal/backoff"
)

const (
	// maxDatagram is the size of the receive buffers: the largest UDP
	// payload over IPv6 (65,527 bytes) fits, and over IPv4 it is 65,507.
	maxDatagram = 64 << 10
	// maxQueued bounds the datagrams a new flow holds while its socket in
	// the namespace is being dialed; more are dropped.
	maxQueued = 16
	// maxQueuedBytes bounds the bytes all of a port's new flows hold while
	// dialing, so that a burst of new clients with large datagrams cannot
	// grow the parent without limit (16 x 64 KiB per flow would be 64 MiB
	// per 1,000 flows); beyond it, datagrams of dialing flows are dropped.
	maxQueuedBytes = 1 << 20
)

// datagramPool holds the flows' receive buffers. A flow borrows one only
// while a datagram is being read and passed on, never while it waits, so
// memory follows the traffic, not the number of flows: each flow used to
// hold a 64 KiB buffer for its whole life, and cycling source ports up to
// the flow cap took the parent past 1 GB (issue 12). Unused buffers go
// back to the runtime at the next collections.
var datagramPool = sync.Pool{New: func() any { b := make([]byte, maxDatagram); return &b }}

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
	full  limitlog.Warner
	// pktinfo is the host socket's family (AF_INET or AF_INET6) when it
	// listens on the unspecified address and so learns each datagram's
	// destination (IP_PKTINFO); 0 otherwise.
	pktinfo int
	queued  atomic.Int64 // bytes in all flows' queues

	mu     sync.Mutex
	flows  map[flowKey]*udpFlow
	closed bool

	cancel   context.CancelFunc
	done     chan struct{} // closed when the read loop has returned
	stopOnce sync.Once
	stopErr  error
}

// flowKey names a flow: the client, and the host address it sent to
// (zero unless the port listens on the unspecified address).
type flowKey struct {
	client netip.AddrPort
	local  netip.Addr
}

func (m *Manager) listenUDP(ctx context.Context, id int, spec port.Spec) (*udpPort, error) {
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
		flows:   make(map[flowKey]*udpFlow),
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
		flows := p.flows
		p.flows = nil
		p.mu.Unlock()
		if err := p.conn.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			p.stopErr = err
		}
		<-p.done
		for _, f := range flows {
			f.close()
		}
	})
	return p.stopErr
}

func (p *udpPort) serve() {
	defer close(p.done)
	buf := make([]byte, maxDatagram)
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
		key := flowKey{client: client}
		if p.pktinfo != 0 {
			key.local = pktinfoDst(oob[:oobn])
		}
		if f := p.flow(key); f != nil {
			f.toChild(buf[:n])
		}
	}
}

// flow returns the flow for key, creating it (and starting its goroutine)
// if needed; nil when the port is stopping or at MaxUDPFlows.
func (p *udpPort) flow(key flowKey) *udpFlow {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil
	}
	if f := p.flows[key]; f != nil {
		return f
	}
	select {
	case p.m.udpSlots <- struct{}{}: // given back when run returns
	default:
		p.full.Warn(p.log, "portfwd: too many UDP flows on the published ports, dropping datagrams from new clients; raise MaxUDPFlows (the open-files limit) if this is expected",
			"limit", p.m.cfg.MaxUDPFlows)
		return nil
	}
	f := &udpFlow{p: p, key: key, log: p.log.With("client", key.client.String(), "child", p.child.String())}
	if key.local.IsValid() {
		f.oob = pktinfoSource(p.pktinfo, key.local)
	}
	f.touch()
	p.flows[key] = f
	// Safe against Close's Wait: the read loop calling us is in m.wg.
	p.m.wg.Go(f.run)
	return f
}

// udpFlow is one client address and its connected socket in the namespace.
type udpFlow struct {
	p          *udpPort
	key        flowKey
	oob        []byte // IP_PKTINFO for replies: from key.local; nil for the default
	log        *slog.Logger
	lastActive atomic.Int64 // UnixNano of the last datagram either way

	mu     sync.Mutex
	conn   net.Conn // nil while dialing
	queue  [][]byte // datagrams that came while dialing
	closed bool
}

func (f *udpFlow) touch() { f.lastActive.Store(time.Now().UnixNano()) }

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

// close ends the flow: its socket is closed, which ends run.
func (f *udpFlow) close() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = true
	f.dropQueue()
	if f.conn != nil {
		f.conn.Close()
	}
}

// run dials the flow's socket in the namespace (from the client's address,
// with SourceIPTransparent), then forwards replies to the client until the
// flow has been idle for UDPIdleTimeout.
func (f *udpFlow) run() {
	p := f.p
	start := time.Now()
	defer func() {
		p.mu.Lock()
		if p.flows[f.key] == f {
			delete(p.flows, f.key)
		}
		p.mu.Unlock()
		f.close()
		<-p.m.udpSlots
	}()

	ctx, cancel := context.WithTimeout(p.ctx, p.m.cfg.DialTimeout)
	c, err := p.m.cfg.Dialer.Dial(ctx, "udp", p.child, p.m.source(f.key.client))
	cancel()
	if err != nil {
		// The queued datagrams are dropped; the client's next one tries
		// again with a new flow.
		f.log.Debug("portfwd: udp flow cannot reach the namespace", "err", err)
		return
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		c.Close()
		f.log.Warn("portfwd: the ChildDialer returned a UDP connection without a descriptor; dropping the flow", "type", fmt.Sprintf("%T", c))
		return
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		c.Close()
		f.log.Debug("portfwd: udp flow", "err", err)
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
	f.conn = c
	f.mu.Unlock()
	f.log.Debug("portfwd: udp flow", "duration", time.Since(start), "local", c.LocalAddr().String())

	var sent, bytesSent int64
	idle := p.m.cfg.UDPIdleTimeout
	for {
		deadline := time.Unix(0, f.lastActive.Load()).Add(idle)
		if !time.Now().Before(deadline) {
			f.log.Debug("portfwd: udp flow idle, ending", "datagrams_to_client", sent, "bytes_to_client", bytesSent,
				"duration", time.Since(start))
			return
		}
		c.SetReadDeadline(deadline)
		n, err := f.relayReply(rc)
		switch {
		case err == nil:
		case errors.Is(err, os.ErrDeadlineExceeded):
			continue // the loop checks for idleness
		case errors.Is(err, syscall.ECONNREFUSED):
			continue // an ICMP port unreachable: nothing listens (yet)
		case errors.Is(err, net.ErrClosed):
			return
		default:
			f.log.Debug("portfwd: udp flow failed", "err", err)
			if errors.Is(err, errToClient) {
				continue
			}
			return
		}
		f.touch()
		sent++
		bytesSent += int64(n)
	}
}

// errToClient marks a failed send to the client (the flow goes on).
var errToClient = errors.New("send to the client")

// relayReply waits for one datagram on the flow's socket and sends it to
// the client, with a buffer from datagramPool held only from the moment
// the datagram is there until it has been sent.
func (f *udpFlow) relayReply(rc syscall.RawConn) (int, error) {
	var bp *[]byte
	n, err := rawconn.Read(rc, func(fd int) (int, error) {
		if bp == nil {
			bp = datagramPool.Get().(*[]byte)
		}
		n, err := unix.Read(fd, *bp)
		if err == unix.EAGAIN {
			datagramPool.Put(bp) // nothing yet: wait without a buffer
			bp = nil
		}
		return n, err
	})
	if bp != nil {
		defer datagramPool.Put(bp)
	}
	if err != nil {
		return 0, err
	}
	if err := f.p.sendToClient((*bp)[:n], f); err != nil {
		if errors.Is(err, net.ErrClosed) {
			return 0, err
		}
		return 0, fmt.Errorf("%w: %w", errToClient, err)
	}
	return n, nil
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
