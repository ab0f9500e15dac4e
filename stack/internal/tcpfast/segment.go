package tcpfast

import (
	"encoding/binary"
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// TCP flags.
const (
	flagFIN = header.TCPFlagFin
	flagSYN = header.TCPFlagSyn
	flagRST = header.TCPFlagRst
	flagPSH = header.TCPFlagPsh
	flagACK = header.TCPFlagAck
)

// vnetFlagNeedsCsum marks a frame whose transport checksum is left to be
// filled (virtio_net_hdr.flags).
const vnetFlagNeedsCsum = 1

// maxSACK is how many SACK blocks a segment's options can hold.
const maxSACK = 4

// sackBlock is a range [start, end) of sequence numbers.
type sackBlock struct{ start, end uint32 }

// segment is a TCP segment from the sandbox, parsed out of the frame the
// reader read. Its byte slices point into that frame and are valid only
// while the frame is being handled.
type segment struct {
	v6       bool
	srcMAC   [header.EthernetAddressSize]byte // as bytes: a LinkAddress (a string) would be allocated per frame
	src, dst netip.AddrPort                   // src is the sandbox's end
	seq, ack uint32
	flags    header.TCPFlags
	wnd      uint16

	// Options: those of a SYN, and SACK blocks.
	mss        uint16 // 0: none given
	ws         int    // -1: none given
	sackOK     bool
	sack       [maxSACK]sackBlock
	nsack      int
	ts         bool // a timestamp option: tsVal, tsEcr
	tsVal      uint32
	tsEcr      uint32
	payload    [2][]byte // the payload's bytes in the frame's first and second buffer
	payloadLen int
}

func (s *segment) has(f header.TCPFlags) bool { return s.flags&f != 0 }

// end is the sequence number after the segment (SYN and FIN count one).
func (s *segment) end() uint32 {
	e := s.seq + uint32(s.payloadLen)
	if s.has(flagSYN) {
		e++
	}
	if s.has(flagFIN) {
		e++
	}
	return e
}

// parse reads a TCP segment out of an Ethernet frame addressed to mac:
// head is the frame's first buffer, tail the rest of it (nil for a short
// frame). It reports false for anything it does not take: other protocols,
// other destinations, IP options, IPv6 extension headers, fragments, and
// whatever is malformed or, without a virtio-net header (vnetHdr nil),
// fails its checksum. Those go to the stack, which has an answer for each.
func parse(s *segment, mac tcpip.LinkAddress, vnetHdr, head, tail []byte) bool {
	const l2 = header.EthernetMinimumSize
	eth, ok := toMAC(head, mac)
	if !ok {
		return false
	}
	frameLen := len(head) + len(tail)
	var l3 int // the IP header's length
	var ipLen int
	switch eth.Type() {
	case header.IPv4ProtocolNumber:
		if len(head) < l2+header.IPv4MinimumSize {
			return false
		}
		ip := header.IPv4(head[l2:])
		if ip.HeaderLength() != header.IPv4MinimumSize || ip.Protocol() != uint8(header.TCPProtocolNumber) ||
			ip.More() || ip.FragmentOffset() != 0 || ip.TTL() == 0 || head[l2]>>4 != 4 {
			return false
		}
		ipLen = int(ip.TotalLength())
		if ipLen < header.IPv4MinimumSize+header.TCPMinimumSize || l2+ipLen > frameLen {
			return false
		}
		if vnetHdr == nil && !ip.IsChecksumValid() {
			return false
		}
		src, dst := ip.SourceAddress().As4(), ip.DestinationAddress().As4()
		srcIP, dstIP := netip.AddrFrom4(src), netip.AddrFrom4(dst)
		if !unicast(srcIP) || !unicast(dstIP) {
			return false
		}
		s.v6 = false
		s.src, s.dst = netip.AddrPortFrom(srcIP, 0), netip.AddrPortFrom(dstIP, 0)
		l3 = header.IPv4MinimumSize
	case header.IPv6ProtocolNumber:
		if len(head) < l2+header.IPv6MinimumSize {
			return false
		}
		ip := header.IPv6(head[l2:])
		if head[l2]>>4 != 6 || ip.NextHeader() != uint8(header.TCPProtocolNumber) || ip.HopLimit() == 0 {
			return false
		}
		ipLen = header.IPv6MinimumSize + int(ip.PayloadLength())
		if ipLen < header.IPv6MinimumSize+header.TCPMinimumSize || l2+ipLen > frameLen {
			return false
		}
		src, dst := ip.SourceAddress().As16(), ip.DestinationAddress().As16()
		srcIP, dstIP := netip.AddrFrom16(src), netip.AddrFrom16(dst)
		// An IPv4-mapped address has no place on an IPv6 link (RFC
		// 4291, 2.5.5.2; Linux drops such packets): taken, a crafted
		// SYN to ::ffff:10.0.2.2 was dialled as the IPv4 gateway.
		if !unicast(srcIP) || !unicast(dstIP) || srcIP.IsLinkLocalUnicast() || dstIP.IsLinkLocalUnicast() || srcIP.Is4In6() || dstIP.Is4In6() {
			return false
		}
		s.v6 = true
		s.src, s.dst = netip.AddrPortFrom(srcIP, 0), netip.AddrPortFrom(dstIP, 0)
		l3 = header.IPv6MinimumSize
	default:
		return false
	}
	// The TCP header must lie in the first buffer (2 KiB: always, for a
	// frame the kernel built).
	l4 := l2 + l3
	if len(head) < l4+header.TCPMinimumSize {
		return false
	}
	tcp := header.TCP(head[l4:])
	hlen := int(tcp.DataOffset())
	if hlen < header.TCPMinimumSize || l4+hlen > len(head) || l3+hlen > ipLen {
		return false
	}
	srcPort, dstPort := tcp.SourcePort(), tcp.DestinationPort()
	if srcPort == 0 || dstPort == 0 {
		return false
	}
	s.src = netip.AddrPortFrom(s.src.Addr(), srcPort)
	s.dst = netip.AddrPortFrom(s.dst.Addr(), dstPort)
	s.seq, s.ack = tcp.SequenceNumber(), tcp.AckNumber()
	s.flags = tcp.Flags()
	s.wnd = tcp.WindowSize()
	copy(s.srcMAC[:], head[header.EthernetAddressSize:])

	// The payload: from the end of the TCP header to the end of the IP
	// packet (a short frame can carry Ethernet padding after it).
	start, end := l4+hlen, l2+ipLen
	s.payloadLen = end - start
	if end <= len(head) {
		s.payload[0], s.payload[1] = head[start:end], nil
	} else {
		s.payload[0], s.payload[1] = head[start:], tail[:end-len(head)]
	}
	if vnetHdr == nil && !checksumValid(s, head[l4:l4+hlen]) {
		return false
	}
	parseOptions(s, head[l4+header.TCPMinimumSize:l4+hlen])
	return true
}

// toMAC returns the Ethernet header of the frame whose first buffer is
// head, if the frame is addressed to mac.
func toMAC(head []byte, mac tcpip.LinkAddress) (header.Ethernet, bool) {
	if len(head) < header.EthernetMinimumSize {
		return nil, false
	}
	eth := header.Ethernet(head)
	return eth, eth.DestinationAddress() == mac
}

// remoteMAC is the sandbox's MAC address, for a connection's frames.
func (s *segment) remoteMAC() tcpip.LinkAddress { return tcpip.LinkAddress(s.srcMAC[:]) }

// tcpipAddr is a for gVisor's header encoders and checksums (AsSlice
// would allocate per frame).
func tcpipAddr(a netip.Addr) tcpip.Address {
	if a.Is4() {
		return tcpip.AddrFrom4(a.As4())
	}
	return tcpip.AddrFrom16(a.As16())
}

// checksumValid checks the TCP checksum of a segment whose header is hdr.
func checksumValid(s *segment, hdr []byte) bool {
	src, dst := tcpipAddr(s.src.Addr()), tcpipAddr(s.dst.Addr())
	sum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, src, dst, uint16(len(hdr)+s.payloadLen))
	sum = checksum.Checksum(hdr, sum)
	// An odd-length first part shifts the second's bytes by one.
	sum = checksumParts(s.payload, sum)
	return sum == 0xffff
}

