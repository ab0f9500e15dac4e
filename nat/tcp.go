package nat

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"time"

	"github.com/gonetns/gonetns/relay"
	"github.com/gonetns/gonetns/stack"
)

// HandleTCP forwards one connection of the sandbox: it dials the
// destination on the host first and completes the sandbox's handshake only
// when that succeeded, so a refused or unreachable destination is answered
// with a reset (ECONNREFUSED inside) instead of accept-then-close. Use it as
// stack.Config.TCP.
//
// The stack calls it on a new goroutine per connection. The dial, the
// handshake and the relay run deep call chains that grow a new
// goroutine's stack two or three times, each a copy (runtime.copystack:
// 6% of the parent's CPU in a connect/echo/close loop). So the
// connection goes to a goroutine that has forwarded one before and waits
// for another (at most maxIdleTCPWorkers wait, each for tcpWorkerIdle);
// when none waits, this goroutine forwards it and then waits itself.
func (n *NAT) HandleTCP(r *stack.TCPRequest) {
	select {
	case n.tcpWork <- r:
		return
	default:
	}
	n.forwardTCP(r)
	n.idleTCPWorker()
}

// Bounds of the goroutines kept for the next connections: enough for the
// connections a program opens one after another, released after a pause.
// The reason is the copystack share above (a profile, not a timing); a
// connect/echo/close loop did not tell 16 from 0 apart through the noise of
// this 2-core machine (median 1,339 against 1,585 conn/s, 3 interleaved
// rounds of 2,000 connections, ranges 1,176-1,633 and 1,533-1,861). The
// idle ones cost a parked goroutine each, 8 KiB of stack.
const (
	maxIdleTCPWorkers = 16
	tcpWorkerIdle     = 10 * time.Second
)

// idleTCPWorker waits for connections to forward, while fewer than
// maxIdleTCPWorkers wait and until one waited tcpWorkerIdle.
func (n *NAT) idleTCPWorker() {
	if !n.begin() {
		return
	}
	defer n.wg.Done()
	var t *time.Timer
	for {
		if n.idleTCP.Add(1) > maxIdleTCPWorkers {
			n.idleTCP.Add(-1)
			return
		}
		if t == nil {
			t = time.NewTimer(tcpWorkerIdle)
			defer t.Stop()
		} else {
			t.Reset(tcpWorkerIdle)
		}
		select {
		case r := <-n.tcpWork:
			n.idleTCP.Add(-1)
			n.forwardTCP(r)
		case <-t.C:
			n.idleTCP.Add(-1)
			return
		case <-n.ctx.Done():
			n.idleTCP.Add(-1)
			return
		}
	}
}

// forwardTCP forwards one connection, until it ends.
func (n *NAT) forwardTCP(r *stack.TCPRequest) {
	if !n.begin() {
		r.Refuse()
		return
	}
	defer n.wg.Done()
	if n.tcpActive.Add(1) > int64(n.cfg.MaxTCPConns) {
		n.tcpActive.Add(-1)
		r.Refuse()
		if now := time.Now().Unix(); n.tcpFull.Swap(now) < now-10 {
			n.log.Warn("the sandbox has too many TCP connections open; resetting new ones", "limit", n.cfg.MaxTCPConns)
		}
		return
	}
	defer n.tcpActive.Add(-1)
	debug := n.log.Enabled(n.ctx, slog.LevelDebug)
	log := n.log
	if debug { // building the attributes costs even when nothing is written
		log = n.log.With("src", r.Src, "dst", r.Dst)
	}
	host, err := n.hostAddr(r.Dst.Addr())
	if err != nil {
		log.Debug("tcp refused by policy", "err", err)
		r.Refuse()
		return
	}
	if !n.allowed("tcp", r.Dst.Addr(), host) {
		r.Refuse()
		return
	}
	ctx, cancel := context.WithTimeout(n.ctx, n.cfg.DialTimeout)
	hc, err := n.out.tcpDialer(host).DialContext(ctx, "tcp", netip.AddrPortFrom(host, r.Dst.Port()).String())
	cancel()
	if err != nil {
		log.Debug("tcp dial failed; resetting", "err", err)
		r.Refuse()
		return
	}
	gc, err := r.Accept()
	if err != nil {
		log.Debug("tcp handshake with the sandbox failed", "err", err)
		hc.Close()
		return
	}
	rl := relay.StreamSocket(gc, hc.(*net.TCPConn))
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		rl.Abort()
		rl.Run()
		return
	}
	n.tcp[rl] = struct{}{}
	n.mu.Unlock()
	if debug {
		log.Debug("tcp connected", "host", hc.RemoteAddr())
	}
	res := rl.Run() // the guest's writev from its buffers one way, reads into them the other
	n.mu.Lock()
	delete(n.tcp, rl)
	n.mu.Unlock()
	if debug {
		log.Debug("tcp closed", "bytes_out", res.AToB, "bytes_in", res.BToA, "err", res.Err)
	}
}
