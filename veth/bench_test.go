package veth_test

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/gonetns/gonetns/tap"
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
	return dev
}
