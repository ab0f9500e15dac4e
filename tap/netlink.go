package tap

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/netlink"
)

// LinkConfig is the configuration of the sandbox's interface.
type LinkConfig struct {
	Name string
	MTU  int
	// Address is the sandbox's own address with its prefix, e.g.
	// 10.0.2.100/24.
	Address netip.Prefix
	// Gateway becomes the default route.
	Gateway netip.Addr
	// Address6 and Gateway6 are the IPv6 equivalents; zero to skip.
	Address6 netip.Prefix
	Gateway6 netip.Addr
	// MAC is the interface's Ethernet address; nil keeps the random one
	// the kernel gave it.
	MAC net.HardwareAddr `json:",omitempty"`
}

// Configure brings up lo, then sets the MTU, address and state of the
// interface and adds the default route, all over rtnetlink, in the calling
// thread's network namespace.
func Configure(c LinkConfig) error {
	nl, err := netlink.Open(unix.NETLINK_ROUTE)
	if err != nil {
		return err
	}
	defer nl.Close()
	return ConfigureOn(nl, c)
}

// ConfigureOn is Configure over an rtnetlink socket of the caller's: the
// interface and lo of the namespace nl belongs to are configured, whatever
// namespace the calling thread is in (nl may have been opened by a thread
// or a process that entered the namespace).
func ConfigureOn(nl *netlink.Conn, c LinkConfig) error {
	if err := setLinkUp(nl, "lo", 0, 0, nil); err != nil {
		return err
	}
	if err := setLinkUp(nl, c.Name, c.MTU, TxQueueLen, c.MAC); err != nil {
		return err
	}
	for _, a := range []netip.Prefix{c.Address, c.Address6} {
		if a.IsValid() {
			if err := addAddr(nl, c.Name, a); err != nil {
				return err
			}
		}
	}
	for _, gw := range []netip.Addr{c.Gateway, c.Gateway6} {
		if gw.IsValid() {
			if err := addDefaultRoute(nl, c.Name, gw); err != nil {
				return err
			}
		}
	}
	return nil
}

// LoopbackUp brings up lo (for --net=none).
func LoopbackUp() error {
	nl, err := netlink.Open(unix.NETLINK_ROUTE)
	if err != nil {
		return err
	}
	defer nl.Close()
	return setLinkUp(nl, "lo", 0, 0, nil)
}

// TxQueueLen is the length of the TAP's transmit queue: the frames the
// sandbox's kernel holds for gonetns to read before it drops. The
// kernel's default of 1000 dropped most of a burst of 5,000 datagrams
// from new source ports (1,225 answered) and 111,958 frames in a burst of
// 20,000 connections, while gonetns, one reader, set up the flows one by
// one. Only what waits costs memory, in the kernel: each queued frame is
// charged to the sending socket's buffer (wmem), so what a queue of 10,000
// can hold is bounded by the sandbox's sockets' send buffers, not by
// 10,000 frames of up to 64 KiB (TSO): small frames fill the queue, large
// ones stop their sockets first.
const TxQueueLen = 10000

// LinkIndex looks the interface up by name in nl's namespace.
func LinkIndex(nl *netlink.Conn, name string) (int, error) {
	ifi := unix.IfInfomsg{Family: unix.AF_UNSPEC}
	body := netlink.AppendAttr(netlink.StructBytes(&ifi), unix.IFLA_IFNAME, append([]byte(name), 0))
	reply, err := nl.Get(unix.RTM_GETLINK, body)
	switch {
	case err != nil:
		return 0, fmt.Errorf("interface %s: %w", name, err)
	case len(reply) < unix.SizeofIfInfomsg:
		return 0, fmt.Errorf("interface %s: short answer (%d bytes)", name, len(reply))
	}
	return int(int32(binary.NativeEndian.Uint32(reply[4:]))), nil // ifi_index
}

