package tcpfast

import (
	"net/netip"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
)

// tooBigFrame is the report a Linux router sends: ICMP "fragmentation
// needed" (ICMPv6 "packet too big") from the sandbox to the engine's
// local address, quoting the header of the segment from local to remote
// with sequence number seq; proto changes the quoted protocol.
func tooBigFrame(local, remote netip.AddrPort, seq uint32, mtu int, proto tcpip.TransportProtocolNumber) []byte {
	const l2 = header.EthernetMinimumSize
	quotedTCP := make([]byte, header.TCPMinimumSize)
	header.TCP(quotedTCP).Encode(&header.TCPFields{SrcPort: local.Port(), DstPort: remote.Port(), SeqNum: seq,
		DataOffset: header.TCPMinimumSize, Flags: flagACK})
	if local.Addr().Is4() {
		q := make([]byte, header.IPv4MinimumSize+len(quotedTCP))
		header.IPv4(q).Encode(&header.IPv4Fields{TotalLength: 1500, TTL: 63, Protocol: uint8(proto), Flags: header.IPv4FlagDontFragment,
			SrcAddr: tcpip.AddrFrom4(local.Addr().As4()), DstAddr: tcpip.AddrFrom4(remote.Addr().As4())})
		copy(q[header.IPv4MinimumSize:], quotedTCP)
		icmpLen := header.ICMPv4MinimumSize + len(q)
		b := make([]byte, l2+header.IPv4MinimumSize+icmpLen)
		header.Ethernet(b).Encode(&header.EthernetFields{SrcAddr: fuzzSandboxMAC, DstAddr: fuzzEngineMAC, Type: header.IPv4ProtocolNumber})
		ip := header.IPv4(b[l2:])
		ip.Encode(&header.IPv4Fields{TotalLength: uint16(header.IPv4MinimumSize + icmpLen), TTL: 64, Protocol: uint8(header.ICMPv4ProtocolNumber),
			SrcAddr: tcpip.AddrFrom4(remote.Addr().As4()), DstAddr: tcpip.AddrFrom4(local.Addr().As4())})
		ip.SetChecksum(^ip.CalculateChecksum())
		icmp := header.ICMPv4(b[l2+header.IPv4MinimumSize:])
		icmp.SetType(header.ICMPv4DstUnreachable)
		icmp.SetCode(header.ICMPv4FragmentationNeeded)
		icmp.SetMTU(uint16(mtu))
		copy(icmp[header.ICMPv4MinimumSize:], q)
		icmp.SetChecksum(^checksum.Checksum(icmp, 0))
		return b
	}
	q := make([]byte, header.IPv6MinimumSize+len(quotedTCP))
	header.IPv6(q).Encode(&header.IPv6Fields{PayloadLength: 1400, TransportProtocol: proto, HopLimit: 63,
		SrcAddr: tcpip.AddrFrom16(local.Addr().As16()), DstAddr: tcpip.AddrFrom16(remote.Addr().As16())})
	copy(q[header.IPv6MinimumSize:], quotedTCP)
	icmpLen := header.ICMPv6PacketTooBigMinimumSize + len(q)
	b := make([]byte, l2+header.IPv6MinimumSize+icmpLen)
	header.Ethernet(b).Encode(&header.EthernetFields{SrcAddr: fuzzSandboxMAC, DstAddr: fuzzEngineMAC, Type: header.IPv6ProtocolNumber})
	src, dst := tcpip.AddrFrom16(remote.Addr().As16()), tcpip.AddrFrom16(local.Addr().As16())
	header.IPv6(b[l2:]).Encode(&header.IPv6Fields{PayloadLength: uint16(icmpLen), TransportProtocol: header.ICMPv6ProtocolNumber, HopLimit: 64,
		SrcAddr: src, DstAddr: dst})
	icmp := header.ICMPv6(b[l2+header.IPv6MinimumSize:])
	icmp.SetType(header.ICMPv6PacketTooBig)
	icmp.SetMTU(uint32(mtu))
	copy(icmp[header.ICMPv6PacketTooBigMinimumSize:], q)
	icmp.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{Header: icmp[:header.ICMPv6PacketTooBigMinimumSize],
		Src: src, Dst: dst, PayloadCsum: checksum.Checksum(q, 0), PayloadLen: len(q)}))
	return b
}

