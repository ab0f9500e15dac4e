package nat

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/flowtable"
	"github.com/gonetns/gonetns/internal/rawconn"
	"github.com/gonetns/gonetns/internal/sockaddr"
	"github.com/gonetns/gonetns/stack"
)

// A UDP flow is one host socket for one address and port of the sandbox:
// every datagram that source sends leaves from the same host port,
// whatever its destination, and what comes back from any port of a host
// address it has sent to goes to it (a NAT's endpoint-independent mapping
// and address-dependent filtering, RFC 4787's recommendations). Before, a
// flow was a socket connected to one destination: a server that answers
// from a port of its own (TFTP: each transfer comes from a new port) was
// never heard, and the sandbox's next datagram, to that port, left from a
// host port the server did not know. Datagrams from the sandbox are
// written to the socket on the stack's packet path, as they arrive; what
// comes back is read by one goroutine for all flows (a flowtable.Poller)
// and sent into the sandbox. A flow costs a descriptor and a small struct:
// no goroutine and no buffer of its own, so memory stays bounded by the
// flow cap whatever the traffic.

// udpKey names a flow: the sandbox's source, and the kind of destination,
// which decides the socket's source address (--outbound-addr takes a
// loopback address for the gateway only) and its idle timeout (port 53's
// is shorter).
type udpKey struct {
	src  netip.AddrPort
	kind uint8
}

const (
	udpToLoopback = 1 << iota // to the gateway: the host's loopback
	udpToDNS                  // to port 53
)

func udpKind(host netip.Addr, port uint16) uint8 {
	var k uint8
	if host.IsLoopback() {
		k |= udpToLoopback
	}
	if port == 53 {
		k |= udpToDNS
	}
	return k
}

// maxUDPDests bounds the destinations one flow remembers (each holds a
// route into the sandbox); past it one is forgotten (udpFlow.forget), and
// answers from its host address are no longer taken.
const maxUDPDests = 64

// udpDest is a destination a flow has sent to.
type udpDest struct {
	dst  netip.AddrPort // as the sandbox addressed it
	host netip.AddrPort // the host's address for it
	name []byte         // host, for sendmsg (sockaddr.Raw)
	path *stack.UDPPath // into the sandbox, from dst
	last atomic.Int64   // the flow's clock (udpFlow.now) at its last datagram either way, for maxUDPDests
	// answered: a datagram came back from its host address.
	answered atomic.Bool
}

// udpFlow relays one source's datagrams to its destinations' host
// addresses, and what comes back to the source.
type udpFlow struct {
	id   uint32 // the poller's key
	poll *flowtable.Poller
	now  func() time.Time
	last atomic.Int64 // unix nanoseconds of the last datagram either way

	// mu orders closing the socket against I/O on it (a descriptor
	// number is reused as soon as it is closed): I/O holds it for
	// reading, close and changes to dests for writing.
	mu    sync.RWMutex
	fd    int        // -1 once closed
	dests []*udpDest // oldest first
}

var (
	_ flowtable.Flow     = (*udpFlow)(nil)
	_ flowtable.Receiver = (*udpFlow)(nil)
)

func (f *udpFlow) LastActive() time.Time { return time.Unix(0, f.last.Load()) }

// touch marks the flow, and d, active now: one clock read per datagram.
func (f *udpFlow) touch(d *udpDest) {
	now := f.now().UnixNano()
	f.last.Store(now)
	d.last.Store(now)
}

// Close closes the flow's socket, which also takes it out of the
// poller's epoll set, and its paths into the sandbox.
func (f *udpFlow) Close() {
	f.mu.Lock()
	if f.fd < 0 {
		f.mu.Unlock()
		return
	}
	if f.poll != nil {
		f.poll.Remove(f.id)
	}
	unix.Close(f.fd)
	f.fd = -1
	dests := f.dests
	f.dests = nil
	f.mu.Unlock()
	for _, d := range dests {
		d.path.Close()
	}
}

// dest returns the flow's destination dst, nil if it has not sent there.
// f.mu is held.
func (f *udpFlow) dest(dst netip.AddrPort) *udpDest {
	for _, d := range f.dests {
		if d.dst == dst {
			return d
		}
	}
	return nil
}

// from returns the destination whose host address sent a datagram from
// src: the one at src itself, else the newest at its address; nil if the
// flow never sent to that address (the datagram is not taken). f.mu is
// held.
func (f *udpFlow) from(src netip.AddrPort) *udpDest {
	var same *udpDest
	for _, d := range f.dests {
		switch {
		case d.host == src:
			return d
		case d.host.Addr() == src.Addr():
			same = d
		}
	}
	return same
}

