package route

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/netlink"
)

// Network is an IPv4 network the namespace reaches directly: the subnet of
// an interface's address, or a route of the main table.
type Network struct {
	Prefix    netip.Prefix
	Interface string     // its interface ("eth0", "wg0"); "" if unknown
	Address   netip.Addr // the interface's address in Prefix; zero for a route
}

func (n Network) String() string {
	if n.Address.IsValid() {
		return fmt.Sprintf("%s (%s's address %s)", n.Prefix, n.Interface, n.Address)
	}
	return fmt.Sprintf("%s (a route via %s)", n.Prefix, n.Interface)
}

// Networks lists the IPv4 networks of the calling thread's network
// namespace, over rtnetlink: every interface address's subnet but
// loopback's, then every route of the main table that is not the default
// route and not already listed. What a sandbox subnet overlapping one of
// them hides: the hosts of that network, whose addresses the sandbox takes
// for its own.
func Networks() ([]Network, error) {
	nl, err := netlink.Open(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, err
	}
	defer nl.Close()
	names, err := linkNames(nl)
	if err != nil {
		return nil, err
	}
	var out []Network
	seen := map[netip.Prefix]bool{}
	ifa := unix.IfAddrmsg{Family: unix.AF_INET}
	err = nl.Dump(unix.RTM_GETADDR, netlink.StructBytes(&ifa), func(m netlink.Message) error {
		if m.Type != unix.RTM_NEWADDR || len(m.Data) < unix.SizeofIfAddrmsg {
			return nil
		}
		bits := int(m.Data[1])
		index := binary.NativeEndian.Uint32(m.Data[4:8])
		var addr netip.Addr
		netlink.Attrs(m.Data[unix.SizeofIfAddrmsg:], func(typ uint16, data []byte) {
			// IFA_LOCAL is the interface's own address; IFA_ADDRESS is the
			// peer's on a point-to-point link.
			if a, ok := netip.AddrFromSlice(data); ok && (typ == unix.IFA_LOCAL || typ == unix.IFA_ADDRESS && !addr.IsValid()) {
				addr = a
			}
		})
		if !addr.Is4() || addr.IsLoopback() {
			return nil
		}
		p := netip.PrefixFrom(addr, bits).Masked()
		seen[p] = true
		out = append(out, Network{Prefix: p, Interface: names[index], Address: addr})
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list the addresses of this host's interfaces: %w", err)
	}
	rtm := unix.RtMsg{Family: unix.AF_INET}
	err = nl.Dump(unix.RTM_GETROUTE, netlink.StructBytes(&rtm), func(m netlink.Message) error {
		if m.Type != unix.RTM_NEWROUTE || len(m.Data) < unix.SizeofRtMsg {
			return nil
		}
		bits, table, typ := int(m.Data[1]), m.Data[4], m.Data[7]
		if bits == 0 || typ != unix.RTN_UNICAST {
			return nil
		}
		var dst netip.Addr
		var oif uint32
		netlink.Attrs(m.Data[unix.SizeofRtMsg:], func(t uint16, data []byte) {
			switch t {
			case unix.RTA_DST:
				dst, _ = netip.AddrFromSlice(data)
			case unix.RTA_TABLE:
				if len(data) == 4 {
					table = byte(min(binary.NativeEndian.Uint32(data), 255))
				}
			case unix.RTA_OIF:
				if len(data) == 4 {
					oif = binary.NativeEndian.Uint32(data)
				}
			}
		})
		if table != unix.RT_TABLE_MAIN || !dst.Is4() || names[oif] == "lo" {
			return nil
		}
		p := netip.PrefixFrom(dst, bits).Masked()
		if !seen[p] {
			seen[p] = true
			out = append(out, Network{Prefix: p, Interface: names[oif]})
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list this host's routes: %w", err)
	}
	return out, nil
}

// linkNames maps the namespace's interface indexes to their names.
func linkNames(nl *netlink.Conn) (map[uint32]string, error) {
	names := map[uint32]string{}
	ifi := unix.IfInfomsg{Family: unix.AF_UNSPEC}
	err := nl.Dump(unix.RTM_GETLINK, netlink.StructBytes(&ifi), func(m netlink.Message) error {
		if m.Type != unix.RTM_NEWLINK || len(m.Data) < unix.SizeofIfInfomsg {
			return nil
		}
		index := binary.NativeEndian.Uint32(m.Data[4:8])
		netlink.Attrs(m.Data[unix.SizeofIfInfomsg:], func(typ uint16, data []byte) {
			if typ == unix.IFLA_IFNAME {
				names[index] = strings.TrimRight(string(data), "\x00")
			}
		})
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list this host's interfaces: %w", err)
	}
	return names, nil
}