func TestParseTooBig(t *testing.T) {
	l4, r4 := netip.MustParseAddrPort("10.0.2.2:8080"), netip.MustParseAddrPort("10.0.2.100:40000")
	l6, r6 := netip.MustParseAddrPort("[fd00::2]:8080"), netip.MustParseAddrPort("[fd00::100]:40000")
	corrupt := func(b []byte, at int) []byte { b = append([]byte(nil), b...); b[len(b)-at] ^= 0x40; return b }
	cases := []struct {
		name  string
		frame []byte
		want  *tooBig
	}{
		{"IPv4", tooBigFrame(l4, r4, 12345, 1280, header.TCPProtocolNumber), &tooBig{k: key{r4, l4}, seq: 12345, mtu: 1280}},
		{"IPv6", tooBigFrame(l6, r6, 777, 1400, header.TCPProtocolNumber), &tooBig{k: key{r6, l6}, seq: 777, mtu: 1400}},
		{"IPv4 quoting UDP", tooBigFrame(l4, r4, 1, 1280, header.UDPProtocolNumber), nil},
		{"IPv6 quoting UDP", tooBigFrame(l6, r6, 1, 1280, header.UDPProtocolNumber), nil},
		{"IPv4 bad checksum", corrupt(tooBigFrame(l4, r4, 1, 1280, header.TCPProtocolNumber), 3), nil},
		{"IPv6 bad checksum", corrupt(tooBigFrame(l6, r6, 1, 1280, header.TCPProtocolNumber), 3), nil},
		{"IPv4 cut short", tooBigFrame(l4, r4, 1, 1280, header.TCPProtocolNumber)[:14+20+8+20+4], nil},
		{"IPv6 cut short", tooBigFrame(l6, r6, 1, 1280, header.TCPProtocolNumber)[:14+40+8+40+4], nil},
		{"another MAC", func() []byte {
			b := tooBigFrame(l4, r4, 1, 1280, header.TCPProtocolNumber)
			copy(b, "\x02\x00\x00\x00\x00\x01")
			return b
		}(), nil},
		{"a TCP segment", synFrameV4(r4, l4), nil},
	}
	for _, tc := range cases {
		var p tooBig
		ok := parseTooBig(&p, fuzzEngineMAC, tc.frame)
		switch {
		case tc.want == nil && ok:
			t.Errorf("%s: taken as %+v", tc.name, p)
		case tc.want != nil && !ok:
			t.Errorf("%s: not taken", tc.name)
		case tc.want != nil && p != *tc.want:
			t.Errorf("%s: %+v, want %+v", tc.name, p, *tc.want)
		}
	}
}

// synFrameV4 is a SYN from src to dst, without a virtio-net header.
func synFrameV4(src, dst netip.AddrPort) []byte {
	const l2 = header.EthernetMinimumSize
	b := make([]byte, l2+header.IPv4MinimumSize+header.TCPMinimumSize)
	header.Ethernet(b).Encode(&header.EthernetFields{SrcAddr: fuzzSandboxMAC, DstAddr: fuzzEngineMAC, Type: ipv4.ProtocolNumber})
	ip := header.IPv4(b[l2:])
	ip.Encode(&header.IPv4Fields{TotalLength: uint16(len(b) - l2), TTL: 64, Protocol: uint8(header.TCPProtocolNumber),
		SrcAddr: tcpip.AddrFrom4(src.Addr().As4()), DstAddr: tcpip.AddrFrom4(dst.Addr().As4())})
	ip.SetChecksum(^ip.CalculateChecksum())
	header.TCP(b[l2+header.IPv4MinimumSize:]).Encode(&header.TCPFields{SrcPort: src.Port(), DstPort: dst.Port(), SeqNum: 1,
		DataOffset: header.TCPMinimumSize, Flags: flagSYN, WindowSize: 65535})
	return b
}