// send writes one datagram from the sandbox to d's host address. A
// socket that cannot take it now loses that datagram only, as a network
// would. One the host cannot route is answered into the sandbox with ICMP
// port unreachable: the host's own socket fails at once (EHOSTUNREACH),
// and of the ICMP errors only that one makes a Linux socket fail
// (ECONNREFUSED; host and net unreachable count as transient without
// IP_RECVERR). sendmsg, not writev: an empty datagram is a datagram too.
func (f *udpFlow) send(d *udpDest, payload [][]byte) {
	f.touch(d)
	err := f.sendOnce(d, payload)
	if isUnreachable(err) {
		// The error may be an ICMP error about an earlier datagram to
		// another destination, which the socket reports (and forgets)
		// at its next send as well as in its error queue, where Receive
		// finds it: this datagram was not sent. Once more; a route
		// that is missing fails again.
		err = f.sendOnce(d, payload)
	}
	if errors.Is(err, unix.EHOSTUNREACH) || errors.Is(err, unix.ENETUNREACH) {
		d.path.Unreachable(unix.ECONNREFUSED)
	}
}

func (f *udpFlow) sendOnce(d *udpDest, payload [][]byte) error {
	f.mu.RLock()
	defer f.mu.RUnlock()
	if f.fd < 0 {
		return nil
	}
	_, err := rawconn.SendTo(f.fd, payload, d.name, 0)
	return err
}

// isUnreachable reports whether err is one of the ICMP errors a socket
// reports.
func isUnreachable(err error) bool {
	return errors.Is(err, unix.ECONNREFUSED) || errors.Is(err, unix.EHOSTUNREACH) || errors.Is(err, unix.ENETUNREACH)
}

// HandleUDP forwards a datagram of the sandbox, opening the flow's host
// socket for the source's first one. Use it as stack.Config.UDP. A
// destination that cannot be reached from the sandbox gets ICMP port
// unreachable; one the egress policy refuses gets "administratively
// prohibited".
func (n *NAT) HandleUDP(p *stack.UDPPacket) bool {
	host, err := n.hostAddr(p.Dst.Addr())
	if err != nil {
		return n.udpNotForwarded(p, err)
	}
	key := udpKey{p.Src, udpKind(host, p.Dst.Port())}
	f, ok := n.udp.Get(key)
	var d *udpDest
	if ok {
		f.mu.RLock()
		d = f.dest(p.Dst)
		f.mu.RUnlock()
	}
	if d == nil {
		if !n.allowed("udp", p.Dst.Addr(), host) {
			p.Prohibit()
			return true
		}
		if !ok {
			if f, err = n.newUDPFlow(key, host); err != nil {
				return n.udpNotForwarded(p, err)
			}
		}
		if d, err = f.addDest(p, netip.AddrPortFrom(host, p.Dst.Port())); errors.Is(err, net.ErrClosed) {
			return true // the flow was evicted or expired meanwhile: this datagram is lost, as on a network
		} else if err != nil {
			return n.udpNotForwarded(p, err)
		}
		n.log.Debug("udp flow", "src", p.Src, "dst", p.Dst, "host", host)
	}
	f.send(d, p.Payload())
	return true
}

// udpNotForwarded says why p was not forwarded (--debug) and returns
// false: the stack answers with ICMP port unreachable.
func (n *NAT) udpNotForwarded(p *stack.UDPPacket, err error) bool {
	if n.log.Enabled(n.ctx, slog.LevelDebug) {
		n.log.Debug("udp not forwarded", "src", p.Src, "dst", p.Dst, "err", err)
	}
	return false
}

// forget takes out of f.dests the destination to forget for a new one:
// the idlest of those that never answered (a burst of queries, each to
// a server of its own, before their answers come), else the idlest. A
// conversation going on both ways stays: a stream the sandbox subscribed
// to with one datagram was forgotten as the first destination added, then
// as the idlest when the sandbox sent to 64 others within one of its
// intervals. f.mu is held for writing.
func (f *udpFlow) forget() *udpDest {
	pick := -1
	for _, unanswered := range []bool{true, false} {
		for i, d := range f.dests {
			if (!unanswered || !d.answered.Load()) && (pick < 0 || d.last.Load() < f.dests[pick].last.Load()) {
				pick = i
			}
		}
		if pick >= 0 {
			break
		}
	}
	d := f.dests[pick]
	f.dests = slices.Delete(f.dests, pick, pick+1)
	return d
}

