package portfwd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/gonetns/gonetns/internal/backoff"
	"github.com/gonetns/gonetns/internal/limitlog"
	"github.com/gonetns/gonetns/port"
	"github.com/gonetns/gonetns/relay"
)

// tcpPort is one published TCP port: a host listener and its accept loop.
type tcpPort struct {
	m          *Manager
	id         int
	spec       port.Spec
	child      netip.AddrPort
	log        *slog.Logger
	ln         *net.TCPListener
	full       limitlog.Warner // connections reset at MaxTCPConns
	share      limitlog.Warner // connections displaced for a client holding fewer
	acceptFail limitlog.Warner

	quit     chan struct{} // closed by stop
	done     chan struct{} // closed when the accept loop has returned
	stopOnce sync.Once
	stopErr  error
}

func (m *Manager) listenTCP(ctx context.Context, id int, spec port.Spec) (*tcpPort, error) {
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, spec.ListenNetwork(), hostPort(spec.ListenAddr()))
	if err != nil {
		return nil, err
	}
	p := &tcpPort{
		m:     m,
		id:    id,
		spec:  spec,
		child: spec.ChildAddr(),
		log:   m.log.With("port_id", id, "proto", spec.Proto),
		ln:    ln.(*net.TCPListener),
		quit:  make(chan struct{}),
		done:  make(chan struct{}),
	}
	m.wg.Go(p.serve)
	m.sweepIdle()
	return p, nil
}

func (p *tcpPort) status() port.Status { return port.Status{ID: p.id, Spec: p.spec} }

func (p *tcpPort) stop() error {
	p.stopOnce.Do(func() {
		close(p.quit)
		if err := p.ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			p.stopErr = err
		}
		<-p.done
	})
	return p.stopErr
}

func (p *tcpPort) serve() {
	defer close(p.done)
	var retry backoff.Backoff
	for {
		c, err := p.ln.AcceptTCP()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of descriptors and the like: wait rather than spin. The
			// budget (MaxTCPConns) is meant to keep this from happening.
			p.acceptFail.Warn(p.log, "portfwd: accept failed, retrying", "err", err)
			if !retry.Wait(p.quit) {
				return
			}
			continue
		}
		retry.Reset()
		r := &tcpRelay{p: p, outer: c}
		client := c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr()
		displaced, ok := p.m.tcp.admit(r, clientKey(client))
		if displaced != nil {
			displaced.abort()
			p.share.Warn(p.log, "portfwd: the published ports' connections are all taken; resetting the least active connection of the client holding the most, for a client holding fewer",
				"limit", p.m.cfg.MaxTCPConns, "client", displaced.outer.RemoteAddr().String(), "for", client.String())
		}
		if !ok {
			// Over MaxTCPConns and this client holds its share (or Close
			// has begun): refuse visibly (RST) instead of leaving it in
			// the backlog with no idea when it will be served.
			relay.Reset(c)
			p.full.Warn(p.log, "portfwd: too many connections on the published ports, resetting new ones from clients holding their share; raise the open-files limit (ulimit -Hn) if this is expected",
				"limit", p.m.cfg.MaxTCPConns, "client", client.String())
			continue
		}
		// Safe against Close's Wait: this loop is itself counted in m.wg.
		p.m.wg.Go(func() {
			defer p.m.tcp.release(r)
			r.run()
		})
	}
}

// tcpRelay is one accepted connection and its counterpart in the
// namespace: dialing, then relaying (package relay owns the rules).
type tcpRelay struct {
	p     *tcpPort
	outer *net.TCPConn // accepted on the host

	slot tcpSlot // under the Manager's tcpTable.mu

	mu      sync.Mutex
	rl      *relay.Relay // nil while dialing
	aborted bool
}

// moved is the bytes relayed so far, both ways (0 while dialing).
func (r *tcpRelay) moved() int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.rl == nil {
		return 0
	}
	return r.rl.Moved()
}

// abort resets both connections (RST to both peers); run then returns
// soon.
func (r *tcpRelay) abort() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.aborted {
		return
	}
	r.aborted = true
	if r.rl != nil {
		r.rl.Abort()
	} else {
		relay.Reset(r.outer)
	}
}

func (r *tcpRelay) run() {
	p := r.p
	start := time.Now()
	log := p.log.With("client", r.outer.RemoteAddr().String(), "child", p.child.String())

	ctx, cancel := context.WithTimeout(p.m.ctx, p.m.cfg.DialTimeout)
	c, err := p.m.cfg.Dialer.Dial(ctx, "tcp", p.child, p.m.source(r.outer.RemoteAddr().(*net.TCPAddr).AddrPort()))
	cancel()
	if err != nil {
		// Refused (or unreachable) inside: refuse the client at once with
		// an RST, as a closed port on the host would.
		r.abort()
		log.Debug("portfwd: tcp connection failed inside the namespace, reset", "err", err, "duration", time.Since(start))
		return
	}
	// Both ends must be *net.TCPConn, unwrapped, for splice(2).
	inner, ok := c.(*net.TCPConn)
	if !ok {
		c.Close()
		r.abort()
		log.Warn("portfwd: the ChildDialer returned no *net.TCPConn for tcp; resetting", "type", fmt.Sprintf("%T", c))
		return
	}
	rl := relay.Sockets(r.outer, inner, p.m.pipes)
	r.mu.Lock()
	if r.aborted {
		r.mu.Unlock()
		relay.Reset(inner)
		return
	}
	r.rl = rl
	r.mu.Unlock()
	log.Debug("portfwd: tcp connection", "duration", time.Since(start))
	res := rl.Run()
	log.Debug("portfwd: tcp connection ended", "bytes_to_child", res.AToB, "bytes_from_child", res.BToA,
		"duration", time.Since(start), "err", res.Err)
}