// setLinkUp sets the interface up; an MTU or transmit queue length of 0,
// or a nil MAC, is left as it is.
func setLinkUp(c *netlink.Conn, name string, mtu, txqlen int, mac net.HardwareAddr) error {
	idx, err := LinkIndex(c, name)
	if err != nil {
		return err
	}
	ifi := unix.IfInfomsg{Family: unix.AF_UNSPEC, Index: int32(idx), Flags: unix.IFF_UP, Change: unix.IFF_UP}
	body := netlink.StructBytes(&ifi)
	if mtu > 0 {
		body = netlink.AppendAttr(body, unix.IFLA_MTU, binary.NativeEndian.AppendUint32(nil, uint32(mtu)))
	}
	if txqlen > 0 {
		body = netlink.AppendAttr(body, unix.IFLA_TXQLEN, binary.NativeEndian.AppendUint32(nil, uint32(txqlen)))
	}
	if mac != nil {
		body = netlink.AppendAttr(body, unix.IFLA_ADDRESS, mac)
	}
	if err := c.Request(unix.RTM_NEWLINK, 0, body); err != nil {
		if mtu > 0 {
			return fmt.Errorf("set %s up with MTU %d: %w", name, mtu, err)
		}
		return fmt.Errorf("set %s up: %w", name, err)
	}
	return nil
}

func addAddr(c *netlink.Conn, name string, p netip.Prefix) error {
	idx, err := LinkIndex(c, name)
	if err != nil {
		return err
	}
	family := uint8(unix.AF_INET)
	if p.Addr().Is6() {
		family = unix.AF_INET6
	}
	ifa := unix.IfAddrmsg{Family: family, Prefixlen: uint8(p.Bits()), Index: uint32(idx)}
	body := netlink.StructBytes(&ifa)
	addr := p.Addr().AsSlice()
	body = netlink.AppendAttr(body, unix.IFA_LOCAL, addr)
	body = netlink.AppendAttr(body, unix.IFA_ADDRESS, addr)
	if p.Addr().Is4() {
		body = netlink.AppendAttr(body, unix.IFA_BROADCAST, broadcast(p).AsSlice())
	} else {
		// No duplicate address detection: nothing else is on this link,
		// and DAD would hold the address "tentative" for a second.
		body = netlink.AppendAttr(body, unix.IFA_FLAGS, binary.NativeEndian.AppendUint32(nil, unix.IFA_F_NODAD))
	}
	if err := c.Request(unix.RTM_NEWADDR, unix.NLM_F_CREATE|unix.NLM_F_EXCL, body); err != nil {
		return fmt.Errorf("add address %s to %s: %w", p, name, err)
	}
	return nil
}

func addDefaultRoute(c *netlink.Conn, name string, gw netip.Addr) error {
	idx, err := LinkIndex(c, name)
	if err != nil {
		return err
	}
	family := uint8(unix.AF_INET)
	if gw.Is6() {
		family = unix.AF_INET6
	}
	rtm := unix.RtMsg{
		Family:   family,
		Table:    unix.RT_TABLE_MAIN,
		Protocol: unix.RTPROT_BOOT,
		Scope:    unix.RT_SCOPE_UNIVERSE,
		Type:     unix.RTN_UNICAST,
	}
	body := netlink.StructBytes(&rtm)
	body = netlink.AppendAttr(body, unix.RTA_GATEWAY, gw.AsSlice())
	body = netlink.AppendAttr(body, unix.RTA_OIF, binary.NativeEndian.AppendUint32(nil, uint32(idx)))
	if err := c.Request(unix.RTM_NEWROUTE, unix.NLM_F_CREATE|unix.NLM_F_EXCL, body); err != nil {
		return fmt.Errorf("add default route via %s dev %s: %w", gw, name, err)
	}
	return nil
}

func broadcast(p netip.Prefix) netip.Addr {
	a := p.Masked().Addr().As4()
	host := uint32(1)<<(32-p.Bits()) - 1
	v := binary.BigEndian.Uint32(a[:]) | host
	binary.BigEndian.PutUint32(a[:], v)
	return netip.AddrFrom4(a)
}
