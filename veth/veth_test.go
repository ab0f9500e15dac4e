package veth_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/netlink"
	"github.com/gonetns/gonetns/stack"
	"github.com/gonetns/gonetns/tap"
	"github.com/gonetns/gonetns/veth"
)

// netns is a thread in a network namespace of the test's own: what do runs
// there (sockets, interfaces) belongs to that namespace.
type netns struct {
	reqs chan func()
}

// newNetns makes one, for the test's life.
func newNetns(t testing.TB) *netns {
	t.Helper()
	if os.Getuid() != 0 {
		t.Fatal("this test creates network namespaces and veth pairs and needs root: run it as root (make test does)")
	}
	n := &netns{reqs: make(chan func())}
	ready := make(chan error)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			ready <- err
			return
		}
		ready <- nil
		for f := range n.reqs {
			f()
		}
	}()
	if err := <-ready; err != nil {
		t.Fatalf("unshare(CLONE_NEWNET): %v", err)
	}
	t.Cleanup(func() { close(n.reqs) })
	return n
}

func (n *netns) do(f func()) {
	done := make(chan struct{})
	n.reqs <- func() { defer close(done); f() }
	<-done
}

// link is a packet link in a namespace of the test's own: the sandbox's
// end configured as gonetns configures it, and the device.
type link struct {
	ns  *netns
	dev tap.Device
	op  veth.Opened
}

const (
	ifname  = "vt0"
	gateway = "10.9.0.2"
	inside  = "10.9.0.100"
)

func openLink(t testing.TB, mtu int) *link {
	t.Helper()
	l := &link{ns: newNetns(t)}
	var err error
	l.ns.do(func() {
		if l.op, err = veth.Open(veth.Options{Name: ifname, MTU: mtu}); err != nil {
			return
		}
		err = tap.Configure(tap.LinkConfig{Name: ifname, MTU: mtu,
			Address: netip.MustParsePrefix(inside + "/24"), Gateway: netip.MustParseAddr(gateway)})
	})
	if err != nil {
		t.Fatal(err)
	}
	if l.dev, err = veth.NewDevice(l.op.Files); err != nil {
		t.Fatal(err)
	}
	l.op.Close() // the device has its own copies
	t.Cleanup(func() { l.dev.Close() })
	return l
}

// virtio_net_hdr fields.
const (
	vnetHdrLen   = 10
	needsCsum    = 1
	gsoTCPv4     = 1
	ethHdrLen    = 14
	ipv4HdrLen   = 20
	tcpCsumField = 16
)

// frameStats records, for each direction, the longest frame and the
// virtio-net header of the first one longer than the MTU.
type frameStats struct {
	mu       sync.Mutex
	longest  int
	firstBig []byte
}

// get returns the longest frame and the header of the first long one.
func (s *frameStats) get() (int, []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.longest, s.firstBig
}

func (s *frameStats) record(frame []byte, mtu int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := len(frame) - vnetHdrLen
	s.longest = max(s.longest, n)
	if n > mtu+ethHdrLen && s.firstBig == nil {
		s.firstBig = bytes.Clone(frame[:vnetHdrLen])
	}
}

// recorder is a tap.Device that records what crosses it.
type recorder struct {
	tap.Device
	mtu     int
	in, out frameStats // from the sandbox, to it
}

func flatten(bufs [][]byte, n int) []byte {
	var b []byte
	for _, x := range bufs {
		b = append(b, x...)
	}
	return b[:min(n, len(b))]
}

func (r *recorder) Read(bufs [][]byte) (int, error) {
	n, err := r.Device.Read(bufs)
	if err == nil {
		r.in.record(flatten(bufs, n), r.mtu)
	}
	return n, err
}

func (r *recorder) Write(bufs [][]byte) (int, error) {
	r.out.record(flatten(bufs, 1<<20), r.mtu)
	return r.Device.Write(bufs)
}

