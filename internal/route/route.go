// Package route is policy routing over rtnetlink, without ip(8): the
// rules and `local` routes that portfwd's child sets up so that replies to
// a published port's clients come back to the sockets that carry the
// clients' own addresses instead of leaving through the TAP, and the route
// lookups that check them; and the list of the networks a namespace
// reaches (Networks), against which a sandbox's subnet is checked.
package route

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/netlink"
)

// loopbackIndex is lo's interface index, the same in every network
// namespace (the kernel's LOOPBACK_IFINDEX), so that no interface lookup
// (which would need to run in the namespace) is needed.
const loopbackIndex = 1

// Rule is one policy-routing rule ("ip rule"): a packet whose flow matches
// every selector that is set looks up Table (when Table has no route for
// it, the kernel goes on with the next rule), or with Goto jumps to the
// rule of that priority, or with Nop does nothing.
type Rule struct {
	IPv6     bool
	Priority uint32
	Table    uint32
	Goto     uint32 // instead of a lookup: go on at this (later) priority
	Nop      bool   // instead of a lookup: nothing (a target for Goto)
	IIf      string // input interface; "lo" matches what this host sends itself
	Mark     uint32 // firewall mark (SO_MARK) to match exactly; 0 matches any
	IPProto  uint8  // unix.IPPROTO_TCP, unix.IPPROTO_UDP; 0 matches any
	SPort    uint16 // source port; 0 matches any
}

func (r Rule) String() string {
	s := fmt.Sprintf("priority %d", r.Priority)
	if r.IPv6 {
		s = "-6 " + s
	}
	if r.IIf != "" {
		s += " iif " + r.IIf
	}
	if r.Mark != 0 {
		s += fmt.Sprintf(" fwmark %#x", r.Mark)
	}
	if r.IPProto != 0 {
		s += fmt.Sprintf(" ipproto %d", r.IPProto)
	}
	if r.SPort != 0 {
		s += fmt.Sprintf(" sport %d", r.SPort)
	}
	switch {
	case r.Goto != 0:
		return s + fmt.Sprintf(" goto %d", r.Goto)
	case r.Nop:
		return s + " nop"
	}
	return s + fmt.Sprintf(" lookup %d", r.Table)
}

// LocalRoute is a route of type local through lo ("ip route add local DST
// dev lo [src SRC] table TABLE"): packets to Dst are delivered to this
// namespace's own sockets although no interface has that address.
type LocalRoute struct {
	Table uint32
	Dst   netip.Prefix
	// Src is the source address of packets sent along the route by a
	// socket that has not chosen one (an unconnected UDP socket bound to
	// 0.0.0.0 replying with sendto); zero lets the kernel pick, which for
	// a local route is the destination itself.
	Src netip.Addr
}

func (r LocalRoute) String() string {
	s := fmt.Sprintf("local %s dev lo", r.Dst)
	if r.Src.IsValid() {
		s += " src " + r.Src.String()
	}
	return s + fmt.Sprintf(" table %d", r.Table)
}

// Flow is what a route lookup is asked about (see Routing.IsLocal): a
// packet this host sends, or with IIf (an interface index) one that
// arrives on that interface from Src, to be forwarded or delivered.
type Flow struct {
	Dst     netip.Addr
	Src     netip.Addr
	IIf     int
	Mark    uint32
	IPProto uint8
	SPort   uint16
}

// Routing is an rtnetlink socket for policy routing. The socket belongs to
// the network namespace of the thread that called Open, and every
// change made through it applies there, whichever thread makes it later.
// Its methods are safe for concurrent use (requests are serialized).
// Errors keep the kernel's errno: errors.Is(err, fs.ErrExist) for a rule
// or route that exists already; deleting one that does not exist is
// unix.ENOENT (rule) or unix.ESRCH (route).
type Routing struct {
	nl *netlink.Conn
}

// Open opens the socket in the calling thread's network namespace.
func Open() (*Routing, error) {
	nl, err := netlink.Open(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, err
	}
	return &Routing{nl: nl}, nil
}

// Close closes the socket; rules and routes stay.
func (r *Routing) Close() error { return r.nl.Close() }

func (r *Routing) do(typ, flags uint16, body []byte) error {
	return r.nl.Request(typ, flags, body)
}

// AddRule adds ru; an identical rule already there is an error matching
// fs.ErrExist.
func (r *Routing) AddRule(ru Rule) error {
	if err := r.do(unix.RTM_NEWRULE, unix.NLM_F_CREATE|unix.NLM_F_EXCL, ru.message()); err != nil {
		return fmt.Errorf("add rule %s: %w", ru, err)
	}
	return nil
}

// DelRule deletes the rule matching ru.
func (r *Routing) DelRule(ru Rule) error {
	if err := r.do(unix.RTM_DELRULE, 0, ru.message()); err != nil {
		return fmt.Errorf("delete rule %s: %w", ru, err)
	}
	return nil
}

// AddLocalRoute adds rt; the same destination in the same table already
// there is an error matching fs.ErrExist.
func (r *Routing) AddLocalRoute(rt LocalRoute) error {
	if err := r.do(unix.RTM_NEWROUTE, unix.NLM_F_CREATE|unix.NLM_F_EXCL, rt.message()); err != nil {
		return fmt.Errorf("add route %s: %w", rt, err)
	}
	return nil
}

// DelLocalRoute deletes rt.
func (r *Routing) DelLocalRoute(rt LocalRoute) error {
	if err := r.do(unix.RTM_DELROUTE, 0, rt.message()); err != nil {
		return fmt.Errorf("delete route %s: %w", rt, err)
	}
	return nil
}

