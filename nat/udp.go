package nat

import (
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/gonetns/gonetns/stack"
)

type udpKey struct{ src, dst netip.AddrPort }

// udpFlow relays one flow: datagrams from the sandbox's src to dst go out
// of a host socket connected to dst's host address; what comes back on it
// goes to src.
type udpFlow struct {
	guest net.Conn
	host  *net.UDPConn
	now   func() time.Time
	last  atomic.Int64 // unix nanoseconds of the last datagram either way
	done  atomic.Bool
	once  sync.Once
}

func (f *udpFlow) lastActive() time.Time { return time.Unix(0, f.last.Load()) }

func (f *udpFlow) touch() { f.last.Store(f.now().UnixNano()) }

func (f *udpFlow) close() {
	f.once.Do(func() {
		f.done.Store(true)
		f.guest.Close()
		f.host.Close()
	})
}

// HandleUDP starts forwarding a new flow of the sandbox. Use it as
// stack.Config.UDP. A destination that cannot be reached from the sandbox,
// or one the host cannot send to, gets ICMP port unreachable; one the
// egress policy refuses gets "administratively prohibited".
func (n *NAT) HandleUDP(r *stack.UDPRequest) bool {
	log := n.log
	if n.log.Enabled(n.ctx, slog.LevelDebug) {
		log = n.log.With("src", r.Src, "dst", r.Dst)
	}
	host, err := n.hostAddr(r.Dst.Addr())
	if err != nil {
		log.Debug("udp refused by policy", "err", err)
		return false
	}
	if !n.allowed("udp", r.Dst.Addr(), host) {
		r.Prohibit()
		return true
	}
	hc, err := net.DialUDP("udp", n.out.udpAddr(host), net.UDPAddrFromAddrPort(netip.AddrPortFrom(host, r.Dst.Port())))
	if err != nil {
		log.Debug("udp socket on the host failed", "err", err)
		return false
	}
	if !n.begin() {
		hc.Close()
		return false
	}
	gc, err := r.Accept()
	if err != nil {
		n.wg.Done()
		hc.Close()
		log.Debug("udp endpoint failed", "err", err)
		return false
	}
	f := &udpFlow{guest: gc, host: hc, now: n.cfg.Now}
	f.touch()
	key := udpKey{r.Src, r.Dst}
	if old, evicted := n.udp.add(key, f); evicted {
		n.log.Debug("udp flow table full; evicted the idlest flow", "max", n.cfg.MaxUDPFlows, "evicted_last_active", old.lastActive())
	}
	log.Debug("udp flow", "host", hc.RemoteAddr())
	n.wg.Add(1)
	go func() {
		defer n.wg.Done()
		f.copy(f.host, f.guest) // sandbox -> host
		f.close()
	}()
	go func() {
		defer n.wg.Done()
		f.copy(f.guest, f.host) // host -> sandbox
		f.close()
		n.udp.remove(key, f)
	}()
	return true
}

// copy moves datagrams from src to dst until the flow is closed. An ICMP
// port unreachable from the host (which a connected socket reports on the
// next call) drops that datagram only.
func (f *udpFlow) copy(dst, src net.Conn) {
	buf := make([]byte, 65536)
	for {
		n, err := src.Read(buf)
		if err != nil {
			if !f.done.Load() && errors.Is(err, syscall.ECONNREFUSED) {
				continue
			}
			return
		}
		f.touch()
		dst.Write(buf[:n])
	}
}
