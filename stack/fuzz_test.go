package stack_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/stack"
	"github.com/gonetns/gonetns/tap"
	"github.com/gonetns/gonetns/tap/taptest"
)

// The frames the sandbox sends are untrusted: whatever they hold, the
// stack (our link endpoint, gVisor behind it, the handlers' request
// parsing) must not crash. One stack serves the whole run; frames go in
// through the in-memory device, with and without a virtio-net header. The
// TCP fast path is on: a connection to an even port is dialled (to a sink
// on the host's loopback), to an odd one refused.
var fuzzStacks = struct {
	sync.Once
	in     [2]tap.Device  // the sandbox's ends: [plain, vnet]
	arpFor [2]chan []byte // target MACs of the ARP replies each stack sends
	marker atomic.Uint32
}{}

func fuzzTarget(t testing.TB, vnet bool) tap.Device {
	fuzzStacks.Do(func() {
		sink, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		go func() {
			for {
				c, err := sink.Accept()
				if err != nil {
					return
				}
				go func() {
					io.Copy(io.Discard, c)
					c.Close()
				}()
			}
		}()
		sinkAddr := netip.MustParseAddrPort(sink.Addr().String())
		dial := func(src, dst netip.AddrPort) (stack.HostTCP, error) {
			if dst.Port()%2 == 1 {
				return stack.HostTCP{}, errors.New("odd port")
			}
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return stack.HostTCP{}, err
			}
			err = unix.Connect(fd, &unix.SockaddrInet4{Port: int(sinkAddr.Port()), Addr: sinkAddr.Addr().As4()})
			if err != nil && !errors.Is(err, unix.EINPROGRESS) {
				unix.Close(fd)
				return stack.HostTCP{}, err
			}
			return stack.HostTCP{FD: fd, ConnectTimeout: time.Second}, nil
		}
		for i, v := range []bool{false, true} {
			a, b := taptest.Pipe(v, 4096)
			st, err := stack.New(stack.Config{
				Device:    a,
				MTU:       65520,
				Addresses: []netip.Prefix{netip.PrefixFrom(gateway, 24), netip.MustParsePrefix("fd00::2/64")},
				TCP:       func(r *stack.TCPRequest) { r.Refuse() },
				DialTCP:   dial,
				// Few: a fuzzer's SYNs never complete their handshake.
				MaxHalfOpenTCP: 64,
				UDP:            func(p *stack.UDPPacket) bool { return len(p.Payload())%2 == 0 },
				Echo:           func(r *stack.EchoRequest) bool { return len(r.Data)%2 == 0 },
			})
			if err != nil {
				t.Fatal(err)
			}
			if err := st.Start(); err != nil {
				t.Fatal(err)
			}
			fuzzStacks.in[i] = b
			replies := make(chan []byte, 64)
			fuzzStacks.arpFor[i] = replies
			// Drain what the stack sends back so the pipe never fills;
			// pass on the ARP replies (done below).
			go func() {
				buf := make([]byte, 70000)
				for {
					n, err := b.Read([][]byte{buf})
					if err != nil {
						return
					}
					f := buf[:n]
					if v {
						f = f[min(len(f), tap.VNetHdrLen):]
					}
					if len(f) >= 42 && f[12] == 0x08 && f[13] == 0x06 && f[21] == 2 {
						select {
						case replies <- append([]byte(nil), f[32:38]...):
						default:
						}
					}
				}
			}()
		}
	})
	if vnet {
		return fuzzStacks.in[1]
	}
	return fuzzStacks.in[0]
}

func ethFrame(dst, src []byte, typ uint16, payload []byte) []byte {
	f := append(append(append([]byte{}, dst...), src...), byte(typ>>8), byte(typ))
	return append(f, payload...)
}

