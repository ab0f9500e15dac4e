package nat

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/flowtable"
	"github.com/gonetns/gonetns/internal/rawconn"
	"github.com/gonetns/gonetns/internal/sockaddr"
	"github.com/gonetns/gonetns/stack"
)

// A UDP flow is a host socket connected to the destination's host
// address; datagrams from the sandbox are written to it on the stack's
// packet path, as they arrive, and what comes back on it is read by one
// goroutine for all flows (a flowtable.Poller) and sent into the sandbox.
// A flow costs a descriptor and a small struct: no goroutine and no buffer
// of its own, so memory stays bounded by the flow cap whatever the
// traffic.

type udpKey struct{ src, dst netip.AddrPort }

// udpFlow relays one flow: datagrams from the sandbox's src to dst go out
// of a host socket connected to dst's host address; what comes back on it
// goes to src.
type udpFlow struct {
	id   uint32 // the poller's key
	poll *flowtable.Poller
	path *stack.UDPPath
	now  func() time.Time
	last atomic.Int64 // unix nanoseconds of the last datagram either way

	// mu orders closing the socket against I/O on it (a descriptor
	// number is reused as soon as it is closed): I/O holds it for
	// reading, close for writing.
	mu sync.RWMutex
	fd int // -1 once closed
}

var (
	_ flowtable.Flow     = (*udpFlow)(nil)
	_ flowtable.Receiver = (*udpFlow)(nil)
)

func (f *udpFlow) LastActive() time.Time { return time.Unix(0, f.last.Load()) }

func (f *udpFlow) touch() { f.last.Store(f.now().UnixNano()) }

// Close closes the flow's socket, which also takes it out of the
// poller's epoll set.
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
	f.mu.Unlock()
	f.path.Close()
}

// send writes one datagram from the sandbox to the host. A socket that
// cannot take it now, or an ICMP error from an earlier datagram (which a
// connected socket reports on the next call, as well as on the read that
// Receive passes on to the sandbox), loses that datagram only, as a
// network would. sendmsg, not writev: writev of no bytes sends
// nothing, and an empty datagram is a datagram too.
func (f *udpFlow) send(payload [][]byte) {
	f.mu.RLock()
	if f.fd >= 0 {
		rawconn.Send(f.fd, payload, 0)
	}
	f.mu.RUnlock()
}

// HandleUDP forwards a datagram of the sandbox, opening the flow's host
// socket for the first one. Use it as stack.Config.UDP. A destination
// that cannot be reached from the sandbox, or one the host cannot send
// to, gets ICMP port unreachable; one the egress policy refuses gets
// "administratively prohibited".
func (n *NAT) HandleUDP(p *stack.UDPPacket) bool {
	key := udpKey{p.Src, p.Dst}
	f, ok := n.udp.Get(key)
	if !ok {
		var err error
		if f, err = n.newUDPFlow(p, key); err != nil {
			if errors.Is(err, errProhibited) {
				p.Prohibit()
				return true
			}
			if n.log.Enabled(n.ctx, slog.LevelDebug) {
				n.log.Debug("udp not forwarded", "src", p.Src, "dst", p.Dst, "err", err)
			}
			return false
		}
	}
	f.touch()
	f.send(p.Payload())
	return true
}

// errProhibited marks a flow the egress policy refuses.
var errProhibited = errors.New("refused by the egress policy")

func (n *NAT) newUDPFlow(p *stack.UDPPacket, key udpKey) (*udpFlow, error) {
	host, err := n.hostAddr(p.Dst.Addr())
	if err != nil {
		return nil, err
	}
	if !n.allowed("udp", p.Dst.Addr(), host) {
		return nil, errProhibited
	}
	poller, err := n.udpPoller()
	if err != nil {
		return nil, err
	}
	fd, err := n.udpSocket(netip.AddrPortFrom(host, p.Dst.Port()))
	if err != nil {
		return nil, err
	}
	path, err := p.ReturnPath()
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	f := &udpFlow{fd: fd, path: path, now: n.cfg.Now}
	f.touch()
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
	n.log.Debug("udp flow", "src", p.Src, "dst", p.Dst, "host", host)
	return f, nil
}

// udpSocket opens a non-blocking UDP socket connected to dst, from the
// outbound address when one applies (--outbound-addr).
func (n *NAT) udpSocket(dst netip.AddrPort) (int, error) {
	to := netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	family := unix.AF_INET
	if to.Addr().Is6() {
		family = unix.AF_INET6
	}
	fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("udp socket: %w", err)
	}
	if err := n.out.bind(fd, dst.Addr(), false); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("udp: %w", err)
	}
	if err := sockaddr.Connect(fd, to); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("udp connect %v: %w", dst, err)
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
// second finding EAGAIN). The flow's lock is held only for the read: the
// write into the sandbox may wait (for a full device in tests), and must
// not hold up Close, nor through it the reader's sends.
func (f *udpFlow) Receive(buf []byte) {
	bufs := [2][]byte{buf[:flowtable.DatagramMax], buf[flowtable.DatagramMax:]}
	var lens [len(bufs)]int
	for range maxBurst / len(bufs) {
		f.mu.RLock()
		if f.fd < 0 {
			f.mu.RUnlock()
			return
		}
		n, err := rawconn.ReadBatch(f.fd, bufs[:], lens[:])
		f.mu.RUnlock()
		if err != nil {
			if errors.Is(err, unix.EAGAIN) {
				return
			}
			// An ICMP error about an earlier datagram (nothing listens
			// there, or no route): the sandbox is told as the host's
			// kernel told us, so that its socket fails as it would.
			f.path.Unreachable(err)
			continue
		}
		f.touch()
		for i := range n {
			f.path.Write(bufs[i][:lens[i]])
		}
		if n < len(bufs) {
			return
		}
	}
}