// addDest remembers p's destination, at host, for f.
func (f *udpFlow) addDest(p *stack.UDPPacket, host netip.AddrPort) (*udpDest, error) {
	name, err := sockaddr.Raw(netip.AddrPortFrom(host.Addr().Unmap(), host.Port()))
	if err != nil {
		return nil, fmt.Errorf("udp: %w", err)
	}
	path, err := p.ReturnPath()
	if err != nil {
		return nil, err
	}
	d := &udpDest{dst: p.Dst, host: host, name: name, path: path}
	f.mu.Lock()
	if f.fd < 0 {
		f.mu.Unlock()
		path.Close()
		return nil, net.ErrClosed
	}
	var forgotten *udpDest
	if len(f.dests) >= maxUDPDests {
		forgotten = f.forget()
	}
	f.dests = append(f.dests, d)
	f.mu.Unlock()
	if forgotten != nil {
		forgotten.path.Close()
	}
	return d, nil
}

func (n *NAT) newUDPFlow(key udpKey, host netip.Addr) (*udpFlow, error) {
	poller, err := n.udpPoller()
	if err != nil {
		return nil, err
	}
	fd, err := n.udpSocket(host)
	if err != nil {
		return nil, err
	}
	f := &udpFlow{fd: fd, now: n.cfg.Now}
	f.last.Store(f.now().UnixNano())
	if f.id, err = poller.Add(fd, f); err != nil {
		f.Close()
		return nil, fmt.Errorf("udp: %w", err)
	}
	f.poll = poller
	if old, evicted := n.udp.Add(key, f); evicted {
		n.log.Debug("udp flow table full; evicted the idlest flow", "max", n.cfg.MaxUDPFlows, "evicted_last_active", old.LastActive())
	}
	n.mu.Lock()
	closed := n.closed
	n.mu.Unlock()
	if closed {
		// Close emptied the table before the flow joined it: nobody
		// else closes it (Close's own emptying sees it otherwise).
		f.Close()
		return nil, net.ErrClosed
	}
	return f, nil
}

// udpSocket opens a non-blocking UDP socket for datagrams to hosts like
// host (its family; the outbound address, --outbound-addr, that applies
// to it), which reports the ICMP errors of what it sends (IP_RECVERR): an
// unconnected socket hears of them only so.
func (n *NAT) udpSocket(host netip.Addr) (int, error) {
	host = host.Unmap()
	family, level, opt := unix.AF_INET, unix.IPPROTO_IP, unix.IP_RECVERR
	if host.Is6() {
		family, level, opt = unix.AF_INET6, unix.IPPROTO_IPV6, unix.IPV6_RECVERR
	}
	fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("udp socket: %w", err)
	}
	if err := unix.SetsockoptInt(fd, level, opt, 1); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("udp socket: %w", err)
	}
	if err := n.out.bind(fd, host, false); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("udp: %w", err)
	}
	if host.IsLoopback() && !n.out.source(host).IsValid() {
		// To the host's loopback only (udpKind): bound there, not to
		// every address sendto would bind it to, so that only the
		// host's own programs can send to it, as to the connected
		// socket a flow was.
		sa, _ := sockaddr.Of(netip.AddrPortFrom(host, 0))
		if err := unix.Bind(fd, sa); err != nil {
			unix.Close(fd)
			return -1, fmt.Errorf("udp: bind to %v: %w", host, err)
		}
	}
	return fd, nil
}

// udpPoller returns the NAT's poller, starting it with the first flow: on
// the caller's event loop (Config.Loop) when it has one, else on a
// goroutine of the NAT's.
func (n *NAT) udpPoller() (*flowtable.Poller, error) {
	n.udpPollOnce.Do(func() {
		if n.cfg.Loop != nil {
			p, err := flowtable.NewAttachedPoller(n.cfg.Loop())
			if err == nil {
				n.udpPoll = p
				n.log.Debug("udp: the host's answers are read on the event loop")
				return
			}
			n.log.Debug("udp: the host's answers are read on a goroutine of their own", "why", err)
		}
		p, err := flowtable.NewPoller()
		if err != nil {
			n.udpPollErr = fmt.Errorf("udp: %w", err)
			return
		}
		if !n.begin() {
			p.Close()
			n.udpPollErr = errors.New("udp: NAT closed")
			return
		}
		n.udpPoll = p
		go func() {
			defer n.wg.Done()
			p.Run()
		}()
	})
	return n.udpPoll, n.udpPollErr
}

