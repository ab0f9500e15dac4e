package nat

import (
	"context"
	"errors"
	"fmt"
	"github.com/gonetns/gonetns/internal/flowtable"
	"log/slog"
	"net"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/sockaddr"
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
	if !n.takeTCP() {
		r.Refuse()
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
		log.Debug("tcp refused: the destination maps to no host address", "err", err)
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
	oobInline(hc.(*net.TCPConn))
	gc, err := r.Accept()
	if err != nil {
		// The sandbox reset the connection before the stack took it (a
		// client that sends and closes with SO_LINGER 0 at once): the
		// host gets a reset too, as it would from the client itself,
		// not the FIN of a close (24 of 200 such connections over
		// IPv6 ended in EOF on the host).
		log.Debug("tcp handshake with the sandbox failed; resetting the host's end", "err", err)
		relay.Reset(hc.(*net.TCPConn))
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

// DialTCP makes the host socket of a connection for the stack's TCP fast
// path: the same decisions as HandleTCP (the connection cap, the mapping of
// the gateway to the host's loopback, the egress policy, the source
// address), then a non-blocking connect that the stack finishes. Use it as
// stack.Config.DialTCP. It runs on the stack's reader goroutine and does
// not block: a socket, a bind when a source address is set, and the
// connect's first step.
func (n *NAT) DialTCP(src, dst netip.AddrPort) (stack.HostTCP, error) {
	if !n.begin() {
		return stack.HostTCP{}, net.ErrClosed
	}
	if !n.takeTCP() {
		n.wg.Done()
		return stack.HostTCP{}, errTooMany
	}
	fd, err := n.dialTCP(dst)
	if err != nil {
		n.doneTCP()
		if n.log.Enabled(n.ctx, slog.LevelDebug) {
			n.log.Debug("tcp refused", "src", src, "dst", dst, "err", err)
		}
		return stack.HostTCP{}, err
	}
	return stack.HostTCP{FD: fd, ConnectTimeout: n.cfg.DialTimeout, Done: n.tcpDone}, nil
}

// takeTCP takes a place for a new connection under MaxTCPConns, on either
// TCP path; false at the cap, where the connection is reset (counted, and
// said in the log at most every 10 s).
func (n *NAT) takeTCP() bool {
	v := n.tcpActive.Add(1)
	if v > int64(n.cfg.MaxTCPConns) {
		n.tcpActive.Add(-1)
		n.tcpReset.Add(1)
		if now := time.Now().Unix(); n.tcpFull.Swap(now) < now-10 {
			n.log.Warn("the sandbox has too many TCP connections open; resetting new ones", "limit", n.cfg.MaxTCPConns)
		}
		return false
	}
	for p := n.tcpPeak.Load(); v > p && !n.tcpPeak.CompareAndSwap(p, v); p = n.tcpPeak.Load() {
	}
	return true
}

// TCPStats is the cap on the sandbox's TCP connections through the NAT
// and what it did.
type TCPStats struct {
	Max, Open, Peak int
	Reset           uint64 // new connections reset at the cap
}

// Stats returns the NAT's caps and their counters, for GET /v1/info: the
// sandbox's TCP connections, UDP flows and ping sessions.
func (n *NAT) Stats() (tcp TCPStats, udp, echo flowtable.Stats) {
	tcp = TCPStats{Max: n.cfg.MaxTCPConns, Open: int(n.tcpActive.Load()), Peak: int(n.tcpPeak.Load()), Reset: n.tcpReset.Load()}
	return tcp, n.udp.Stats(), n.echo.Stats()
}

// doneTCP ends what DialTCP began for one connection; the stack calls it
// once per socket DialTCP gave it (stack.HostTCP.Done).
func (n *NAT) doneTCP() {
	n.tcpActive.Add(-1)
	n.wg.Done()
}

var errTooMany = errors.New("nat: too many TCP connections")

// dialTCP opens a non-blocking socket to dst's host address and starts its
// connect.
func (n *NAT) dialTCP(dst netip.AddrPort) (int, error) {
	host, err := n.hostAddr(dst.Addr())
	if err != nil {
		return -1, err
	}
	if !n.allowed("tcp", dst.Addr(), host) {
		return -1, fmt.Errorf("%w: %v", ErrRefused, host)
	}
	family := unix.AF_INET
	if host.Is6() {
		family = unix.AF_INET6
	}
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("tcp socket: %w", err)
	}
	if err := n.out.bind(fd, host, true); err != nil {
		unix.Close(fd)
		return -1, err
	}
	// As Go's dialer does: no Nagle delay on top of the sandbox's own
	// choice, and keepalive probes towards anything but the host's own
	// loopback (whose peer's death the kernel reports at once).
	unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	if !host.IsLoopback() {
		unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1)
		unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, 15)
		unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, 15)
	}
	if err := sockaddr.Connect(fd, netip.AddrPortFrom(host, dst.Port())); err != nil && err != unix.EINPROGRESS {
		unix.Close(fd)
		return -1, fmt.Errorf("tcp connect %v: %w", netip.AddrPortFrom(host, dst.Port()), err)
	}
	return fd, nil
}

// oobInline keeps the host's urgent byte (MSG_OOB) in the stream, where
// the relay reads it and the sandbox gets it as an ordinary byte, as the
// fast path gives it: without, the relay's reads skipped it, and of "ab",
// an urgent "U", then "cd" the sandbox read "abcd".
func oobInline(c *net.TCPConn) {
	if rc, err := c.SyscallConn(); err == nil {
		rc.Control(func(fd uintptr) { unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_OOBINLINE, 1) })
	}
}
