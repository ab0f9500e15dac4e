package stack

import (
	"errors"
	"fmt"
	"math"
	"net/netip"
	"sync"

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

	s   *stack.Stack
	pkt *stack.PacketBuffer
	col sliceCollector
	arr [2][]byte // backing for col: a datagram is one or two views
}

// Payload returns the datagram's payload, as slices of the stack's own
// buffers (no copy). They are valid only during the call to Config.UDP.
func (p *UDPPacket) Payload() [][]byte {
	p.col.bufs = p.arr[:0]
	p.pkt.Data().ReadTo(&p.col, true)
	return p.col.bufs
}

// Len is the payload's length.
func (p *UDPPacket) Len() int { return p.pkt.Data().Size() }

// ReturnPath returns the path for answers to this datagram's flow: from
// Dst back to Src.
func (p *UDPPacket) ReturnPath() (*UDPPath, error) {
	if p.pkt == nil {
		return nil, errors.New("stack: UDPPacket used after its handler returned")
	}
	r, terr := p.s.FindRoute(p.pkt.NICID, tcpip.AddrFromSlice(p.Dst.Addr().AsSlice()), tcpip.AddrFromSlice(p.Src.Addr().AsSlice()), p.pkt.NetworkProtocolNumber, false)
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
	if p.pkt == nil {
		return errAnswered
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
		Src: toAddrPort(id.RemoteAddress, id.RemotePort),
		Dst: toAddrPort(id.LocalAddress, id.LocalPort),
		s:   s,
		pkt: pkt,
	}
	ok := st.cfg.UDP(p)
	p.pkt = nil // a handler that kept p gets a clear failure, not stale buffers
	return ok
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
func (u *UDPPath) Write(b []byte) (int, error) {
	if len(b) > MaxPayload {
		return 0, fmt.Errorf("stack: %d-byte datagram: %w", len(b), errTooLong)
	}
	u.mu.Lock()
	r := u.route
	if r == nil {
		u.mu.Unlock()
		return 0, errPathClosed
	}
	r.Acquire()
	u.mu.Unlock()
	defer r.Release()

	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
		ReserveHeaderBytes: header.UDPMinimumSize + int(r.MaxHeaderLength()),
		Payload:            buffer.MakeWithData(b),
	})
	defer pkt.DecRef()
	length := uint16(len(b) + header.UDPMinimumSize)
	hdr := header.UDP(pkt.TransportHeader().Push(header.UDPMinimumSize))
	hdr.Encode(&header.UDPFields{SrcPort: u.local.Port(), DstPort: u.remote.Port(), Length: length})
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
