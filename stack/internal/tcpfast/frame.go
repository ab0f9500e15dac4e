package tcpfast

import (
	"encoding/binary"
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/gonetns/gonetns/tap"
)

// virtio_net_hdr gso_type values.
const (
	vnetGSOTCPv4 = 1
	vnetGSOTCPv6 = 4
)

// maxPayload is the most a frame to the sandbox carries: a TCP segment the
// sandbox's kernel takes whole through the virtio-net header (its IP
// length field bounds it below 64 KiB, with room for headers and options).
const maxPayload = 65535 - header.IPv6MinimumSize - header.TCPMinimumSize - header.TCPOptionsMaximumSize

// hdrRoom holds the headers of one frame: virtio-net, Ethernet, IPv6 and
// TCP with the largest options.
const hdrRoom = tap.VNetHdrLen + header.EthernetMinimumSize + header.IPv6MinimumSize + header.TCPMinimumSize + header.TCPOptionsMaximumSize

// tx is the scratch space frames to the sandbox are built in: headers, a
// payload buffer that a peek fills, and the I/O vector of the write.
// Taken from the engine's pool for one exchange.
type tx struct {
	hdr     [hdrRoom]byte
	payload []byte // maxPayload bytes
	iov     [2][]byte
	opts    [header.TCPOptionsMaximumSize]byte
}

// ends is what a frame needs to know of a connection: its addresses.
type ends struct {
	v6             bool
	mayFragment    bool           // IPv4 without DF: the path's MTU is below minPMTU4 (pmtu.go)
	local, remote  netip.AddrPort // local: the address the sandbox connected to
	mac, remoteMAC tcpip.LinkAddress
}

// fields are the TCP header fields of a frame.
type fields struct {
	flags    header.TCPFlags
	seq, ack uint32
	wnd      uint16
	opts     []byte // a multiple of 4 bytes
}

// write sends a TCP segment to the sandbox: payload (which may be longer
// than mss) goes out as one frame with the virtio-net header's TSO, or,
// on a device without that header, cut into mss-sized frames.
func (e *Engine) write(t *tx, ep *ends, f fields, payload []byte, mss int) error {
	// The MSS counts no options: each segment carries ours too (a
	// router inside the sandbox cutting a 64 KiB frame into MSS-sized
	// segments for a link of the sandbox's MTU would otherwise make them
	// too long to forward).
	mss -= len(f.opts)
	if !e.vnet && len(payload) > mss {
		for len(payload) > 0 {
			n := min(len(payload), mss)
			g := f
			if n < len(payload) {
				g.flags &^= flagFIN | flagPSH
			}
			if err := e.write(t, ep, g, payload[:n], mss+len(f.opts)); err != nil {
				return err
			}
			payload = payload[n:]
			f.seq += uint32(n)
		}
		return nil
	}
	b := t.hdr[:]
	off := 0
	if e.vnet {
		off = tap.VNetHdrLen
	}
	l2 := off + header.EthernetMinimumSize
	l3 := header.IPv4MinimumSize
	proto := header.IPv4ProtocolNumber
	if ep.v6 {
		l3 = header.IPv6MinimumSize
		proto = header.IPv6ProtocolNumber
	}
	tcpLen := header.TCPMinimumSize + len(f.opts)
	end := l2 + l3 + tcpLen
	header.Ethernet(b[off:]).Encode(&header.EthernetFields{SrcAddr: ep.mac, DstAddr: ep.remoteMAC, Type: proto})
	src, dst := tcpipAddr(ep.local.Addr()), tcpipAddr(ep.remote.Addr())
	segLen := tcpLen + len(payload)
	if ep.v6 {
		header.IPv6(b[l2:]).Encode(&header.IPv6Fields{
			PayloadLength:     uint16(segLen),
			TransportProtocol: header.TCPProtocolNumber,
			HopLimit:          64,
			SrcAddr:           src,
			DstAddr:           dst,
		})
	} else {
		df := uint8(header.IPv4FlagDontFragment)
		if ep.mayFragment {
			df = 0
		}
		ip := header.IPv4(b[l2:])
		ip.Encode(&header.IPv4Fields{
			TotalLength: uint16(l3 + segLen),
			Flags:       df,
			TTL:         64,
			Protocol:    uint8(header.TCPProtocolNumber),
			SrcAddr:     src,
			DstAddr:     dst,
		})
		ip.SetChecksum(^ip.CalculateChecksum())
	}
	tcp := header.TCP(b[l2+l3:])
	tcp.Encode(&header.TCPFields{
		SrcPort:    ep.local.Port(),
		DstPort:    ep.remote.Port(),
		SeqNum:     f.seq,
		AckNum:     f.ack,
		DataOffset: uint8(tcpLen),
		Flags:      f.flags,
		WindowSize: f.wnd,
	})
	copy(tcp[header.TCPMinimumSize:], f.opts)
	sum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, src, dst, uint16(segLen))
	if e.vnet {
		// CHECKSUM_PARTIAL: the pseudo-header's sum in the field, the
		// rest left to the sandbox's kernel, which skips it for local
		// delivery and finishes it when it forwards the segment.
		tcp.SetChecksum(sum)
		v := b[:tap.VNetHdrLen]
		clear(v)
		v[0] = vnetFlagNeedsCsum
		binary.LittleEndian.PutUint16(v[2:], uint16(end-off))
		binary.LittleEndian.PutUint16(v[6:], uint16(l2+l3-off))
		binary.LittleEndian.PutUint16(v[8:], header.TCPChecksumOffset)
		if len(payload) > mss {
			v[1] = vnetGSOTCPv4
			if ep.v6 {
				v[1] = vnetGSOTCPv6
			}
			binary.LittleEndian.PutUint16(v[4:], uint16(mss))
		}
	} else {
		sum = checksum.Checksum(payload, sum)
		tcp.SetChecksum(^tcp.CalculateChecksum(sum))
	}
	t.iov[0], t.iov[1] = b[:end], payload
	iov := t.iov[:1]
	if len(payload) > 0 {
		iov = t.iov[:2]
	}
	_, err := e.cfg.Device.Write(iov)
	t.iov[0], t.iov[1] = nil, nil
	return err
}
