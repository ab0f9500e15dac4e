package portfwd

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/gonetns/gonetns/internal/backoff"
)

const (
	// maxDatagram is the receive buffer: the largest UDP payload over IPv6
	// (65,527 bytes) fits, and over IPv4 it is 65,507.
	maxDatagram = 64 << 10
	// maxQueued bounds the datagrams a new flow holds while its socket in
	// the namespace is being dialed; more are dropped.
	maxQueued = 16
)

// udpPort is one published UDP port: a host socket and a flow per client
// address, each with its own connected socket in the namespace, so that
// replies go back to the client that caused them.
type udpPort struct {
	m     *Manager
	id    int
	spec  Spec
	child netip.AddrPort
	log   *slog.Logger
	conn  *net.UDPConn    // host side
	ctx   context.Context // ends at stop: aborts flow dials
	full  limitWarner

	mu     sync.Mutex
	flows  map[netip.AddrPort]*udpFlow
	closed bool

	cancel   context.CancelFunc
	done     chan struct{} // closed when the read loop has returned
	stopOnce sync.Once
	stopErr  error
}

func (m *Manager) listenUDP(ctx context.Context, id int, spec Spec) (*udpPort, error) {
	var lc net.ListenConfig
	pc, err := lc.ListenPacket(ctx, spec.listenNetwork(), hostPort(spec.listenAddr()))
	if err != nil {
		return nil, err
	}
	pctx, cancel := context.WithCancel(m.ctx)
	p := &udpPort{
		m:      m,
		id:     id,
		spec:   spec,
		child:  spec.childAddr(),
		log:    m.log.With("port_id", id, "proto", spec.Proto),
		conn:   pc.(*net.UDPConn),
		ctx:    pctx,
		cancel: cancel,
		flows:  make(map[netip.AddrPort]*udpFlow),
		done:   make(chan struct{}),
	}
	m.wg.Go(p.serve)
	return p, nil
}

func (p *udpPort) status() Status { return Status{ID: p.id, Spec: p.spec} }

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
	retry := backoff.Backoff{Min: time.Millisecond, Max: 100 * time.Millisecond}
	for {
		n, client, err := p.conn.ReadFromUDPAddrPort(buf)
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
		if f := p.flow(client); f != nil {
			f.toChild(buf[:n])
		}
	}
}

// flow returns client's flow, creating it (and starting its goroutine) if
// needed; nil when the port is stopping or at MaxUDPFlows.
func (p *udpPort) flow(client netip.AddrPort) *udpFlow {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil
	}
	if f := p.flows[client]; f != nil {
		return f
	}
	select {
	case p.m.udpSlots <- struct{}{}: // given back when run returns
	default:
		p.full.warn(p.log, "portfwd: too many UDP flows on the published ports, dropping datagrams from new clients; raise MaxUDPFlows (the open-files limit) if this is expected",
			"limit", p.m.cfg.MaxUDPFlows)
		return nil
	}
	f := &udpFlow{p: p, client: client, log: p.log.With("client", client.String(), "child", p.child.String())}
	f.touch()
	p.flows[client] = f
	// Safe against Close's Wait: the read loop calling us is in m.wg.
	p.m.wg.Go(f.run)
	return f
}

// udpFlow is one client address and its connected socket in the namespace.
type udpFlow struct {
	p          *udpPort
	client     netip.AddrPort
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
			f.queue = append(f.queue, bytes.Clone(b))
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

// close ends the flow: its socket is closed, which ends run.
func (f *udpFlow) close() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = true
	f.queue = nil
	if f.conn != nil {
		f.conn.Close()
	}
}

// run dials the flow's socket in the namespace, then forwards replies to
// the client until the flow has been idle for UDPIdleTimeout.
func (f *udpFlow) run() {
	p := f.p
	start := time.Now()
	defer func() {
		p.mu.Lock()
		if p.flows[f.client] == f {
			delete(p.flows, f.client)
		}
		p.mu.Unlock()
		f.close()
		<-p.m.udpSlots
	}()

	ctx, cancel := context.WithTimeout(p.ctx, p.m.cfg.DialTimeout)
	c, err := p.m.cfg.Dialer.Dial(ctx, "udp", p.child)
	cancel()
	if err != nil {
		// The queued datagrams are dropped; the client's next one tries
		// again with a new flow.
		f.log.Debug("portfwd: udp flow cannot reach the namespace", "err", err)
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
	f.queue = nil
	f.conn = c
	f.mu.Unlock()
	f.log.Debug("portfwd: udp flow", "duration", time.Since(start))

	var sent, bytesSent int64
	buf := make([]byte, maxDatagram)
	idle := p.m.cfg.UDPIdleTimeout
	for {
		deadline := time.Unix(0, f.lastActive.Load()).Add(idle)
		if !time.Now().Before(deadline) {
			f.log.Debug("portfwd: udp flow idle, ending", "datagrams_to_client", sent, "bytes_to_client", bytesSent,
				"duration", time.Since(start))
			return
		}
		c.SetReadDeadline(deadline)
		n, err := c.Read(buf)
		switch {
		case err == nil:
		case errors.Is(err, os.ErrDeadlineExceeded):
			continue // the loop checks for idleness
		case errors.Is(err, syscall.ECONNREFUSED):
			continue // an ICMP port unreachable: nothing listens (yet)
		default:
			if !errors.Is(err, net.ErrClosed) {
				f.log.Debug("portfwd: udp flow read failed", "err", err)
			}
			return
		}
		f.touch()
		if _, err := p.conn.WriteToUDPAddrPort(buf[:n], f.client); err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			f.log.Debug("portfwd: udp send to the client failed", "err", err)
			continue
		}
		sent++
		bytesSent += int64(n)
	}
}
