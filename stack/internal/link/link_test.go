package link

import (
	"bytes"
	"encoding/binary"
	"net"
	"sync"
	"testing"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/gonetns/gonetns/tap"
)

var ourMAC = tcpip.LinkAddress("\x52\x55\x0a\x00\x02\x02")

// fakeDevice hands out queued frames and records written ones.
type fakeDevice struct {
	vnet    bool
	frames  chan []byte
	mu      sync.Mutex
	written [][]byte
}

func (d *fakeDevice) VNetHdr() bool { return d.vnet }

func (d *fakeDevice) Read(bufs [][]byte) (int, error) {
	f, ok := <-d.frames
	if !ok {
		return 0, net.ErrClosed
	}
	n := 0
	for _, b := range bufs {
		c := copy(b, f[n:])
		n += c
		if n == len(f) {
			break
		}
	}
	return n, nil
}

func (d *fakeDevice) Write(bufs [][]byte) (int, error) {
	var f []byte
	for _, b := range bufs {
		f = append(f, b...)
	}
	d.mu.Lock()
	d.written = append(d.written, f)
	d.mu.Unlock()
	return len(f), nil
}

func (d *fakeDevice) Close() error { return nil }

// recorder is a NetworkDispatcher keeping what it was given.
type recorder struct {
	mu    sync.Mutex
	got   [][]byte
	proto []tcpip.NetworkProtocolNumber
}

func (r *recorder) DeliverNetworkPacket(p tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.got = append(r.got, pkt.Data().AsRange().ToSlice())
	r.proto = append(r.proto, p)
}

func (r *recorder) DeliverLinkPacket(tcpip.NetworkProtocolNumber, *stack.PacketBuffer) {}

func frame(dst tcpip.LinkAddress, payload int) []byte {
	f := make([]byte, header.EthernetMinimumSize+payload)
	header.Ethernet(f).Encode(&header.EthernetFields{SrcAddr: "\x02\x00\x00\x00\x00\x64", DstAddr: dst, Type: header.IPv4ProtocolNumber})
	for i := header.EthernetMinimumSize; i < len(f); i++ {
		f[i] = byte(i * 7)
	}
	return f
}

// Frames of every size class come through whole, for us or broadcast;
// frames for another MAC are dropped; the virtio-net header is stripped.
func TestReadLoopDelivers(t *testing.T) {
	for _, vnet := range []bool{false, true} {
		dev := &fakeDevice{vnet: vnet, frames: make(chan []byte, 16)}
		e := New(dev, 65520, ourMAC, nil)
		var rec recorder
		sizes := []int{46, 1500, 2048 - 14, 2048, 30000, 65520}
		var want [][]byte
		for _, n := range sizes {
			f := frame(ourMAC, n)
			want = append(want, f[header.EthernetMinimumSize:])
			if vnet {
				f = append(make([]byte, tap.VNetHdrLen), f...)
			}
			dev.frames <- f
		}
		other := frame("\x02\x00\x00\x00\x00\x99", 100)
		bcast := frame(header.EthernetBroadcastAddress, 60)
		if vnet {
			other = append(make([]byte, tap.VNetHdrLen), other...)
			bcast = append(make([]byte, tap.VNetHdrLen), bcast...)
		}
		dev.frames <- other
		dev.frames <- bcast
		want = append(want, bcast[len(bcast)-60:])
		dev.frames <- []byte{1, 2, 3} // runt: ignored
		close(dev.frames)
		e.Attach(&rec)
		e.Wait()
		if len(rec.got) != len(want) {
			t.Fatalf("vnet=%v: %d packets delivered, want %d", vnet, len(rec.got), len(want))
		}
		for i := range want {
			if !bytes.Equal(rec.got[i], want[i]) || rec.proto[i] != header.IPv4ProtocolNumber {
				t.Errorf("vnet=%v: packet %d: %d bytes, proto %d; want %d bytes of IPv4", vnet, i, len(rec.got[i]), rec.proto[i], len(want[i]))
			}
		}
	}
}

func TestEncodeVNetHdr(t *testing.T) {
	mk := func(payload int, gso stack.GSO) *stack.PacketBuffer {
		pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
			ReserveHeaderBytes: 14 + 20 + 20,
			Payload:            buffer.MakeWithData(make([]byte, payload)),
		})
		pkt.TransportHeader().Push(20)
		pkt.NetworkHeader().Push(20)
		pkt.LinkHeader().Push(14)
		pkt.GSOOptions = gso
		return pkt
	}
	tso := stack.GSO{Type: stack.GSOTCPv4, NeedsCsum: true, CsumOffset: 16, MSS: 1460, L3HdrLen: 20, MaxSize: 65536}
	cases := []struct {
		name string
		pkt  *stack.PacketBuffer
		want [10]byte
	}{
		{"no offload", mk(100, stack.GSO{}), [10]byte{}},
		// flags NEEDS_CSUM, no GSO type, hdr_len 54, csum_start 34, csum_offset 16
		{"partial checksum only", mk(1000, tso), [10]byte{1, 0, 54, 0, 0, 0, 34, 0, 16, 0}},
		// + TCPv4 segmentation with gso_size 1460
		{"tso", mk(60000, tso), [10]byte{1, 1, 54, 0, 0xb4, 0x05, 34, 0, 16, 0}},
	}
	for _, c := range cases {
		var b [10]byte
		encodeVNetHdr(b[:], c.pkt)
		if b != c.want {
			t.Errorf("%s: % x, want % x", c.name, b, c.want)
		}
		c.pkt.DecRef()
	}
	if binary.LittleEndian.Uint16([]byte{0xb4, 0x05}) != 1460 {
		t.Fatal("test table's gso_size encoding is wrong")
	}
}

// Written packets carry the virtio-net header first when the device has
// one, then the Ethernet frame.
// TestWritePackets: a packet goes out as one frame, virtio-net header,
// Ethernet header and payload, whatever room the stack reserved before
// its headers (the frame starts where they do).
func TestWritePackets(t *testing.T) {
	for _, reserve := range []int{14, 64} {
		dev := &fakeDevice{vnet: true}
		e := New(dev, 1500, ourMAC, nil)
		pkt := testPacket(e, reserve)
		var l stack.PacketBufferList
		l.PushBack(pkt)
		if n, err := e.WritePackets(l); n != 1 || err != nil {
			t.Fatalf("reserve %d: WritePackets = %d, %v", reserve, n, err)
		}
		w := dev.written[0]
		if len(w) != 10+14+9 || !bytes.Equal(w[:10], make([]byte, 10)) || string(w[10+14:]) != "ip packet" ||
			!bytes.Equal(w[16:22], []byte(ourMAC)) || !bytes.Equal(w[10:16], []byte("\x02\x00\x00\x00\x00\x64")) {
			t.Errorf("reserve %d: written frame % x", reserve, w)
		}
		pkt.DecRef()
	}
}

// testPacket is an IPv4 packet with the payload "ip packet" to
// 02:00:00:00:00:64, reserve bytes reserved for headers, its Ethernet
// header added by e.
func testPacket(e *Endpoint, reserve int) *stack.PacketBuffer {
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
		ReserveHeaderBytes: reserve,
		Payload:            buffer.MakeWithData([]byte("ip packet")),
	})
	pkt.NetworkProtocolNumber = header.IPv4ProtocolNumber
	pkt.EgressRoute.RemoteLinkAddress = "\x02\x00\x00\x00\x00\x64"
	e.AddHeader(pkt)
	return pkt
}
