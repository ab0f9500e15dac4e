package stack

import (
	"errors"
	"fmt"
	"math"
	"net/netip"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
)

// UDP datagrams the sandbox sends to addresses the stack does not listen
// on never become gVisor endpoints: each one is handed to Config.UDP on
// the reader goroutine, as it comes off the TAP, and the answers go back
// through a UDPPath, which writes them to the sandbox through gVisor's
// network layer (routing, fragmentation). Measured against a gVisor
// endpoint per flow (gonet.UDPConn, one goroutine per direction and a
// 64 KiB buffer each): under a flood from the sandbox, the reader kept
// the only P filling the endpoint's queue while the flow's goroutine
// waited for its turn to drain it, so 93% of what was sent was dropped
// (iperf3 -u -b 0 -l 1400: 58 Mbit/s received, pasta 218 in the same
// run); every datagram also crossed two goroutines and two copies.

// UDPPacket is a datagram from the sandbox. It is valid only during the
// call to Config.UDP.
type UDPPacket struct {
	// Src is the sandbox's end; Dst is the address it sends to.
	Src, Dst netip.AddrPort

	s     *stack.Stack
	valid bool                // during the call to Config.UDP
	slow  bool                // Prohibit on the fast path: let gVisor answer
	pkt   *stack.PacketBuffer // from gVisor's UDP layer, or
	raw   []byte              // from the fast path: the payload in the frame
	col   sliceCollector
	arr   [2][]byte // backing for col: a datagram is one or two views
}

// Payload returns the datagram's payload, as slices of the stack's own
// buffers (no copy). They are valid only during the call to Config.UDP.
func (p *UDPPacket) Payload() [][]byte {
	p.col.bufs = p.arr[:0]
	if p.pkt == nil {
		return append(p.col.bufs, p.raw)
	}
	p.pkt.Data().ReadTo(&p.col, true)
	return p.col.bufs
}

// Len is the payload's length.
func (p *UDPPacket) Len() int {
	if p.pkt == nil {
		return len(p.raw)
	}
	return p.pkt.Data().Size()
}

// ReturnPath returns the path for answers to this datagram's flow: from
// Dst back to Src.
func (p *UDPPacket) ReturnPath() (*UDPPath, error) {
	if !p.valid {
		return nil, errors.New("stack: UDPPacket used after its handler returned")
	}
	proto := netProto(p.Src.Addr())
	r, terr := p.s.FindRoute(nicID, tcpip.AddrFromSlice(p.Dst.Addr().AsSlice()), tcpip.AddrFromSlice(p.Src.Addr().AsSlice()), proto, false)
	if terr != nil {
		return nil, fmt.Errorf("stack: route %v -> %v: %w", p.Dst, p.Src, Err(terr))
	}
	return &UDPPath{local: p.Dst, remote: p.Src, route: r}, nil
}

// Prohibit refuses the datagram as a firewall does: it is answered with
// ICMP destination unreachable, "administratively prohibited" (the
// sandbox's socket gets EHOSTUNREACH; over IPv6, EACCES). Call it from the
// UDP handler, which then returns true (the datagram is dealt with).
func (p *UDPPacket) Prohibit() error {
	if !p.valid {
		return errAnswered
	}
	if p.pkt == nil {
		// From the fast path, which has no gVisor packet to answer:
		// the datagram goes the usual way, and its handler call
		// prohibits it again (fastUDP).
		p.slow = true
		return nil
	}
	return prohibit(p.s, p.pkt)
}

// sliceCollector gathers the views a peeking read hands over.
type sliceCollector struct{ bufs [][]byte }

func (c *sliceCollector) Write(b []byte) (int, error) {
	c.bufs = append(c.bufs, b)
	return len(b), nil
}

// handleUDP is gVisor's handler for UDP with no endpoint: a valid
// datagram goes to Config.UDP; false (refused) makes gVisor answer with
// ICMP port unreachable, as it does for anything malformed it counts and
// drops.
func (st *Stack) handleUDP(s *stack.Stack, id stack.TransportEndpointID, pkt *stack.PacketBuffer) bool {
	hdr := header.UDP(pkt.TransportHeader().Slice())
	if len(hdr) < header.UDPMinimumSize {
		return false
	}
	netHdr := pkt.Network()
	lengthOK, csumOK := header.UDPValid(hdr, func() uint16 { return pkt.Data().Checksum() }, uint16(pkt.Data().Size()),
		pkt.NetworkProtocolNumber, netHdr.SourceAddress(), netHdr.DestinationAddress(), pkt.RXChecksumValidated)
	if !lengthOK || !csumOK {
		return false
	}
	p := &UDPPacket{
		Src:   toAddrPort(id.RemoteAddress, id.RemotePort),
		Dst:   toAddrPort(id.LocalAddress, id.LocalPort),
		s:     s,
		valid: true,
		pkt:   pkt,
	}
	ok := st.cfg.UDP(p)
	p.valid, p.pkt = false, nil // a handler that kept p gets a clear failure, not stale buffers
	return ok
}

