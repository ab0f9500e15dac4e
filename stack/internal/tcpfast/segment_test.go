package tcpfast

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// testFrame builds an Ethernet frame with a TCP segment from
// 10.0.2.100:40000 (or fd00::100) to 192.0.2.7:80 (or 2001:db8::7),
// checksums right, then applies edit and, unless keepSums, computes the
// checksums again.
type testFrame struct {
	v6       bool
	flags    header.TCPFlags
	opts     []byte
	payload  []byte
	pad      int // Ethernet padding after the IP packet
	edit     func(f []byte, l3 int)
	keepSums bool // leave the checksums as edit left them
}

func (tf testFrame) build() []byte {
	l3 := header.IPv4MinimumSize
	if tf.v6 {
		l3 = header.IPv6MinimumSize
	}
	l2 := header.EthernetMinimumSize
	l4 := header.TCPMinimumSize + len(tf.opts)
	f := make([]byte, l2+l3+l4+len(tf.payload)+tf.pad)
	typ := header.IPv4ProtocolNumber
	src, dst := tcpip.AddrFrom4([4]byte{10, 0, 2, 100}), tcpip.AddrFrom4([4]byte{192, 0, 2, 7})
	if tf.v6 {
		typ = header.IPv6ProtocolNumber
		src = tcpip.AddrFrom16(netip.MustParseAddr("fd00::100").As16())
		dst = tcpip.AddrFrom16(netip.MustParseAddr("2001:db8::7").As16())
	}
	header.Ethernet(f).Encode(&header.EthernetFields{SrcAddr: fuzzSandboxMAC, DstAddr: fuzzEngineMAC, Type: typ})
	if tf.v6 {
		header.IPv6(f[l2:]).Encode(&header.IPv6Fields{PayloadLength: uint16(l4 + len(tf.payload)), TransportProtocol: header.TCPProtocolNumber, HopLimit: 64, SrcAddr: src, DstAddr: dst})
	} else {
		header.IPv4(f[l2:]).Encode(&header.IPv4Fields{TotalLength: uint16(l3 + l4 + len(tf.payload)), TTL: 64, Protocol: uint8(header.TCPProtocolNumber), SrcAddr: src, DstAddr: dst})
	}
	tcp := header.TCP(f[l2+l3:])
	tcp.Encode(&header.TCPFields{SrcPort: 40000, DstPort: 80, SeqNum: 1000, AckNum: 2000, DataOffset: uint8(l4), Flags: tf.flags, WindowSize: 5000})
	copy(tcp[header.TCPMinimumSize:], tf.opts)
	copy(f[l2+l3+l4:], tf.payload)
	sums := func() {
		if !tf.v6 {
			ip := header.IPv4(f[l2:])
			ip.SetChecksum(0)
			ip.SetChecksum(^ip.CalculateChecksum())
		}
		// The addresses the frame holds now: an edit may have changed them.
		src, dst := header.IPv4(f[l2:]).SourceAddress(), header.IPv4(f[l2:]).DestinationAddress()
		if tf.v6 {
			src, dst = header.IPv6(f[l2:]).SourceAddress(), header.IPv6(f[l2:]).DestinationAddress()
		}
		tcp.SetChecksum(0)
		sum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, src, dst, uint16(l4+len(tf.payload)))
		sum = checksum.Checksum(f[l2+l3:l2+l3+l4+len(tf.payload)], sum)
		tcp.SetChecksum(^sum)
	}
	sums()
	if tf.edit != nil {
		tf.edit(f, l3)
		if !tf.keepSums {
			sums()
		}
	}
	return f
}

