package tcpfast

import (
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// Path MTU discovery. A router inside the sandbox (a container's bridge,
// a nested namespace, a tunnel) that cannot forward a segment of ours onto
// a link of smaller MTU answers with ICMP "fragmentation needed" (ICMPv6
// "packet too big") quoting the segment's headers. The engine lowers the
// connection's MSS to fit and sends what is in flight again in segments of
// that size, as Linux does (tcp_v4_mtu_reduced, tcp_simple_retransmit).
// Before, the report went to the stack, which has no such connection, and
// the engine resent the same segments until the connection was reset: a
// download into a namespace behind a link of MTU 1280 inside the sandbox
// stalled for good.

// The smallest path MTU the engine takes: a report below it counts as it
// (Linux's net.ipv4.route.min_pmtu, 552; IPv6's minimum link MTU, 1280),
// so that no report makes a connection crawl in tiny segments. Below
// IPv4's, the connection's packets go without "don't fragment", for the
// router to fragment, as Linux sends them then (a link of MTU 500 inside
// the sandbox stalled a download for good: the 552-byte packets were
// refused again and again).
const (
	minPMTU4 = 552
	minPMTU6 = header.IPv6MinimumMTU
)

// minSndMSS is the smallest MSS the engine sends with, whatever the
// sandbox announces (Linux's net.ipv4.tcp_min_snd_mss).
const minSndMSS = 48

// tooBig is a parsed report that a segment of ours did not fit a link.
type tooBig struct {
	k   key    // the connection, as its segments from the sandbox name it
	seq uint32 // the sequence number of the segment that did not fit
	mtu int    // the link's MTU
}

// parseTooBig reads a "fragmentation needed" or "packet too big" report
// out of an Ethernet frame addressed to mac: the ICMP message must be
// whole in head, its checksum right, and the quoted packet a TCP segment
// from one of the engine's addresses (IPv4 without options, IPv6 without
// extension headers, as the engine sends them). It reports false for any
// other frame.
func parseTooBig(p *tooBig, mac tcpip.LinkAddress, head []byte) bool {
	const l2 = header.EthernetMinimumSize
	eth, ok := toMAC(head, mac)
	if !ok {
		return false
	}
	var quoted []byte
	var local, remote netip.Addr // the quoted segment's source (ours) and destination (the sandbox's)
	switch eth.Type() {
	case header.IPv4ProtocolNumber:
		if len(head) < l2+header.IPv4MinimumSize {
			return false
		}
		ip := header.IPv4(head[l2:])
		hl, tl := int(ip.HeaderLength()), int(ip.TotalLength())
		if head[l2]>>4 != 4 || ip.Protocol() != uint8(header.ICMPv4ProtocolNumber) || ip.More() || ip.FragmentOffset() != 0 ||
			hl < header.IPv4MinimumSize || tl < hl+header.ICMPv4MinimumSize || l2+tl > len(head) {
			return false
		}
		icmp := header.ICMPv4(head[l2+hl : l2+tl])
		if icmp.Type() != header.ICMPv4DstUnreachable || icmp.Code() != header.ICMPv4FragmentationNeeded ||
			checksum.Checksum(icmp, 0) != 0xffff {
			return false
		}
		p.mtu = int(icmp.MTU())
		quoted = icmp[header.ICMPv4MinimumSize:]
		if len(quoted) < header.IPv4MinimumSize+8 || quoted[0] != 0x45 ||
			header.IPv4(quoted).Protocol() != uint8(header.TCPProtocolNumber) {
			return false
		}
		q := header.IPv4(quoted)
		local, remote = netip.AddrFrom4(q.SourceAddress().As4()), netip.AddrFrom4(q.DestinationAddress().As4())
		quoted = quoted[header.IPv4MinimumSize:]
	case header.IPv6ProtocolNumber:
		if len(head) < l2+header.IPv6MinimumSize {
			return false
		}
		ip := header.IPv6(head[l2:])
		end := l2 + header.IPv6MinimumSize + int(ip.PayloadLength())
		if head[l2]>>4 != 6 || ip.NextHeader() != uint8(header.ICMPv6ProtocolNumber) ||
			end < l2+header.IPv6MinimumSize+header.ICMPv6PacketTooBigMinimumSize || end > len(head) {
			return false
		}
		icmp := header.ICMPv6(head[l2+header.IPv6MinimumSize : end])
		if icmp.Type() != header.ICMPv6PacketTooBig || icmp.Code() != 0 {
			return false
		}
		rest := icmp[header.ICMPv6PacketTooBigMinimumSize:]
		if header.ICMPv6Checksum(header.ICMPv6ChecksumParams{
			Header: icmp[:header.ICMPv6PacketTooBigMinimumSize],
			Src:    ip.SourceAddress(), Dst: ip.DestinationAddress(),
			PayloadCsum: checksum.Checksum(rest, 0), PayloadLen: len(rest),
		}) != icmp.Checksum() {
			return false
		}
		p.mtu = int(min(icmp.MTU(), 1<<20))
		quoted = rest
		if len(quoted) < header.IPv6MinimumSize+8 || quoted[0]>>4 != 6 ||
			header.IPv6(quoted).NextHeader() != uint8(header.TCPProtocolNumber) {
			return false
		}
		q := header.IPv6(quoted)
		local, remote = netip.AddrFrom16(q.SourceAddress().As16()), netip.AddrFrom16(q.DestinationAddress().As16())
		quoted = quoted[header.IPv6MinimumSize:]
	default:
		return false
	}
	// The quoted TCP header's first 8 bytes: the ports and the sequence
	// number, all a router must quote.
	tcp := header.TCP(quoted)
	p.k = key{src: netip.AddrPortFrom(remote, tcp.DestinationPort()), dst: netip.AddrPortFrom(local, tcp.SourcePort())}
	p.seq = tcp.SequenceNumber()
	return true
}

// pathMTU takes a report that a segment of c's did not fit a link of the
// sandbox: a segment still in flight lowers the MSS, and what is in flight
// goes again in segments of the new size. A report of a segment already
// acknowledged, or of an MTU the segments fit, changes nothing. c.mu is
// held.
func (c *conn) pathMTU(p *tooBig) {
	if c.state != stEstablished || !seqLEQ(c.sndUna, p.seq) || !seqLT(p.seq, c.sndMax) {
		return
	}
	l3, floor := header.IPv4MinimumSize, minPMTU4
	if c.ends.v6 {
		l3, floor = header.IPv6MinimumSize, minPMTU6
	}
	mss := max(p.mtu, floor) - l3 - header.TCPMinimumSize
	fragment := !c.ends.v6 && p.mtu < floor
	if mss >= c.mss && (!fragment || c.ends.mayFragment) {
		return
	}
	c.mss = min(c.mss, mss)
	c.ends.mayFragment = c.ends.mayFragment || fragment
	c.e.mtuReduced.Add(1)
	t := c.e.txPool.Get().(*tx)
	defer c.e.txPool.Put(t)
	c.goBackN(t)
}