// checksumParts adds the bytes of parts, read as one run, to sum.
func checksumParts(parts [2][]byte, sum uint16) uint16 {
	first, second := parts[0], parts[1]
	if len(first)%2 == 1 && len(second) > 0 {
		// Move one byte over so the first part's length is even.
		sum = checksum.Checksum(first[:len(first)-1], sum)
		pair := [2]byte{first[len(first)-1], second[0]}
		sum = checksum.Checksum(pair[:], sum)
		return checksum.Checksum(second[1:], sum)
	}
	sum = checksum.Checksum(first, sum)
	return checksum.Checksum(second, sum)
}

// parseOptions reads the options a fast-path connection uses: MSS, window
// scale and SACK-permitted (meaningful on a SYN), and SACK blocks. A
// malformed option ends the parse; what was read stays.
func parseOptions(s *segment, b []byte) {
	s.mss, s.ws, s.sackOK, s.nsack, s.ts = 0, -1, false, 0, false
	for i := 0; i < len(b); {
		switch b[i] {
		case header.TCPOptionEOL:
			return
		case header.TCPOptionNOP:
			i++
			continue
		}
		if i+2 > len(b) {
			return
		}
		l := int(b[i+1])
		if l < 2 || i+l > len(b) {
			return
		}
		switch {
		case b[i] == header.TCPOptionMSS && l == 4:
			s.mss = binary.BigEndian.Uint16(b[i+2:])
		case b[i] == header.TCPOptionWS && l == 3:
			s.ws = min(int(b[i+2]), header.MaxWndScale)
		case b[i] == header.TCPOptionSACKPermitted && l == 2:
			s.sackOK = true
		case b[i] == header.TCPOptionTS && l == 10:
			s.ts = true
			s.tsVal, s.tsEcr = binary.BigEndian.Uint32(b[i+2:]), binary.BigEndian.Uint32(b[i+6:])
		case b[i] == header.TCPOptionSACK && (l-2)%8 == 0:
			for j := 2; j+8 <= l && s.nsack < maxSACK; j += 8 {
				s.sack[s.nsack] = sackBlock{binary.BigEndian.Uint32(b[i+j:]), binary.BigEndian.Uint32(b[i+j+4:])}
				s.nsack++
			}
		}
		i += l
	}
}

func unicast(a netip.Addr) bool {
	return !a.IsUnspecified() && !a.IsLoopback() && !a.IsMulticast() && a != netip.AddrFrom4([4]byte{255, 255, 255, 255})
}

// Sequence number comparisons, modulo 2^32.
func seqLT(a, b uint32) bool  { return int32(a-b) < 0 }
func seqLEQ(a, b uint32) bool { return int32(a-b) <= 0 }
func seqMax(a, b uint32) uint32 {
	if seqLT(a, b) {
		return b
	}
	return a
}
