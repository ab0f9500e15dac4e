package nat

import (
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/sockaddr"
)

// outbound chooses the source address of host sockets (--outbound-addr,
// --outbound-addr6) and the dialer for TCP.
//
// A source address is used only for destinations of its own scope: a
// loopback source (127.0.0.2) for the host's loopback (the gateway), any
// other for destinations off the host's loopback. The other way round the
// socket could never work (a loopback source cannot leave the host; a
// host-loopback connection from an outside address is not what anyone
// configuring an uplink address means), so those keep the kernel's choice.
//
// everywhere is slirp4netns's rule instead (its personality's
// --outbound-addr): an outside source applies to the host's loopback too,
// as libslirp binds every socket it makes; only a loopback source still
// stays on the loopback.
type outbound struct {
	src4, src6 netip.Addr
	everywhere bool
	// dialers are indexed by [destination is IPv6][destination is loopback].
	dialers [2][2]*net.Dialer
}

// newOutbound prepares the dialers: dialer for the world, loopDialer for
// the host's loopback, each bound to the source address that applies.
func newOutbound(src4, src6 netip.Addr, everywhere bool, dialer, loopDialer *net.Dialer) *outbound {
	o := &outbound{src4: src4.Unmap(), src6: src6, everywhere: everywhere}
	for v6 := range 2 {
		for loop := range 2 {
			d := dialer
			if loop == 1 {
				d = loopDialer
			}
			if src := o.sourceFor(v6 == 1, loop == 1); src.IsValid() {
				bound := *d
				bound.LocalAddr = &net.TCPAddr{IP: src.AsSlice(), Zone: src.Zone()}
				control := d.Control
				bound.Control = func(network, address string, c syscall.RawConn) error {
					c.Control(func(fd uintptr) { portAtConnect(int(fd)) })
					if control != nil {
						return control(network, address, c)
					}
					return nil
				}
				d = &bound
			}
			o.dialers[v6][loop] = d
		}
	}
	return o
}

func (o *outbound) sourceFor(v6, loopback bool) netip.Addr {
	src := o.src4
	if v6 {
		src = o.src6
	}
	switch {
	case !src.IsValid() || src.Is4() == v6:
		return netip.Addr{}
	case src.IsLoopback() != loopback && !(o.everywhere && loopback):
		return netip.Addr{}
	}
	return src
}

// source returns the address a socket to host is bound to, or the zero
// Addr for the kernel's choice.
func (o *outbound) source(host netip.Addr) netip.Addr {
	return o.sourceFor(host.Is6(), host.IsLoopback())
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// tcpDialer returns the dialer for a connection to host.
func (o *outbound) tcpDialer(host netip.Addr) *net.Dialer {
	return o.dialers[b2i(host.Is6())][b2i(host.IsLoopback())]
}

// udpAddr returns the local address of a UDP socket to host (nil: any).
func (o *outbound) udpAddr(host netip.Addr) *net.UDPAddr {
	src := o.source(host)
	if !src.IsValid() {
		return nil
	}
	return &net.UDPAddr{IP: src.AsSlice(), Zone: src.Zone()}
}

// portAtConnect makes a TCP socket about to be bound to an outbound
// address take its port at connect rather than at bind
// (IP_BIND_ADDRESS_NO_PORT), as a socket that is not bound does: a port
// chosen at bind cannot be one that a connection in TIME_WAIT holds,
// whatever its peer, so once every port of the range had one (some
// 14,000 short connections through --outbound-addr=127.0.0.2) each new
// connection's bind searched the whole range (connections per second
// from 5,052 to 130) and would then fail.
func portAtConnect(fd int) {
	unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1)
}

// bind binds fd, a socket that will send to host, to the source address
// (the fast path's TCP sockets, UDP and ping sockets; the netstack path's
// TCP is bound by its dialer); a TCP socket (tcp) takes its port at
// connect (portAtConnect).
func (o *outbound) bind(fd int, host netip.Addr, tcp bool) error {
	src := o.source(host)
	if !src.IsValid() {
		return nil
	}
	if tcp {
		portAtConnect(fd)
	}
	sa, err := sockaddr.Of(netip.AddrPortFrom(src, 0))
	if err != nil {
		return fmt.Errorf("the outbound address %v: %w", src, err)
	}
	if err := unix.Bind(fd, sa); err != nil {
		return fmt.Errorf("bind to the outbound address %v: %w", src, err)
	}
	return nil
}