// fastUDP hands an IPv4 UDP datagram to Config.UDP straight from the
// frame the reader read, before gVisor sees it: in a flood from the
// sandbox, gVisor's network layer and its packet buffers took 23% of the
// parent's CPU (--cpuprofile). Only the plain case is taken (unicast,
// unfragmented, no IP options, valid, not for a socket of the stack such
// as the DNS server); everything else, and a datagram Config.UDP refuses
// or prohibits (whose ICMP answer gVisor writes), goes the usual way, where
// Config.UDP sees it again.
func (st *Stack) fastUDP(s *stack.Stack, vnetHdr, frame []byte) bool {
	const l2, l3 = header.EthernetMinimumSize, header.IPv4MinimumSize
	if len(frame) < l2+l3+header.UDPMinimumSize {
		return false
	}
	eth := header.Ethernet(frame)
	if eth.Type() != header.IPv4ProtocolNumber || eth.DestinationAddress() != st.mac {
		return false
	}
	ip := header.IPv4(frame[l2:])
	if !ip.IsValid(len(ip)) || ip.HeaderLength() != l3 || ip.Protocol() != uint8(header.UDPProtocolNumber) ||
		ip.More() || ip.FragmentOffset() != 0 || ip.TTL() == 0 {
		return false
	}
	// With the virtio-net header the sandbox's kernel hands over its own
	// packets, checksummed or to be (the stack runs with RX checksum
	// offload then, and checks nothing either).
	verify := vnetHdr == nil
	if verify && !ip.IsChecksumValid() {
		return false
	}
	src, dst := ip.SourceAddress(), ip.DestinationAddress()
	srcIP, dstIP := netip.AddrFrom4(src.As4()), netip.AddrFrom4(dst.As4())
	if !unicast(srcIP) || !unicast(dstIP) || st.isBroadcast(dstIP) {
		return false
	}
	udpHdr := header.UDP(ip[l3:ip.TotalLength()])
	if len(udpHdr) < header.UDPMinimumSize {
		return false
	}
	length := int(udpHdr.Length())
	if length < header.UDPMinimumSize || length > len(udpHdr) {
		return false
	}
	payload := udpHdr[header.UDPMinimumSize:length]
	if verify && udpHdr.Checksum() != 0 && !udpHdr.IsChecksumValid(src, dst, checksum.Checksum(payload, 0)) {
		return false
	}
	dstAP := netip.AddrPortFrom(dstIP, udpHdr.DestinationPort())
	if st.listensUDP(dstAP) {
		return false
	}
	p := udpPackets.Get().(*UDPPacket)
	defer udpPackets.Put(p)
	*p = UDPPacket{
		Src:   netip.AddrPortFrom(srcIP, udpHdr.SourcePort()),
		Dst:   dstAP,
		s:     s,
		valid: true,
		raw:   payload,
	}
	ok := st.cfg.UDP(p) && !p.slow
	*p = UDPPacket{} // the pool keeps no frame alive
	return ok
}

// udpPackets are the fast path's datagrams, pooled: Config.UDP gets a
// pointer, which escapes (one object per datagram, before); it is valid
// only during the call.
var udpPackets = sync.Pool{New: func() any { return new(UDPPacket) }}

func unicast(a netip.Addr) bool {
	return !a.IsUnspecified() && !a.IsLoopback() && !a.IsMulticast() && a != netip.AddrFrom4([4]byte{255, 255, 255, 255})
}

// isBroadcast reports whether a is the broadcast address of one of the
// stack's subnets.
func (st *Stack) isBroadcast(a netip.Addr) bool {
	for _, p := range st.cfg.Addresses {
		if p.Addr().Is4() && p.Bits() < 31 && p.Contains(a) {
			m := p.Masked().Addr().As4()
			host := uint32(1)<<(32-p.Bits()) - 1
			v := uint32(m[0])<<24 | uint32(m[1])<<16 | uint32(m[2])<<8 | uint32(m[3]) | host
			if a == netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}) {
				return true
			}
		}
	}
	return false
}

