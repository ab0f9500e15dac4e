package portfwd

import (
	"net"
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A UDP port published on the unspecified address answers from the host
// address each client sent to, not from whichever address the host's route
// to the client prefers: a client's connected socket (most clients) drops
// replies from any other address. The host socket asks for each
// datagram's destination (IP_PKTINFO, IPV6_RECVPKTINFO; on a dual-stack
// socket the latter reports IPv4 destinations as IPv4-mapped) and the
// replies name it as their source.

// pktinfoSpace is enough ancillary data for one pktinfo message of either
// family.
var pktinfoSpace = unix.CmsgSpace(unix.SizeofInet6Pktinfo)

// enablePktinfo turns on destination reporting on conn and returns its
// family.
func enablePktinfo(conn *net.UDPConn) (int, error) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return 0, err
	}
	var family int
	var serr error
	err = rc.Control(func(fd uintptr) {
		if family, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_DOMAIN); serr != nil {
			return
		}
		if family == unix.AF_INET6 {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_RECVPKTINFO, 1)
		} else {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_PKTINFO, 1)
		}
	})
	if err == nil {
		err = serr
	}
	return family, err
}

// pktinfoDst finds the local address a datagram was sent to in its
// ancillary data (IPv4 unmapped); zero when there is none, or when it is
// not an address a reply can come from (multicast).
func pktinfoDst(oob []byte) netip.Addr {
	for len(oob) >= unix.SizeofCmsghdr {
		h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
		l := int(h.Len)
		if l < unix.SizeofCmsghdr || l > len(oob) {
			return netip.Addr{}
		}
		data := oob[unix.CmsgLen(0):l]
		var a netip.Addr
		switch {
		case h.Level == unix.SOL_IP && h.Type == unix.IP_PKTINFO && len(data) >= unix.SizeofInet4Pktinfo:
			// struct in_pktinfo: ifindex, spec_dst (the local address,
			// also for broadcasts), addr (the header's destination).
			a = netip.AddrFrom4([4]byte(data[4:8]))
		case h.Level == unix.SOL_IPV6 && h.Type == unix.IPV6_PKTINFO && len(data) >= unix.SizeofInet6Pktinfo:
			a = netip.AddrFrom16([16]byte(data[0:16])).Unmap() // struct in6_pktinfo: addr, ifindex
		}
		if a.IsValid() {
			if a.IsMulticast() || a.IsUnspecified() {
				return netip.Addr{}
			}
			return a
		}
		oob = oob[min(unix.CmsgSpace(l-unix.CmsgLen(0)), len(oob)):]
	}
	return netip.Addr{}
}

// pktinfoSource is the ancillary data that makes a datagram sent on a
// socket of family leave from local (the interface is left to routing).
func pktinfoSource(family int, local netip.Addr) []byte {
	if family == unix.AF_INET6 {
		b := make([]byte, unix.CmsgSpace(unix.SizeofInet6Pktinfo))
		h := (*unix.Cmsghdr)(unsafe.Pointer(&b[0]))
		h.Level, h.Type = unix.SOL_IPV6, unix.IPV6_PKTINFO
		h.SetLen(unix.CmsgLen(unix.SizeofInet6Pktinfo))
		a := local.As16() // IPv4 as IPv4-mapped
		copy(b[unix.CmsgLen(0):], a[:])
		return b
	}
	b := make([]byte, unix.CmsgSpace(unix.SizeofInet4Pktinfo))
	h := (*unix.Cmsghdr)(unsafe.Pointer(&b[0]))
	h.Level, h.Type = unix.SOL_IP, unix.IP_PKTINFO
	h.SetLen(unix.CmsgLen(unix.SizeofInet4Pktinfo))
	a := local.Unmap().As4()
	copy(b[unix.CmsgLen(0)+4:], a[:]) // ipi_spec_dst
	return b
}