// IsLocal reports whether the kernel would deliver a packet of flow f to
// this namespace's own sockets (a route of type local), as "ip route get"
// would answer, with the rules in force. A destination with no route at
// all is not local.
func (r *Routing) IsLocal(f Flow) (bool, error) {
	if !f.Dst.IsValid() {
		return false, errors.New("route lookup: no destination")
	}
	dst := f.Dst.Unmap()
	family := uint8(unix.AF_INET)
	if dst.Is6() {
		family = unix.AF_INET6
	}
	rtm := unix.RtMsg{Family: family, Dst_len: uint8(dst.BitLen())}
	if f.Src.IsValid() {
		rtm.Src_len = uint8(f.Src.BitLen())
	}
	body := netlink.StructBytes(&rtm)
	body = netlink.AppendAttr(body, unix.RTA_DST, dst.AsSlice())
	if f.Src.IsValid() {
		body = netlink.AppendAttr(body, unix.RTA_SRC, f.Src.Unmap().AsSlice())
	}
	if f.IIf != 0 {
		body = netlink.AppendAttr(body, unix.RTA_IIF, binary.NativeEndian.AppendUint32(nil, uint32(f.IIf)))
	}
	if f.Mark != 0 {
		body = netlink.AppendAttr(body, unix.RTA_MARK, binary.NativeEndian.AppendUint32(nil, f.Mark))
	}
	if f.IPProto != 0 {
		body = netlink.AppendAttr(body, unix.RTA_IP_PROTO, []byte{f.IPProto})
	}
	if f.SPort != 0 {
		body = netlink.AppendAttr(body, unix.RTA_SPORT, binary.BigEndian.AppendUint16(nil, f.SPort))
	}
	reply, err := r.nl.Get(unix.RTM_GETROUTE, body)
	switch {
	case errors.Is(err, unix.ENETUNREACH), errors.Is(err, unix.EHOSTUNREACH):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("route lookup for %s: %w", dst, err)
	case len(reply) < unix.SizeofRtMsg:
		return false, fmt.Errorf("route lookup for %s: short reply (%d bytes)", dst, len(reply))
	}
	return reply[7] == unix.RTN_LOCAL, nil // rtmsg.rtm_type
}

// message is the RTM_NEWRULE / RTM_DELRULE body: struct fib_rule_hdr and
// its attributes.
func (ru Rule) message() []byte {
	family := byte(unix.AF_INET)
	if ru.IPv6 {
		family = unix.AF_INET6
	}
	// family, dst_len, src_len, tos, table, res1, res2, action; flags.
	hdr := []byte{family, 0, 0, 0, 0, 0, 0, unix.FR_ACT_TO_TBL, 0, 0, 0, 0}
	b := netlink.AppendAttr(hdr, unix.FRA_PRIORITY, binary.NativeEndian.AppendUint32(nil, ru.Priority))
	switch {
	case ru.Goto != 0:
		b[7] = unix.FR_ACT_GOTO
		b = netlink.AppendAttr(b, unix.FRA_GOTO, binary.NativeEndian.AppendUint32(nil, ru.Goto))
	case ru.Nop:
		b[7] = unix.FR_ACT_NOP
	default:
		if ru.Table < 256 {
			b[4] = byte(ru.Table)
		}
		b = netlink.AppendAttr(b, unix.FRA_TABLE, binary.NativeEndian.AppendUint32(nil, ru.Table))
	}
	if ru.IIf != "" {
		b = netlink.AppendAttr(b, unix.FRA_IIFNAME, append([]byte(ru.IIf), 0))
	}
	if ru.Mark != 0 {
		b = netlink.AppendAttr(b, unix.FRA_FWMARK, binary.NativeEndian.AppendUint32(nil, ru.Mark))
		b = netlink.AppendAttr(b, unix.FRA_FWMASK, binary.NativeEndian.AppendUint32(nil, 0xffffffff))
	}
	if ru.IPProto != 0 {
		b = netlink.AppendAttr(b, unix.FRA_IP_PROTO, []byte{ru.IPProto})
	}
	if ru.SPort != 0 {
		// struct fib_rule_port_range: start and end, host byte order.
		pr := binary.NativeEndian.AppendUint16(nil, ru.SPort)
		pr = binary.NativeEndian.AppendUint16(pr, ru.SPort)
		b = netlink.AppendAttr(b, unix.FRA_SPORT_RANGE, pr)
	}
	return b
}

// message is the RTM_NEWROUTE / RTM_DELROUTE body.
func (rt LocalRoute) message() []byte {
	family := uint8(unix.AF_INET)
	if rt.Dst.Addr().Is6() {
		family = unix.AF_INET6
	}
	rtm := unix.RtMsg{
		Family:   family,
		Dst_len:  uint8(rt.Dst.Bits()),
		Protocol: unix.RTPROT_STATIC,
		Scope:    unix.RT_SCOPE_HOST,
		Type:     unix.RTN_LOCAL,
	}
	if rt.Table < 256 {
		rtm.Table = uint8(rt.Table)
	}
	b := netlink.StructBytes(&rtm)
	if rt.Dst.Bits() > 0 {
		b = netlink.AppendAttr(b, unix.RTA_DST, rt.Dst.Masked().Addr().AsSlice())
	}
	if rt.Src.IsValid() {
		b = netlink.AppendAttr(b, unix.RTA_PREFSRC, rt.Src.AsSlice())
	}
	b = netlink.AppendAttr(b, unix.RTA_OIF, binary.NativeEndian.AppendUint32(nil, loopbackIndex))
	b = netlink.AppendAttr(b, unix.RTA_TABLE, binary.NativeEndian.AppendUint32(nil, rt.Table))
	return b
}