// listensUDP reports whether a UDP socket of the stack (ListenUDP) is
// bound to a.
func (st *Stack) listensUDP(a netip.AddrPort) bool { return listens(&st.udpListen, a) }

// listensTCP reports whether a listener of the stack (ListenTCP) is bound
// to a.
func (st *Stack) listensTCP(a netip.AddrPort) bool { return listens(&st.tcpListen, a) }

func listens(set *atomic.Pointer[map[netip.AddrPort]struct{}], a netip.AddrPort) bool {
	m := set.Load()
	if m == nil {
		return false
	}
	_, ok := (*m)[a]
	return ok
}

// addListener records an address a socket of the stack was opened on
// (never forgotten: a closed one only sends its traffic the usual way).
func (st *Stack) addListener(set *atomic.Pointer[map[netip.AddrPort]struct{}], a netip.AddrPort) {
	st.listenMu.Lock()
	defer st.listenMu.Unlock()
	m := map[netip.AddrPort]struct{}{a: {}}
	if old := set.Load(); old != nil {
		for k := range *old {
			m[k] = struct{}{}
		}
	}
	set.Store(&m)
}

// UDPPath sends datagrams into the sandbox from one address and port to
// another. Safe for concurrent use.
type UDPPath struct {
	local, remote netip.AddrPort

	mu    sync.Mutex
	route *stack.Route // nil once closed
}

// errPathClosed is returned by Write after Close.
var errPathClosed = errors.New("stack: UDP path closed")

// MaxPayload is the largest datagram Write takes.
const MaxPayload = math.MaxUint16 - header.UDPMinimumSize

// Write sends b as one datagram (the stack fragments it if the link's
// MTU needs). b is copied.
func (u *UDPPath) Write(b []byte) (int, error) { return u.WriteFrom(u.local.Port(), b) }

// WriteFrom is Write from another port of the path's address: the answer
// of a server that answers from a port of its own (TFTP's transfers).
func (u *UDPPath) WriteFrom(port uint16, b []byte) (int, error) {
	if len(b) > MaxPayload {
		return 0, fmt.Errorf("stack: %d-byte datagram: %w", len(b), errTooLong)
	}
	r, err := u.acquire()
	if err != nil {
		return 0, err
	}
	defer r.Release()

	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
		ReserveHeaderBytes: header.UDPMinimumSize + int(r.MaxHeaderLength()),
		Payload:            buffer.MakeWithData(b),
	})
	defer pkt.DecRef()
	length := uint16(len(b) + header.UDPMinimumSize)
	hdr := header.UDP(pkt.TransportHeader().Push(header.UDPMinimumSize))
	hdr.Encode(&header.UDPFields{SrcPort: port, DstPort: u.remote.Port(), Length: length})
	pkt.TransportProtocolNumber = udp.ProtocolNumber
	if r.RequiresTXTransportChecksum() {
		xsum := hdr.CalculateChecksum(checksum.Combine(
			header.PseudoHeaderChecksum(udp.ProtocolNumber, r.LocalAddress(), r.RemoteAddress(), length),
			pkt.Data().Checksum()))
		if xsum != math.MaxUint16 { // a zero checksum is sent as all ones (RFC 768)
			xsum = ^xsum
		}
		hdr.SetChecksum(xsum)
	}
	if terr := r.WritePacket(stack.NetworkHeaderParams{Protocol: udp.ProtocolNumber, TTL: r.DefaultTTL()}, pkt); terr != nil {
		return 0, Err(terr)
	}
	return len(b), nil
}

var errTooLong = errors.New("too long for UDP")

// acquire returns the path's route, held for the caller to Release, or
// errPathClosed after Close.
func (u *UDPPath) acquire() (*stack.Route, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.route == nil {
		return nil, errPathClosed
	}
	u.route.Acquire()
	return u.route, nil
}