func FuzzFrames(f *testing.F) {
	ours := []byte{0x52, 0x55, 0x0a, 0x00, 0x02, 0x02}
	guest := []byte{0x02, 0, 0, 0, 0, 0x64}
	ip4 := func(proto byte, payload []byte) []byte {
		h := make([]byte, 20)
		h[0] = 0x45
		binary.BigEndian.PutUint16(h[2:], uint16(20+len(payload)))
		h[8], h[9] = 64, proto
		copy(h[12:], []byte{10, 0, 2, 100})
		copy(h[16:], []byte{192, 0, 2, 7})
		var sum uint32
		for i := 0; i < 20; i += 2 {
			sum += uint32(binary.BigEndian.Uint16(h[i:]))
		}
		for sum > 0xffff {
			sum = sum&0xffff + sum>>16
		}
		binary.BigEndian.PutUint16(h[10:], ^uint16(sum))
		return append(h, payload...)
	}
	syn := make([]byte, 20)
	binary.BigEndian.PutUint16(syn[0:], 40000)
	binary.BigEndian.PutUint16(syn[2:], 80)
	syn[12], syn[13] = 0x50, 0x02
	f.Add(false, ethFrame(ours, guest, 0x0800, ip4(6, syn)))                                                     // TCP SYN
	f.Add(false, ethFrame(ours, guest, 0x0800, ip4(17, []byte{0x9c, 0x40, 0, 53, 0, 9, 0, 0, 1})))               // UDP
	f.Add(false, append(ethFrame(ours, guest, 0x0800, ip4(17, []byte{0x9c, 0x40, 0, 53})), make([]byte, 22)...)) // UDP header cut short, Ethernet padding
	f.Add(false, ethFrame(ours, guest, 0x0800, ip4(1, []byte{8, 0, 0, 0, 0, 1, 0, 1, 'x'})))                     // echo
	f.Add(false, ethFrame([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, guest, 0x0806,
		[]byte{0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 0x64, 10, 0, 2, 100, 0, 0, 0, 0, 0, 0, 10, 0, 2, 2})) // ARP
	f.Add(true, append(make([]byte, tap.VNetHdrLen), ethFrame(ours, guest, 0x0800, ip4(6, syn))...))
	f.Add(true, append([]byte{1, 1, 54, 0, 0xb4, 5, 34, 0, 16, 0}, ethFrame(ours, guest, 0x0800, ip4(6, make([]byte, 3000)))...))
	f.Add(false, ethFrame(ours, guest, 0x86dd, make([]byte, 48)))
	f.Add(false, []byte{1, 2, 3})
	f.Fuzz(func(t *testing.T, vnet bool, frame []byte) {
		if len(frame) > 65550 {
			return
		}
		dev := fuzzTarget(t, vnet)
		if _, err := dev.Write([][]byte{frame}); err != nil {
			t.Fatal(err)
		}
		done(t, vnet)
	})
}

// done waits until the stack has handled every frame written so far: the
// reader handles frames in order, so once it answers an ARP request sent
// after them, they are behind it (a panic on the reader goroutine shows
// in the iteration that caused it).
func done(t *testing.T, vnet bool) {
	i := 0
	if vnet {
		i = 1
	}
	mac := binary.BigEndian.AppendUint32([]byte{0x02, 0xfe}, fuzzStacks.marker.Add(1))
	arp := []byte{0, 1, 8, 0, 6, 4, 0, 1}
	arp = append(arp, mac...)
	arp = append(arp, 10, 0, 2, 100, 0, 0, 0, 0, 0, 0, 10, 0, 2, 2)
	f := ethFrame([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, mac, 0x0806, arp)
	if vnet {
		f = append(make([]byte, tap.VNetHdrLen), f...)
	}
	if _, err := fuzzStacks.in[i].Write([][]byte{f}); err != nil {
		t.Fatal(err)
	}
	timeout := time.After(10 * time.Second)
	for {
		select {
		case got := <-fuzzStacks.arpFor[i]:
			if bytes.Equal(got, mac) {
				return
			}
		case <-timeout:
			t.Fatal("the stack stopped answering ARP after this frame")
		}
	}
}
