package portfwd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/gonetns/gonetns/internal/backoff"
)

// tcpPort is one published TCP port: a host listener and its accept loop.
type tcpPort struct {
	m     *Manager
	id    int
	spec  Spec
	child netip.AddrPort
	log   *slog.Logger
	ln    *net.TCPListener
	slots chan struct{} // one per relay, MaxTCPConns in all
	full  limitWarner

	quit     chan struct{} // closed by stop
	done     chan struct{} // closed when the accept loop has returned
	stopOnce sync.Once
	stopErr  error
}

func (m *Manager) listenTCP(ctx context.Context, id int, spec Spec) (*tcpPort, error) {
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, spec.listenNetwork(), hostPort(spec.listenAddr()))
	if err != nil {
		return nil, err
	}
	p := &tcpPort{
		m:     m,
		id:    id,
		spec:  spec,
		child: spec.childAddr(),
		log:   m.log.With("port_id", id, "proto", spec.Proto),
		ln:    ln.(*net.TCPListener),
		slots: make(chan struct{}, m.cfg.MaxTCPConns),
		quit:  make(chan struct{}),
		done:  make(chan struct{}),
	}
	m.wg.Go(p.serve)
	return p, nil
}

func (p *tcpPort) status() Status { return Status{ID: p.id, Spec: p.spec} }

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
			// Out of descriptors and the like: wait rather than spin.
			p.log.Warn("portfwd: accept failed, retrying", "err", err)
			if !retry.Wait(p.quit) {
				return
			}
			continue
		}
		retry.Reset()
		select {
		case p.slots <- struct{}{}:
		default:
			// Over MaxTCPConns: refuse this one visibly (RST) instead of
			// leaving it in the backlog with no idea when it will be served.
			reset(c)
			p.full.warn(p.log, "portfwd: too many connections on a published port, resetting new ones; raise MaxTCPConns if this is expected",
				"limit", cap(p.slots))
			continue
		}
		r := &tcpRelay{p: p, outer: c}
		if !p.m.track(r) { // Close has begun
			reset(c)
			<-p.slots
			continue
		}
		// Safe against Close's Wait: this loop is itself counted in m.wg.
		p.m.wg.Go(func() {
			defer func() { <-p.slots }()
			defer p.m.untrack(r)
			r.run()
		})
	}
}

// tcpRelay is one accepted connection and its counterpart in the
// namespace.
type tcpRelay struct {
	p     *tcpPort
	outer *net.TCPConn // accepted on the host

	mu      sync.Mutex
	inner   *net.TCPConn // from the ChildDialer; nil while dialing
	aborted bool
}

// abort resets both connections (RST to both peers); the copies in
// progress then fail and run returns.
func (r *tcpRelay) abort() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.aborted {
		return
	}
	r.aborted = true
	reset(r.outer)
	if r.inner != nil {
		reset(r.inner)
	}
}

// reset closes c with an RST instead of a FIN.
func reset(c *net.TCPConn) {
	c.SetLinger(0)
	c.Close()
}

func (r *tcpRelay) run() {
	p := r.p
	start := time.Now()
	log := p.log.With("client", r.outer.RemoteAddr().String(), "child", p.child.String())

	ctx, cancel := context.WithTimeout(p.m.ctx, p.m.cfg.DialTimeout)
	c, err := p.m.cfg.Dialer.Dial(ctx, "tcp", p.child)
	cancel()
	if err != nil {
		// Refused (or unreachable) inside: refuse the client at once with
		// an RST, as a closed port on the host would.
		r.abort()
		log.Debug("portfwd: tcp connection failed inside the namespace, reset", "err", err, "duration", time.Since(start))
		return
	}
	inner, ok := c.(*net.TCPConn)
	if !ok {
		c.Close()
		r.abort()
		log.Warn("portfwd: the ChildDialer returned no *net.TCPConn for tcp; resetting", "type", fmt.Sprintf("%T", c))
		return
	}
	r.mu.Lock()
	if r.aborted {
		r.mu.Unlock()
		reset(inner)
		return
	}
	r.inner = inner
	r.mu.Unlock()
	log.Debug("portfwd: tcp connection", "duration", time.Since(start))

	var (
		wg      sync.WaitGroup
		up      int64
		upErr   error
		outer   = r.outer
		down    int64
		downErr error
	)
	wg.Go(func() { up, upErr = r.pipe(inner, outer) }) // waited for below; run itself is in m.wg
	down, downErr = r.pipe(outer, inner)
	wg.Wait()
	outer.Close()
	inner.Close()
	log.Debug("portfwd: tcp connection ended", "bytes_to_child", up, "bytes_from_child", down,
		"duration", time.Since(start), "err", errors.Join(upErr, downErr))
}

// pipe copies src to dst until src's EOF and passes the EOF on with
// CloseWrite, so the other direction keeps flowing (half-close). On an
// error in either socket (a reset, a broken pipe) it resets both, so the
// peers see the reset and the other direction ends too.
//
// io.Copy with two *net.TCPConn is splice(2) on Linux: io.Copy calls
// src.WriteTo(dst), which (dst not being a *net.UnixConn) falls back to
// io.Copy(dst, tcpConnWithoutWriteTo{src}); that calls dst.ReadFrom, whose
// spliceFrom accepts that wrapper and moves the data through a pipe in the
// kernel (net/splice_linux.go, internal/poll/splice_linux.go). That is why
// both ends are kept as *net.TCPConn, with nothing wrapped around them; the
// tests check the splice calls with strace.
func (r *tcpRelay) pipe(dst, src *net.TCPConn) (int64, error) {
	n, err := io.Copy(dst, src)
	if err == nil {
		err = dst.CloseWrite()
	}
	if err != nil {
		r.abort()
	}
	return n, err
}