// Unreachable tells the sandbox that a datagram of this path did not get
// through, for the error err the host's socket reported for it:
// ECONNREFUSED (nothing listens: the host's kernel answered with ICMP port
// unreachable), EHOSTUNREACH or ENETUNREACH. It sends ICMP (ICMPv6)
// destination unreachable with the matching code, quoting the flow's own
// IP and UDP headers, by which the sandbox's kernel finds the socket: a
// connected one then fails with the same error, as it would talking to
// the host directly, rather than waiting for an answer that cannot come.
// Any other err sends nothing and is returned.
func (u *UDPPath) Unreachable(err error) error {
	v4 := u.remote.Addr().Is4()
	var code byte
	switch {
	case errors.Is(err, unix.ECONNREFUSED) && v4:
		code = byte(header.ICMPv4PortUnreachable)
	case errors.Is(err, unix.ECONNREFUSED):
		code = byte(header.ICMPv6PortUnreachable)
	case errors.Is(err, unix.EHOSTUNREACH) && v4:
		code = byte(header.ICMPv4HostUnreachable)
	case errors.Is(err, unix.EHOSTUNREACH):
		code = byte(header.ICMPv6AddressUnreachable)
	case errors.Is(err, unix.ENETUNREACH) && v4:
		code = byte(header.ICMPv4NetUnreachable)
	case errors.Is(err, unix.ENETUNREACH):
		code = byte(header.ICMPv6NetworkUnreachable)
	default:
		return err
	}
	r, err := u.acquire()
	if err != nil {
		return err
	}
	defer r.Release()

	// The quoted datagram: what the sandbox sent, from remote to local,
	// as far as its UDP header (its payload is not needed to find the
	// socket, and the host's kernel did not give it back).
	var msg []byte
	var proto tcpip.TransportProtocolNumber
	if v4 {
		proto = header.ICMPv4ProtocolNumber
		msg = make([]byte, header.ICMPv4MinimumSize+header.IPv4MinimumSize+header.UDPMinimumSize)
		ip := header.IPv4(msg[header.ICMPv4MinimumSize:])
		ip.Encode(&header.IPv4Fields{
			TotalLength: header.IPv4MinimumSize + header.UDPMinimumSize,
			TTL:         64,
			Protocol:    uint8(udp.ProtocolNumber),
			SrcAddr:     tcpip.AddrFrom4(u.remote.Addr().As4()),
			DstAddr:     tcpip.AddrFrom4(u.local.Addr().As4()),
		})
		ip.SetChecksum(^ip.CalculateChecksum())
		header.UDP(msg[header.ICMPv4MinimumSize+header.IPv4MinimumSize:]).Encode(&header.UDPFields{
			SrcPort: u.remote.Port(), DstPort: u.local.Port(), Length: header.UDPMinimumSize})
		icmp := header.ICMPv4(msg)
		icmp.SetType(header.ICMPv4DstUnreachable)
		icmp.SetCode(header.ICMPv4Code(code))
		icmp.SetChecksum(^checksum.Checksum(icmp, 0))
	} else {
		proto = header.ICMPv6ProtocolNumber
		msg = make([]byte, header.ICMPv6DstUnreachableMinimumSize+header.IPv6MinimumSize+header.UDPMinimumSize)
		quoted := msg[header.ICMPv6DstUnreachableMinimumSize:]
		header.IPv6(quoted).Encode(&header.IPv6Fields{
			PayloadLength:     header.UDPMinimumSize,
			TransportProtocol: udp.ProtocolNumber,
			HopLimit:          64,
			SrcAddr:           tcpip.AddrFrom16(u.remote.Addr().As16()),
			DstAddr:           tcpip.AddrFrom16(u.local.Addr().As16()),
		})
		header.UDP(quoted[header.IPv6MinimumSize:]).Encode(&header.UDPFields{
			SrcPort: u.remote.Port(), DstPort: u.local.Port(), Length: header.UDPMinimumSize})
		icmp := header.ICMPv6(msg)
		icmp.SetType(header.ICMPv6DstUnreachable)
		icmp.SetCode(header.ICMPv6Code(code))
		icmp.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{
			Header: icmp[:header.ICMPv6DstUnreachableMinimumSize],
			Src:    tcpip.AddrFrom16(u.local.Addr().As16()), Dst: tcpip.AddrFrom16(u.remote.Addr().As16()),
			PayloadCsum: checksum.Checksum(quoted, 0), PayloadLen: len(quoted)}))
	}
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
		ReserveHeaderBytes: int(r.MaxHeaderLength()),
		Payload:            buffer.MakeWithData(msg),
	})
	defer pkt.DecRef()
	pkt.TransportProtocolNumber = proto
	if terr := r.WritePacket(stack.NetworkHeaderParams{Protocol: proto, TTL: r.DefaultTTL()}, pkt); terr != nil {
		return Err(terr)
	}
	return nil
}

// Close releases the path; Write then fails. Idempotent.
func (u *UDPPath) Close() error {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.route != nil {
		u.route.Release()
		u.route = nil
	}
	return nil
}