// maxBurst is how many datagrams one flow gets to send in a row before
// the others get their turn (its socket stays ready: epoll is level
// triggered). A bound for fairness between flows; for one flow it costs
// nothing measurable: a host -> sandbox flood (iperf3 -u -b 0 -l 1400 -R,
// MTU 1500, 3 interleaved rounds) got 0.63, 0.65 and 0.64 Gbit/s with 1, 64
// and 1,024.
const maxBurst = 64

// Receive passes what the host sent to the sandbox, up to maxBurst
// datagrams, two per read: a read that brings one says the socket is
// empty, so a 1-datagram answer costs one system call, not two (the
// second finding EAGAIN). A datagram from a host address the flow has not
// sent to is dropped. The flow's lock is held only for the read: the
// write into the sandbox may wait (for a full device in tests), and must
// not hold up Close, nor through it the reader's sends.
func (f *udpFlow) Receive(buf []byte) {
	bufs := [2][]byte{buf[:flowtable.DatagramMax], buf[flowtable.DatagramMax:]}
	var lens, nameLens [len(bufs)]int
	var nameBuf [len(bufs)][unix.SizeofSockaddrInet6]byte
	names := [len(bufs)][]byte{nameBuf[0][:], nameBuf[1][:]}
	for turn := range maxBurst / len(bufs) {
		f.mu.RLock()
		if f.fd < 0 {
			f.mu.RUnlock()
			return
		}
		n, err := rawconn.ReadBatchFrom(f.fd, bufs[:], lens[:], names[:], nameLens[:])
		f.mu.RUnlock()
		if err != nil {
			// An ICMP error about an earlier datagram (nothing listens
			// there, or no route) is reported by the read, and waits in
			// the error queue, where it names its destination; woken
			// with nothing to read, one may be there too.
			if !errors.Is(err, unix.EAGAIN) || turn == 0 {
				f.errors()
			}
			if errors.Is(err, unix.EAGAIN) {
				return
			}
			continue
		}
		for i := range n {
			src, ok := sockaddr.Parse(names[i], nameLens[i])
			if !ok {
				continue
			}
			f.mu.RLock()
			d := f.from(src)
			f.mu.RUnlock()
			if d != nil { // else from an address never sent to: it does not keep the flow alive either
				f.touch(d)
				d.answered.Store(true)
				d.path.WriteFrom(src.Port(), bufs[i][:lens[i]])
			}
		}
		if n < len(bufs) {
			return
		}
	}
}

// errors drains the socket's error queue (IP_RECVERR): each entry is an
// ICMP error about a datagram to one of the flow's destinations, which
// the sandbox is told of as the host's kernel told us (ECONNREFUSED,
// EHOSTUNREACH, ENETUNREACH), so that its socket fails as it would. An
// error path: its allocations do not matter.
func (f *udpFlow) errors() {
	var b [1]byte
	oob := make([]byte, 512)
	for range maxUDPDests {
		f.mu.RLock()
		if f.fd < 0 {
			f.mu.RUnlock()
			return
		}
		_, oobn, _, from, err := unix.Recvmsg(f.fd, b[:], oob, unix.MSG_ERRQUEUE|unix.MSG_DONTWAIT)
		var d *udpDest
		if err == nil {
			if to, ok := sockaddrAddrPort(from); ok {
				d = f.dest4host(to)
			}
		}
		f.mu.RUnlock()
		if err != nil {
			return
		}
		if d != nil {
			if errno := queuedErrno(oob[:oobn]); errno != 0 {
				d.path.Unreachable(errno)
			}
		}
	}
}

// queuedErrno is the error of an error queue entry's control message.
func queuedErrno(oob []byte) unix.Errno {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return 0
	}
	for _, m := range msgs {
		if (m.Header.Level == unix.IPPROTO_IP && m.Header.Type == unix.IP_RECVERR ||
			m.Header.Level == unix.IPPROTO_IPV6 && m.Header.Type == unix.IPV6_RECVERR) &&
			len(m.Data) >= int(unsafe.Sizeof(unix.SockExtendedErr{})) {
			return unix.Errno((*unix.SockExtendedErr)(unsafe.Pointer(&m.Data[0])).Errno)
		}
	}
	return 0
}

// sockaddrAddrPort is sa as an address and port.
func sockaddrAddrPort(sa unix.Sockaddr) (netip.AddrPort, bool) {
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port)), true
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), uint16(sa.Port)), true
	}
	return netip.AddrPort{}, false
}

// dest4host returns the destination at host address h. f.mu is held.
func (f *udpFlow) dest4host(h netip.AddrPort) *udpDest {
	for _, d := range f.dests {
		if d.host.Addr().Unmap() == h.Addr() && d.host.Port() == h.Port() {
			return d
		}
	}
	return nil
}