// The kernel's TCP on the sandbox's end and gVisor on the device move a
// stream both ways in 64 KB segments at either MTU: the kernel hands over
// TSO segments with a partial checksum, and takes the stack's GSO ones.
func TestTCPWithSegmentOffloadBothWays(t *testing.T) {
	for _, mtu := range []int{1500, 65520} {
		t.Run(map[int]string{1500: "mtu=1500", 65520: "mtu=65520"}[mtu], func(t *testing.T) {
			l := openLink(t, mtu)
			rec := &recorder{Device: l.dev, mtu: mtu}
			st, err := stack.New(stack.Config{Device: rec, MTU: uint32(mtu),
				Addresses: []netip.Prefix{netip.MustParsePrefix(gateway + "/24")}})
			if err != nil {
				t.Fatal(err)
			}
			if err := st.Start(); err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			ln, err := st.ListenTCP(netip.MustParseAddrPort(gateway + ":7"))
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			go func() { // echo
				c, err := ln.Accept()
				if err != nil {
					return
				}
				defer c.Close()
				io.Copy(c, c)
			}()
			var c net.Conn
			l.ns.do(func() { c, err = net.DialTimeout("tcp", gateway+":7", 5*time.Second) })
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			const size = 16 << 20
			data := make([]byte, size)
			for i := range data {
				data[i] = byte(i * 7 / 5)
			}
			go func() {
				c.Write(data)
				c.(*net.TCPConn).CloseWrite()
			}()
			c.SetReadDeadline(time.Now().Add(60 * time.Second))
			h := sha256.New()
			n, err := io.Copy(h, c)
			if err != nil || n != size || !bytes.Equal(h.Sum(nil), sha256Of(data)) {
				t.Fatalf("echo of %d bytes: got %d bytes (%v), same data: %v", size, n, err, bytes.Equal(h.Sum(nil), sha256Of(data)))
			}
			for _, d := range []struct {
				name string
				s    *frameStats
			}{{"from the sandbox", &rec.in}, {"to the sandbox", &rec.out}} {
				longest, h := d.s.get()
				t.Logf("%s: longest frame %d bytes", d.name, longest)
				if mtu > 60000 {
					// Segments fit the MTU: what counts is that they are
					// not cut smaller on the way.
					if longest < 60000 {
						t.Errorf("%s: the longest frame is %d bytes at MTU %d", d.name, longest, mtu)
					}
					continue
				}
				if h == nil {
					t.Errorf("%s: no frame longer than the MTU: no segmentation offload (longest %d)", d.name, longest)
					continue
				}
				if h[0]&needsCsum == 0 || h[1] != gsoTCPv4 || binary.LittleEndian.Uint16(h[4:]) == 0 ||
					binary.LittleEndian.Uint16(h[6:]) != ethHdrLen+ipv4HdrLen || binary.LittleEndian.Uint16(h[8:]) != tcpCsumField {
					t.Errorf("%s: a long frame's virtio-net header is % x, want NEEDS_CSUM, TCPv4 GSO with a segment size, checksum at %d+%d",
						d.name, h, ethHdrLen+ipv4HdrLen, tcpCsumField)
				}
			}
		})
	}
}

func sha256Of(b []byte) []byte { s := sha256.Sum256(b); return s[:] }

// sandboxSocket is a packet socket on the sandbox's end, which sends raw
// frames into the link and sees what comes out of it.
func sandboxSocket(t testing.TB, l *link, vnet bool) int {
	t.Helper()
	var fd int
	var err error
	l.ns.do(func() {
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
		if err != nil {
			return
		}
		if vnet {
			if err = unix.SetsockoptInt(fd, unix.SOL_PACKET, unix.PACKET_VNET_HDR, 1); err != nil {
				return
			}
		}
		var ifi *net.Interface
		if ifi, err = net.InterfaceByName(ifname); err != nil {
			return
		}
		err = unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index})
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// testFrame is a broadcast frame of an experimental EtherType carrying seq.
func testFrame(seq uint32, size int) []byte {
	f := make([]byte, size)
	copy(f, []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0, 0, 0, 0, 1, 0x88, 0xb5})
	binary.BigEndian.PutUint32(f[ethHdrLen:], seq)
	return f
}

// readSeq reads frames from the device up to the next test frame and
// returns its sequence number (the sandbox's end sends frames of its own:
// MLD reports, router solicitations).
func readSeq(dev tap.Device) (uint32, error) {
	var hdr [vnetHdrLen]byte
	buf := make([]byte, 65536)
	for {
		n, err := dev.Read([][]byte{hdr[:], buf})
		if err != nil {
			return 0, err
		}
		if n >= vnetHdrLen+ethHdrLen+4 && binary.BigEndian.Uint16(buf[12:]) == 0x88b5 {
			return binary.BigEndian.Uint32(buf[ethHdrLen:]), nil
		}
	}
}

