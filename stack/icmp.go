package stack

import (
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"net/netip"
	"sync/atomic"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// EchoRequest is an ICMP (or ICMPv6) echo request from the sandbox.
type EchoRequest struct {
	// Src is the sandbox's address; Dst the address it pings.
	Src, Dst netip.Addr
	// ID and Seq are the echo identifier and sequence number.
	ID, Seq uint16
	// Data is the payload after the 8-byte echo header (a copy).
	Data []byte

	st     *Stack
	srcMAC tcpip.LinkAddress
	gs     *stack.Stack
	pkt    atomic.Pointer[stack.PacketBuffer] // the request, during the Echo handler only
}

func (st *Stack) handleICMPv4(s *stack.Stack, pkt *stack.PacketBuffer) bool {
	h := header.ICMPv4(pkt.TransportHeader().Slice())
	if len(h) < header.ICMPv4MinimumSize || h.Type() != header.ICMPv4Echo || h.Code() != 0 {
		return false
	}
	ip := header.IPv4(pkt.NetworkHeader().Slice())
	return st.handleEcho(st.echoRequest(s, ip.SourceAddress(), ip.DestinationAddress(), h.Ident(), h.Sequence(), pkt))
}

func (st *Stack) handleICMPv6(s *stack.Stack, pkt *stack.PacketBuffer) bool {
	h := header.ICMPv6(pkt.TransportHeader().Slice())
	if len(h) < header.ICMPv6EchoMinimumSize || h.Type() != header.ICMPv6EchoRequest || h.Code() != 0 {
		return false
	}
	ip := header.IPv6(pkt.NetworkHeader().Slice())
	return st.handleEcho(st.echoRequest(s, ip.SourceAddress(), ip.DestinationAddress(), h.Ident(), h.Sequence(), pkt))
}

// handleEcho runs the Echo handler; the packet is the request's only while
// it runs.
func (st *Stack) handleEcho(r *EchoRequest) bool {
	handled := st.cfg.Echo(r)
	r.pkt.Store(nil)
	return handled
}

func (st *Stack) echoRequest(gs *stack.Stack, src, dst tcpip.Address, id, seq uint16, pkt *stack.PacketBuffer) *EchoRequest {
	s, _ := netip.AddrFromSlice(src.AsSlice())
	d, _ := netip.AddrFromSlice(dst.AsSlice())
	var mac tcpip.LinkAddress
	if lh := pkt.LinkHeader().Slice(); len(lh) >= header.EthernetMinimumSize {
		mac = header.Ethernet(lh).SourceAddress()
	}
	r := &EchoRequest{Src: s, Dst: d, ID: id, Seq: seq, Data: pkt.Data().AsRange().ToSlice(), st: st, gs: gs, srcMAC: mac}
	r.pkt.Store(pkt)
	return r
}

// Prohibit answers the request with ICMP destination unreachable,
// "administratively prohibited" (ping prints "Packet filtered"; over IPv6,
// "Administratively prohibited"), as a firewall does. Call it from the
// Echo handler, which then returns true.
func (r *EchoRequest) Prohibit() error {
	return prohibit(r.gs, r.pkt.Load())
}

// Unreachable answers the request with ICMP destination unreachable for
// err, the error the host's ping socket gave when it was sent: ENETUNREACH
// "net unreachable" (ICMPv6 "no route"), EHOSTUNREACH "host unreachable"
// (ICMPv6 "address unreachable"), as a router without a route, or one
// that failed to find the host on its link, answers; ping(8) prints
// "Destination Net Unreachable" ("Destination Host Unreachable") at once,
// where it waited for its timeout and counted the request lost. Any other
// err sends nothing and is returned. Call it from the Echo handler, which
// then returns true.
func (r *EchoRequest) Unreachable(err error) error {
	switch {
	case errors.Is(err, unix.ENETUNREACH):
		return reject(r.gs, r.pkt.Load(), stack.RejectIPv4WithICMPNetUnreachable, stack.RejectIPv6WithICMPNoRoute)
	case errors.Is(err, unix.EHOSTUNREACH):
		return reject(r.gs, r.pkt.Load(), stack.RejectIPv4WithICMPHostUnreachable, stack.RejectIPv6WithICMPAddrUnreachable)
	}
	return err
}

// Reply sends an echo reply with sequence number seq and data to the
// sandbox, as if from Dst (with this request's ID). It may be called any
// number of times, from any goroutine.
func (r *EchoRequest) Reply(seq uint16, data []byte) error {
	s, err := r.st.running()
	if err != nil {
		return err
	}
	if r.srcMAC == "" {
		return errors.New("stack: echo request without a link address")
	}
	var pkt []byte
	var proto tcpip.NetworkProtocolNumber
	if r.Src.Is4() {
		proto = ipv4.ProtocolNumber
		pkt = make([]byte, header.IPv4MinimumSize+header.ICMPv4MinimumSize+len(data))
		ip := header.IPv4(pkt)
		ip.Encode(&header.IPv4Fields{
			TotalLength: uint16(len(pkt)),
			ID:          uint16(rand.Uint32()),
			TTL:         64,
			Protocol:    uint8(header.ICMPv4ProtocolNumber),
			SrcAddr:     tcpip.AddrFrom4(r.Dst.As4()),
			DstAddr:     tcpip.AddrFrom4(r.Src.As4()),
		})
		ip.SetChecksum(^ip.CalculateChecksum())
		icmp := header.ICMPv4(pkt[header.IPv4MinimumSize:])
		icmp.SetType(header.ICMPv4EchoReply)
		icmp.SetIdent(r.ID)
		icmp.SetSequence(seq)
		copy(icmp.Payload(), data)
		icmp.SetChecksum(^checksum.Checksum(icmp, 0))
	} else {
		proto = ipv6.ProtocolNumber
		pkt = make([]byte, header.IPv6MinimumSize+header.ICMPv6EchoMinimumSize+len(data))
		src, dst := tcpip.AddrFrom16(r.Dst.As16()), tcpip.AddrFrom16(r.Src.As16())
		ip := header.IPv6(pkt)
		ip.Encode(&header.IPv6Fields{
			PayloadLength:     uint16(len(pkt) - header.IPv6MinimumSize),
			TransportProtocol: header.ICMPv6ProtocolNumber,
			HopLimit:          64,
			SrcAddr:           src,
			DstAddr:           dst,
		})
		icmp := header.ICMPv6(pkt[header.IPv6MinimumSize:])
		icmp.SetType(header.ICMPv6EchoReply)
		icmp.SetIdent(r.ID)
		icmp.SetSequence(seq)
		copy(icmp.Payload(), data)
		icmp.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{Header: icmp[:header.ICMPv6EchoMinimumSize], Src: src, Dst: dst, PayloadCsum: checksum.Checksum(data, 0), PayloadLen: len(data)}))
	}
	for _, f := range fragments(pkt, int(r.st.cfg.MTU), r.Src.Is4()) {
		if terr := s.WritePacketToRemote(nicID, r.srcMAC, proto, buffer.MakeWithData(f)); terr != nil {
			return Err(terr)
		}
	}
	return nil
}

