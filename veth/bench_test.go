package veth_test

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/tap"
	"github.com/gonetns/gonetns/veth"
)

// The cost of writing a frame into the sandbox, on the packet link and on
// a TAP: a TCP segment of 64 KB (virtio-net GSO header, as the netstack
// writes at MTU 1500) and a 66-byte ACK, both addressed to an Ethernet
// address the sandbox's end does not have, so that its kernel receives
// and drops them unprocessed. Run as root:
// go test -run='^$' -bench=Write ./veth
func BenchmarkWrite(b *testing.B) {
	for _, c := range []struct {
		name string
		size int
		gso  bool
	}{{"64KB-GSO", 65000, true}, {"ACK", 66, false}} {
		hdr := make([]byte, 10)
		if c.gso {
			hdr[0], hdr[1] = 1, 1
			binary.LittleEndian.PutUint16(hdr[2:], 54)
			binary.LittleEndian.PutUint16(hdr[4:], 1460)
			binary.LittleEndian.PutUint16(hdr[6:], 34)
			binary.LittleEndian.PutUint16(hdr[8:], 16)
		}
		f := make([]byte, c.size)
		copy(f, []byte{0x02, 0, 0, 0, 0, 9, 0x52, 0x55, 0x0a, 0, 2, 2, 0x08, 0x00})
		ip := f[14:]
		ip[0], ip[8], ip[9] = 0x45, 64, 6
		binary.BigEndian.PutUint16(ip[2:], uint16(c.size-14))
		copy(ip[12:], netip.MustParseAddr(gateway).AsSlice())
		copy(ip[16:], netip.MustParseAddr(inside).AsSlice())
		ip[32] = 0x50
		for _, link := range []string{"packet", "tap"} {
			b.Run(c.name+"/"+link, func(b *testing.B) {
				dev := benchDevice(b, link)
				b.SetBytes(int64(len(f)))
				b.ResetTimer()
				for range b.N {
					if _, err := dev.Write([][]byte{hdr, f}); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

func benchDevice(b *testing.B, link string) tap.Device {
	if link == "packet" {
		return openLink(b, 1500).dev
	}
	dev, _ := benchTAP(b)
	return dev
}

// benchTAP is a TAP in a namespace of its own, configured as the sandbox's
// end of a packet link is (named ifname).
func benchTAP(b *testing.B) (tap.Device, *netns) {
	ns := newNetns(b)
	var dev tap.Device
	var err error
	ns.do(func() {
		var op tap.Opened
		if op, err = tap.Open(tap.Options{Name: ifname, VNetHdr: true}); err != nil {
			return
		}
		defer op.File.Close()
		if err = tap.Configure(tap.LinkConfig{Name: ifname, MTU: 1500, Address: netip.MustParsePrefix(inside + "/24")}); err != nil {
			return
		}
		dev, err = tap.NewDevice(op.File, true)
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { dev.Close() })
	return dev, ns
}

// A frame's round trip through the link: a packet socket on the
// sandbox's end sends it, the device reads it and writes it back, the
// socket receives it. What a request/response exchange pays the link,
// twice: on the packet link (with the receiving sockets net.core.rmem_max
// gives here, and with fifteen, as at Linux's default) and on a TAP.
func BenchmarkRoundTrip(b *testing.B) {
	for _, kind := range []string{"packet", "packet-15", "tap"} {
		b.Run(kind, func(b *testing.B) {
			var dev tap.Device
			var ns *netns
			switch kind {
			case "packet-15":
				defer veth.SetRcvbufRequest(veth.SetRcvbufRequest(100 << 10))
				fallthrough
			case "packet":
				l := openLink(b, 1500)
				dev, ns = l.dev, l.ns
			case "tap":
				dev, ns = benchTAP(b)
			}
			fd := sandboxSocket(b, &link{ns: ns}, false)
			go func() {
				var hdr [vnetHdrLen]byte
				buf := make([]byte, 2048)
				for {
					n, err := dev.Read([][]byte{hdr[:], buf})
					if err != nil {
						return
					}
					if n >= vnetHdrLen+ethHdrLen && binary.BigEndian.Uint16(buf[12:]) == 0x88b5 {
						f := buf[:n-vnetHdrLen]
						copy(f[0:6], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
						binary.BigEndian.PutUint16(f[12:], 0x88b6)
						dev.Write([][]byte{make([]byte, vnetHdrLen), f})
					}
				}
			}()
			frame := testFrame(1, 64)
			buf := make([]byte, 2048)
			b.ResetTimer()
			for range b.N {
				if _, err := unix.Write(fd, frame); err != nil {
					b.Fatal(err)
				}
				for {
					n, err := unix.Read(fd, buf)
					if err != nil {
						b.Fatal(err)
					}
					if n >= ethHdrLen && binary.BigEndian.Uint16(buf[12:]) == 0x88b6 {
						break
					}
				}
			}
		})
	}
}