// Frames that arrive while nobody reads fill the receiving sockets one
// after the other; the device reads them back in the order they came,
// none lost, and then waits for the next one wherever it lands.
func TestRolloverKeepsOrder(t *testing.T) {
	defer veth.SetRcvbufRequest(veth.SetRcvbufRequest(32 << 10))
	l := openLink(t, 1500)
	if got := len(l.op.Files) - 1; got < 8 {
		t.Fatalf("%d receiving sockets for a receive buffer of %d bytes, want several", got, l.op.RecvBuf)
	}
	fd := sandboxSocket(t, l, false)
	// Several sockets' worth each round (each takes about 60 of these
	// frames), well within what they hold together; round after round the
	// kernel goes round the ring of sockets, past the last to the first.
	const frames, rounds = 200, 6
	seq := uint32(0)
	for r := range rounds {
		for range frames {
			if _, err := unix.Write(fd, testFrame(seq, 600)); err != nil {
				t.Fatal(err)
			}
			seq++
		}
		for i := seq - frames; i < seq; i++ {
			if got, err := readSeq(l.dev); err != nil || got != i {
				t.Fatalf("round %d: frame %d read as %d (%v): the order was lost (or a frame)", r, i, got, err)
			}
		}
	}
	// Everything read: the next frame is waited for.
	got := make(chan uint32, 1)
	go func() {
		seq, _ := readSeq(l.dev)
		got <- seq
	}()
	time.Sleep(10 * time.Millisecond) // let Read wait, if it is going to (a late Read works as well)
	unix.Write(fd, testFrame(seq, 600))
	select {
	case got := <-got:
		if got != seq {
			t.Errorf("after the backlog, frame %d, want %d", got, seq)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Read did not return a frame sent after it began waiting")
	}
}

// The far end has no address at all, so nothing of its own (IPv6
// duplicate address detection, router solicitations, MLD reports) comes
// into the sandbox.
func TestFarEndIsSilent(t *testing.T) {
	l := openLink(t, 1500)
	fd := sandboxSocket(t, l, false)
	deadline := time.Now().Add(2 * time.Second)
	buf := make([]byte, 2048)
	for time.Now().Before(deadline) {
		tv := unix.NsecToTimeval(time.Until(deadline).Nanoseconds() + 1000)
		unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
		n, from, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			break
		}
		if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
			continue // the sandbox's own end's traffic
		}
		t.Errorf("a frame came into the sandbox from the far end: % x", buf[:min(n, 80)])
	}
}

// When the sandbox's end goes away (its namespace ends, or a command
// inside deletes it), Read reports the link gone, as a closed device.
func TestReadAfterInterfaceRemoved(t *testing.T) {
	l := openLink(t, 1500)
	done := make(chan error, 1)
	go func() {
		var hdr [vnetHdrLen]byte
		buf := make([]byte, 65536)
		for {
			if _, err := l.dev.Read([][]byte{hdr[:], buf}); err != nil {
				done <- err
				return
			}
		}
	}()
	var err error
	l.ns.do(func() {
		var nl *netlink.Conn
		if nl, err = netlink.Open(unix.NETLINK_ROUTE); err != nil {
			return
		}
		defer nl.Close()
		var idx int
		if idx, err = tap.LinkIndex(nl, ifname); err != nil {
			return
		}
		err = nl.Request(unix.RTM_DELLINK, 0, netlink.StructBytes(&unix.IfInfomsg{Family: unix.AF_UNSPEC, Index: int32(idx)}))
	})
	if err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if !errors.Is(err, veth.ErrGone) || !errors.Is(err, net.ErrClosed) {
			t.Errorf("Read after the interface was deleted: %v, want ErrGone (a net.ErrClosed)", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Read still waits after the interface was deleted")
	}
}

// Close ends a Read that waits, with os.ErrClosed.
func TestCloseUnblocksRead(t *testing.T) {
	for _, small := range []bool{false, true} {
		func() {
			if small {
				defer veth.SetRcvbufRequest(veth.SetRcvbufRequest(32 << 10))
			}
			l := openLink(t, 1500)
			done := make(chan error, 1)
			go func() {
				var hdr [vnetHdrLen]byte
				buf := make([]byte, 65536)
				for {
					if _, err := l.dev.Read([][]byte{hdr[:], buf}); err != nil {
						done <- err
						return
					}
				}
			}()
			time.Sleep(10 * time.Millisecond) // let Read wait (a Read after Close fails the same way)
			l.dev.Close()
			select {
			case err := <-done:
				if !errors.Is(err, os.ErrClosed) {
					t.Errorf("%d receiving sockets: Read after Close: %v, want os.ErrClosed", len(l.op.Files)-1, err)
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("%d receiving sockets: Read still waits after Close", len(l.op.Files)-1)
			}
		}()
	}
}