// TestPathMTU: a report that a segment in flight did not fit a link of
// the sandbox makes the engine send what is in flight again in segments
// that fit (before, it sent the same ones until the connection was reset:
// a download stalled); one below IPv4's floor counts as 552; a report of
// a segment already acknowledged, and one of no connection, change
// nothing of the engine's.
func TestPathMTU(t *testing.T) {
	greeting := make([]byte, 40000)
	h := newHarness(t, greeting)
	defer h.close()
	if !waitFor(func() bool { return h.dataSegs.Load() > 0 }) {
		t.Fatal("the greeting was not sent")
	}
	if got := h.maxSeg.Load(); got != 1460 {
		t.Fatalf("segments of %d bytes before any report, want 1460 (the SYN's MSS)", got)
	}
	report := func(seq uint32, mtu int) bool {
		t.Helper()
		f := tooBigFrame(h.dst, h.src, seq, mtu, header.TCPProtocolNumber)
		frame := append(make([]byte, 10), f...)
		return h.e.Handle(frame[:10], frame[10:], nil)
	}
	for _, step := range []struct {
		mtu, seg int
	}{{1000, 960}, {300, 512}} {
		h.maxSeg.Store(0)
		if !report(h.iss+1, step.mtu) {
			t.Fatalf("a report of MTU %d was not the fast path's", step.mtu)
		}
		if !waitFor(func() bool { return h.maxSeg.Load() > 0 }) {
			t.Fatalf("nothing was sent again after a report of MTU %d", step.mtu)
		}
		if got := h.maxSeg.Load(); got != int64(step.seg) {
			t.Errorf("after a report of MTU %d: segments of %d bytes, want %d", step.mtu, got, step.seg)
		}
	}
	if got := h.e.Stats().MTUReduced; got != 2 {
		t.Errorf("Stats().MTUReduced = %d, want 2", got)
	}
	if c := h.waitConn(func(c *conn) bool { return true }); c == nil || !c.ends.mayFragment {
		t.Error("below IPv4's floor, the connection's packets still say \"don't fragment\"")
	}

	h.send(flagACK, h.irs+1, h.iss+1+uint32(len(greeting)), 65535, 0, false) // all of it acknowledged
	c := h.waitConn(func(c *conn) bool { return c.sndUna == h.iss+1+uint32(len(greeting)) })
	if c == nil {
		t.Fatal("the acknowledgement was not taken")
	}
	report(h.iss+1, 576)
	c.mu.Lock()
	mss := c.mss
	c.mu.Unlock()
	if mss != 512 {
		t.Errorf("a report of a segment acknowledged already changed the MSS to %d", mss)
	}
	stranger := netip.MustParseAddrPort("10.0.2.100:40001")
	if report := tooBigFrame(h.dst, stranger, 1, 1000, header.TCPProtocolNumber); h.e.Handle(make([]byte, 10), report, nil) {
		t.Error("a report of no connection of the fast path's was taken (the stack's to answer)")
	}
}

// FuzzParseTooBig: the report's parser reads untrusted bytes from the
// sandbox; it never panics, and what it takes names a port on both ends.
func FuzzParseTooBig(f *testing.F) {
	f.Add(tooBigFrame(netip.MustParseAddrPort("10.0.2.2:80"), netip.MustParseAddrPort("10.0.2.100:4000"), 1, 1280, header.TCPProtocolNumber))
	f.Add(tooBigFrame(netip.MustParseAddrPort("[fd00::2]:80"), netip.MustParseAddrPort("[fd00::100]:4000"), 1, 1280, header.TCPProtocolNumber))
	f.Fuzz(func(t *testing.T, frame []byte) {
		var p tooBig
		if parseTooBig(&p, fuzzEngineMAC, frame) && (!p.k.src.IsValid() || !p.k.dst.IsValid()) {
			t.Fatalf("taken with addresses %v", p.k)
		}
	})
}