func TestParse(t *testing.T) {
	synOpts := []byte{
		header.TCPOptionMSS, 4, 0x05, 0xb4,
		header.TCPOptionNOP, header.TCPOptionWS, 3, 9,
		header.TCPOptionSACKPermitted, 2,
		header.TCPOptionTS, 10, 0, 0, 0, 7, 0, 0, 0, 0,
		header.TCPOptionNOP, header.TCPOptionNOP,
	}
	sackOpts := []byte{header.TCPOptionNOP, header.TCPOptionNOP, header.TCPOptionSACK, 18,
		0, 0, 0x0b, 0xb8, 0, 0, 0x0f, 0xa0, // 3000-4000
		0, 0, 0x13, 0x88, 0, 0, 0x17, 0x70} // 5000-6000
	for _, tc := range []struct {
		name  string
		frame testFrame
		vnet  bool // the frame comes with a virtio-net header: checksums are the kernel's
		ok    bool
		check func(t *testing.T, s *segment)
	}{
		{name: "SYN with options", frame: testFrame{flags: flagSYN, opts: synOpts}, ok: true, check: func(t *testing.T, s *segment) {
			if s.src != netip.MustParseAddrPort("10.0.2.100:40000") || s.dst != netip.MustParseAddrPort("192.0.2.7:80") || s.v6 {
				t.Errorf("addresses %v -> %v v6=%v", s.src, s.dst, s.v6)
			}
			if s.seq != 1000 || s.ack != 2000 || s.wnd != 5000 || s.flags != flagSYN || s.remoteMAC() != fuzzSandboxMAC {
				t.Errorf("header fields %+v", s)
			}
			if s.mss != 1460 || s.ws != 9 || !s.sackOK || !s.ts || s.tsVal != 7 || s.nsack != 0 {
				t.Errorf("options: mss %d ws %d sackOK %v ts %v/%d", s.mss, s.ws, s.sackOK, s.ts, s.tsVal)
			}
		}},
		{name: "no options", frame: testFrame{flags: flagACK}, ok: true, check: func(t *testing.T, s *segment) {
			if s.mss != 0 || s.ws != -1 || s.sackOK || s.ts || s.payloadLen != 0 {
				t.Errorf("options where there are none: %+v", s)
			}
		}},
		{name: "SACK blocks", frame: testFrame{flags: flagACK, opts: sackOpts}, ok: true, check: func(t *testing.T, s *segment) {
			if s.nsack != 2 || s.sack[0] != (sackBlock{3000, 4000}) || s.sack[1] != (sackBlock{5000, 6000}) {
				t.Errorf("SACK blocks %v (%d)", s.sack, s.nsack)
			}
		}},
		{name: "malformed option length ends the options", frame: testFrame{flags: flagSYN, opts: []byte{header.TCPOptionMSS, 4, 5, 0xb4, 99, 1, 0, 0}}, ok: true, check: func(t *testing.T, s *segment) {
			if s.mss != 1460 {
				t.Errorf("mss %d: the option before the malformed one is lost", s.mss)
			}
		}},
		{name: "payload, Ethernet padding left out", frame: testFrame{flags: flagACK | flagPSH, payload: []byte("abc"), pad: 10}, ok: true, check: func(t *testing.T, s *segment) {
			if s.payloadLen != 3 || string(s.payload[0]) != "abc" || s.payload[1] != nil {
				t.Errorf("payload %q %q (%d)", s.payload[0], s.payload[1], s.payloadLen)
			}
		}},
		{name: "IPv6", frame: testFrame{v6: true, flags: flagSYN, opts: synOpts}, ok: true, check: func(t *testing.T, s *segment) {
			if !s.v6 || s.src != netip.MustParseAddrPort("[fd00::100]:40000") || s.dst.Addr() != netip.MustParseAddr("2001:db8::7") {
				t.Errorf("IPv6 addresses %v -> %v", s.src, s.dst)
			}
		}},
		{name: "another MAC", frame: testFrame{flags: flagSYN, edit: func(f []byte, _ int) { f[5] ^= 1 }}},
		{name: "IPv4 options", frame: testFrame{flags: flagSYN, edit: func(f []byte, _ int) { f[14] = 0x46 }}},
		{name: "fragment", frame: testFrame{flags: flagSYN, edit: func(f []byte, _ int) { f[14+6] |= 0x20 }}},
		{name: "TTL 0", frame: testFrame{flags: flagSYN, edit: func(f []byte, _ int) { f[14+8] = 0 }}},
		{name: "UDP", frame: testFrame{flags: flagSYN, edit: func(f []byte, _ int) { f[14+9] = 17 }}},
		{name: "IP length beyond the frame", frame: testFrame{flags: flagSYN, edit: func(f []byte, _ int) { binary.BigEndian.PutUint16(f[16:], 200) }}},
		{name: "data offset too small", frame: testFrame{flags: flagSYN, edit: func(f []byte, l3 int) { f[14+l3+12] = 4 << 4 }}},
		{name: "data offset beyond the packet", frame: testFrame{flags: flagSYN, edit: func(f []byte, l3 int) { f[14+l3+12] = 15 << 4 }}},
		{name: "port 0", frame: testFrame{flags: flagSYN, edit: func(f []byte, l3 int) { f[14+l3], f[14+l3+1] = 0, 0 }}},
		{name: "multicast destination", frame: testFrame{flags: flagSYN, edit: func(f []byte, _ int) { f[14+16] = 224 }}},
		{name: "bad IP checksum", frame: testFrame{flags: flagSYN, keepSums: true, edit: func(f []byte, _ int) { f[14+10] ^= 0xff }}},
		{name: "bad TCP checksum", frame: testFrame{flags: flagSYN, payload: []byte("x"), keepSums: true, edit: func(f []byte, l3 int) { f[len(f)-1] ^= 0xff }}},
		{name: "bad TCP checksum, the kernel's to check", vnet: true, ok: true, frame: testFrame{flags: flagSYN, payload: []byte("x"), keepSums: true, edit: func(f []byte, l3 int) { f[len(f)-1] ^= 0xff }}},
		{name: "IPv6 extension header", frame: testFrame{v6: true, flags: flagSYN, edit: func(f []byte, _ int) { f[14+6] = 0 }}},
		{name: "IPv6 link-local", frame: testFrame{v6: true, flags: flagSYN, edit: func(f []byte, _ int) { f[14+8], f[14+9] = 0xfe, 0x80 }}},
		{name: "IPv6 to an IPv4-mapped address", frame: testFrame{v6: true, flags: flagSYN, edit: func(f []byte, _ int) {
			a := netip.MustParseAddr("::ffff:10.0.2.2").As16()
			copy(f[14+24:], a[:])
		}}},
		{name: "IPv6 from an IPv4-mapped address", frame: testFrame{v6: true, flags: flagSYN, edit: func(f []byte, _ int) {
			a := netip.MustParseAddr("::ffff:10.0.2.100").As16()
			copy(f[14+8:], a[:])
		}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := tc.frame.build()
			var vh []byte
			if tc.vnet {
				vh = make([]byte, 10)
			}
			var s segment
			if got := parse(&s, fuzzEngineMAC, vh, f, nil); got != tc.ok {
				t.Fatalf("parse = %v, want %v", got, tc.ok)
			}
			if tc.ok && tc.check != nil {
				tc.check(t, &s)
			}
		})
	}
}

// A frame longer than the reader's first buffer arrives in two: the
// payload spans both, and the checksum covers both (an odd split too).
func TestParseSplitFrame(t *testing.T) {
	payload := bytes.Repeat([]byte("0123456789"), 300)
	f := testFrame{flags: flagACK, payload: payload}.build()
	for _, cut := range []int{100, 101, 2048} {
		var s segment
		if !parse(&s, fuzzEngineMAC, nil, f[:cut], f[cut:]) {
			t.Fatalf("cut at %d: not parsed", cut)
		}
		got := append(append([]byte(nil), s.payload[0]...), s.payload[1]...)
		if !bytes.Equal(got, payload) || s.payloadLen != len(payload) {
			t.Errorf("cut at %d: payload of %d bytes differs", cut, len(got))
		}
	}
}
