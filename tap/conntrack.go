package tap

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"golang.org/x/sys/unix"
)

// Connection tracking lookups over netlink (ctnetlink), without conntrack(8):
// whether a firewall in the namespace (Docker's DNAT, say) has redirected a
// connection the child made, which portfwd's child needs to know before it
// waits for a reply that can never come back to it.

// Conntrack constants from linux/netfilter/nfnetlink_conntrack.h.
const (
	ipctnlMsgCtGet  = 1
	ctaTupleOrig    = 1
	ctaTupleReply   = 2
	ctaTupleIP      = 1
	ctaTupleProto   = 2
	ctaIPv4Src      = 1
	ctaIPv4Dst      = 2
	ctaIPv6Src      = 3
	ctaIPv6Dst      = 4
	ctaProtoNum     = 1
	ctaProtoSrcPort = 2
	ctaProtoDstPort = 3
)

// ErrNotTracked reports that the kernel tracks no such connection: no
// firewall in the namespace looks at it, so nothing rewrites it.
var ErrNotTracked = errors.New("connection not tracked")

// Conntrack is a netfilter netlink socket of the network namespace of the
// thread that opened it. Safe for concurrent use.
type Conntrack struct {
	nl *netlinkConn
}

// OpenConntrack opens the socket in the calling thread's namespace.
func OpenConntrack() (*Conntrack, error) {
	nl, err := dialNetlinkProto(unix.NETLINK_NETFILTER, "netfilter netlink")
	if err != nil {
		return nil, err
	}
	return &Conntrack{nl: nl}, nil
}

// Close closes the socket.
func (c *Conntrack) Close() error {
	c.nl.close()
	return nil
}

// ReplySource returns where the kernel expects replies to the connection
// from src to dst (proto unix.IPPROTO_TCP or IPPROTO_UDP) to come from:
// dst itself, unless a NAT rule redirected the connection. ErrNotTracked
// when connection tracking has no entry for it (or is not in use at all).
func (c *Conntrack) ReplySource(proto uint8, src, dst netip.AddrPort) (netip.AddrPort, error) {
	s, d := src.Addr().Unmap(), dst.Addr().Unmap()
	family, srcAttr, dstAttr := byte(unix.AF_INET), uint16(ctaIPv4Src), uint16(ctaIPv4Dst)
	if s.Is6() {
		family, srcAttr, dstAttr = unix.AF_INET6, ctaIPv6Src, ctaIPv6Dst
	}
	ip := appendAttr(nil, srcAttr, s.AsSlice())
	ip = appendAttr(ip, dstAttr, d.AsSlice())
	pr := appendAttr(nil, ctaProtoNum, []byte{proto})
	pr = appendAttr(pr, ctaProtoSrcPort, binary.BigEndian.AppendUint16(nil, src.Port()))
	pr = appendAttr(pr, ctaProtoDstPort, binary.BigEndian.AppendUint16(nil, dst.Port()))
	tuple := appendAttr(nil, ctaTupleIP|unix.NLA_F_NESTED, ip)
	tuple = appendAttr(tuple, ctaTupleProto|unix.NLA_F_NESTED, pr)
	body := []byte{family, unix.NFNETLINK_V0, 0, 0} // struct nfgenmsg
	body = appendAttr(body, ctaTupleOrig|unix.NLA_F_NESTED, tuple)

	reply, err := c.nl.get(unix.NFNL_SUBSYS_CTNETLINK<<8|ipctnlMsgCtGet, body)
	switch {
	case errors.Is(err, unix.ENOENT), errors.Is(err, unix.EOPNOTSUPP), errors.Is(err, unix.EPROTONOSUPPORT):
		return netip.AddrPort{}, ErrNotTracked
	case err != nil:
		return netip.AddrPort{}, fmt.Errorf("conntrack lookup %s -> %s: %w", src, dst, err)
	case len(reply) < 4:
		return netip.AddrPort{}, errors.New("conntrack lookup: short reply")
	}
	rt := findAttr(reply[4:], ctaTupleReply)
	ap := netip.AddrPortFrom(addrAttr(findAttr(findAttr(rt, ctaTupleIP), srcAttr)),
		portAttr(findAttr(findAttr(rt, ctaTupleProto), ctaProtoSrcPort)))
	if !ap.Addr().IsValid() {
		return netip.AddrPort{}, errors.New("conntrack lookup: no reply tuple in the answer")
	}
	return ap, nil
}

// findAttr returns the payload of the first netlink attribute of type typ
// (nested flag ignored) in b, or nil.
func findAttr(b []byte, typ uint16) []byte {
	for len(b) >= unix.SizeofRtAttr {
		l := int(binary.NativeEndian.Uint16(b))
		t := binary.NativeEndian.Uint16(b[2:]) &^ (unix.NLA_F_NESTED | unix.NLA_F_NET_BYTEORDER)
		if l < unix.SizeofRtAttr || l > len(b) {
			return nil
		}
		if t == typ {
			return b[unix.SizeofRtAttr:l]
		}
		b = b[min((l+3)&^3, len(b)):]
	}
	return nil
}

func addrAttr(b []byte) netip.Addr {
	a, _ := netip.AddrFromSlice(b)
	return a
}

func portAttr(b []byte) uint16 {
	if len(b) != 2 {
		return 0
	}
	return binary.BigEndian.Uint16(b)
}
