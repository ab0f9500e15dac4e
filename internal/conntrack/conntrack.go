// Package conntrack looks connections up in the kernel's connection
// tracking over netlink (ctnetlink), without conntrack(8): whether a
// firewall in the namespace (Docker's DNAT, say) has redirected a
// connection portfwd's child made, which the child needs to know before it
// waits for a reply that can never come back to it.
package conntrack

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/netlink"
)

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

// Table is a netfilter netlink socket of the network namespace of the
// thread that opened it, for lookups in that namespace's connection
// tracking table. Safe for concurrent use.
type Table struct {
	nl *netlink.Conn
}

// Open opens the socket in the calling thread's namespace.
func Open() (*Table, error) {
	nl, err := netlink.Open(unix.NETLINK_NETFILTER)
	if err != nil {
		return nil, err
	}
	return &Table{nl: nl}, nil
}

// Close closes the socket.
func (c *Table) Close() error { return c.nl.Close() }

// ReplySource returns where the kernel expects replies to the connection
// from src to dst (proto unix.IPPROTO_TCP or IPPROTO_UDP) to come from:
// dst itself, unless a NAT rule redirected the connection. ErrNotTracked
// when connection tracking has no entry for it (or is not in use at all).
func (c *Table) ReplySource(proto uint8, src, dst netip.AddrPort) (netip.AddrPort, error) {
	s, d := src.Addr().Unmap(), dst.Addr().Unmap()
	family, srcAttr, dstAttr := byte(unix.AF_INET), uint16(ctaIPv4Src), uint16(ctaIPv4Dst)
	if s.Is6() {
		family, srcAttr, dstAttr = unix.AF_INET6, ctaIPv6Src, ctaIPv6Dst
	}
	ip := netlink.AppendAttr(nil, srcAttr, s.AsSlice())
	ip = netlink.AppendAttr(ip, dstAttr, d.AsSlice())
	pr := netlink.AppendAttr(nil, ctaProtoNum, []byte{proto})
	pr = netlink.AppendAttr(pr, ctaProtoSrcPort, binary.BigEndian.AppendUint16(nil, src.Port()))
	pr = netlink.AppendAttr(pr, ctaProtoDstPort, binary.BigEndian.AppendUint16(nil, dst.Port()))
	tuple := netlink.AppendAttr(nil, ctaTupleIP|unix.NLA_F_NESTED, ip)
	tuple = netlink.AppendAttr(tuple, ctaTupleProto|unix.NLA_F_NESTED, pr)
	body := []byte{family, unix.NFNETLINK_V0, 0, 0} // struct nfgenmsg
	body = netlink.AppendAttr(body, ctaTupleOrig|unix.NLA_F_NESTED, tuple)

	reply, err := c.nl.Get(unix.NFNL_SUBSYS_CTNETLINK<<8|ipctnlMsgCtGet, body)
	switch {
	case errors.Is(err, unix.ENOENT), errors.Is(err, unix.EOPNOTSUPP), errors.Is(err, unix.EPROTONOSUPPORT):
		return netip.AddrPort{}, ErrNotTracked
	case err != nil:
		return netip.AddrPort{}, fmt.Errorf("conntrack lookup %s -> %s: %w", src, dst, err)
	case len(reply) < 4:
		return netip.AddrPort{}, errors.New("conntrack lookup: short reply")
	}
	rt := netlink.FindAttr(reply[4:], ctaTupleReply)
	ap := netip.AddrPortFrom(addrAttr(netlink.FindAttr(netlink.FindAttr(rt, ctaTupleIP), srcAttr)),
		portAttr(netlink.FindAttr(netlink.FindAttr(rt, ctaTupleProto), ctaProtoSrcPort)))
	if !ap.Addr().IsValid() {
		return netip.AddrPort{}, errors.New("conntrack lookup: no reply tuple in the answer")
	}
	return ap, nil
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