// fragments splits the IP packet pkt (IPv4 when v4, else IPv6; a header
// without options or extensions) into fragments that fit mtu, as a host
// sends an echo reply larger than its link's MTU. Whole, such a reply
// reached the sandbox over a TAP, whose kernel takes a frame past the
// MTU, but never over the packet link's veth, which drops it: a ping of
// 1473 bytes or more at MTU 1500 lost every reply there, with no error.
func fragments(pkt []byte, mtu int, v4 bool) [][]byte {
	if len(pkt) <= mtu {
		return [][]byte{pkt}
	}
	hl := header.IPv6MinimumSize
	if v4 {
		hl = header.IPv4MinimumSize
	}
	payload := pkt[hl:]
	most := (mtu - hl) &^ 7
	if !v4 {
		most = (mtu - hl - header.IPv6FragmentHeaderSize) &^ 7
	}
	id := rand.Uint32()
	var out [][]byte
	for off := 0; off < len(payload); off += most {
		chunk := payload[off:min(off+most, len(payload))]
		more := off+len(chunk) < len(payload)
		if v4 {
			f := make([]byte, hl+len(chunk))
			copy(f, pkt[:hl])
			copy(f[hl:], chunk)
			ip := header.IPv4(f)
			ip.SetTotalLength(uint16(len(f)))
			flags := uint8(0)
			if more {
				flags = header.IPv4FlagMoreFragments
			}
			ip.SetFlagsFragmentOffset(flags, uint16(off))
			ip.SetChecksum(0)
			ip.SetChecksum(^ip.CalculateChecksum())
			out = append(out, f)
			continue
		}
		f := make([]byte, hl+header.IPv6FragmentHeaderSize+len(chunk))
		copy(f, pkt[:hl])
		ip := header.IPv6(f)
		ip.SetNextHeader(uint8(header.IPv6FragmentHeader))
		ip.SetPayloadLength(uint16(header.IPv6FragmentHeaderSize + len(chunk)))
		fh := f[hl : hl+header.IPv6FragmentHeaderSize]
		fh[0] = uint8(header.ICMPv6ProtocolNumber)
		fh[1] = 0
		m := uint16(0)
		if more {
			m = 1
		}
		binary.BigEndian.PutUint16(fh[2:], uint16(off)|m) // offset in 8-byte units, shifted by 3
		binary.BigEndian.PutUint32(fh[4:], id)
		copy(f[hl+header.IPv6FragmentHeaderSize:], chunk)
		out = append(out, f)
	}
	return out
}
