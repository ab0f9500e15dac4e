package stack_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/gonetns/gonetns/stack"
	"github.com/gonetns/gonetns/stack/stacktest"
	"github.com/gonetns/gonetns/tap"
	"github.com/gonetns/gonetns/tap/taptest"
)

var (
	gateway = netip.MustParseAddr("10.0.2.2")
	dnsAddr = netip.MustParseAddr("10.0.2.3")
	guestIP = netip.MustParsePrefix("10.0.2.100/24")
	remote  = netip.MustParseAddrPort("192.0.2.7:80")
)

// pair is a stack under test and a guest joined by a pipe.
type pair struct {
	st    *stack.Stack
	guest *stacktest.Guest
}

func newPair(t *testing.T, vnet bool, mtu uint32, cfg stack.Config) *pair {
	t.Helper()
	a, b := taptest.Pipe(vnet, 1024)
	cfg.Device = a
	cfg.MTU = mtu
	cfg.Addresses = []netip.Prefix{netip.PrefixFrom(gateway, 24), netip.PrefixFrom(dnsAddr, 24)}
	st, err := stack.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Start(); err != nil {
		t.Fatal(err)
	}
	g, err := stacktest.NewGuest(b, guestIP, gateway, mtu)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		st.Close()
		g.Close()
	})
	return &pair{st: st, guest: g}
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return c
}

func TestTCPEchoAndAddresses(t *testing.T) {
	seen := make(chan *stack.TCPRequest, 1)
	p := newPair(t, false, 1500, stack.Config{TCP: func(r *stack.TCPRequest) {
		seen <- r
		c, err := r.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		io.Copy(c, c)
		c.CloseWrite()
	}})
	c, err := p.guest.DialTCP(ctx(t), remote)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r := <-seen
	if r.Dst != remote || r.Src.Addr() != guestIP.Addr() {
		t.Errorf("request Src=%v Dst=%v, want the guest's address and %v", r.Src, r.Dst, remote)
	}
	msg := []byte("hello through the netstack")
	c.Write(msg)
	c.CloseWrite()
	got, err := io.ReadAll(c)
	if err != nil || !bytes.Equal(got, msg) {
		t.Errorf("echo = %q, %v", got, err)
	}
}

func TestTCPRefuseIsReset(t *testing.T) {
	p := newPair(t, false, 1500, stack.Config{TCP: func(r *stack.TCPRequest) { r.Refuse() }})
	// A RST gives ECONNREFUSED at once; a dropped SYN would end in the
	// context's deadline instead.
	_, err := p.guest.DialTCP(ctx(t), remote)
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("dial error = %v, want ECONNREFUSED", err)
	}
}

func TestTCPHalfClose(t *testing.T) {
	p := newPair(t, false, 1500, stack.Config{TCP: func(r *stack.TCPRequest) {
		c, err := r.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		// Read to EOF first, then answer: works only if the guest's FIN
		// did not close our sending side.
		got, _ := io.ReadAll(c)
		fmt.Fprintf(c, "got %d bytes", len(got))
		c.CloseWrite()
	}})
	c, err := p.guest.DialTCP(ctx(t), remote)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write(make([]byte, 100000))
	c.CloseWrite()
	reply, err := io.ReadAll(c)
	if err != nil || string(reply) != "got 100000 bytes" {
		t.Errorf("reply after half-close = %q, %v", reply, err)
	}
}

func TestTCPResetBothWays(t *testing.T) {
	readErr := make(chan error, 1)
	p := newPair(t, false, 1500, stack.Config{TCP: func(r *stack.TCPRequest) {
		c, err := r.Accept()
		if err != nil {
			return
		}
		if r.Dst.Port() == 81 {
			// The stack resets: the guest must see it.
			c.Read(make([]byte, 1))
			c.Abort()
			return
		}
		_, err = c.Read(make([]byte, 10))
		readErr <- err
		c.Close()
	}})
	c, err := p.guest.DialTCP(ctx(t), netip.AddrPortFrom(remote.Addr(), 81))
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte("x"))
	if _, err := c.Read(make([]byte, 1)); err == nil || !strings.Contains(err.Error(), "reset") {
		t.Errorf("guest read after the stack's RST: %v, want connection reset", err)
	}
	c.Close()

	c2, err := p.guest.DialTCP(ctx(t), remote)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(20 * time.Millisecond)
	c2.Abort()
	if err := <-readErr; !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("stack read after the guest's RST: %v, want ECONNRESET", err)
	}
}

// A bulk transfer both ways, sha256-checked, with and without the
// virtio-net header (host GSO and checksum offload), at both MTUs.
func TestTCPBulkTransfer(t *testing.T) {
	const size = 16 << 20
	for _, tc := range []struct {
		vnet bool
		mtu  uint32
	}{{false, 1500}, {true, 1500}, {true, 65520}, {false, 65520}} {
		t.Run(fmt.Sprintf("vnet=%v,mtu=%d", tc.vnet, tc.mtu), func(t *testing.T) {
			data := make([]byte, size)
			rand.Read(data)
			want := sha256.Sum256(data)
			received := make(chan [32]byte, 1)
			p := newPair(t, tc.vnet, tc.mtu, stack.Config{TCP: func(r *stack.TCPRequest) {
				c, err := r.Accept()
				if err != nil {
					return
				}
				defer c.Close()
				if r.Dst.Port() == 1 { // guest -> stack
					h := sha256.New()
					c.WriteTo(h)
					var sum [32]byte
					copy(sum[:], h.Sum(nil))
					received <- sum
					return
				}
				c.ReadFrom(bytes.NewReader(data)) // stack -> guest
				c.CloseWrite()
			}})
			var wg sync.WaitGroup
			wg.Add(2)
			go func() {
				defer wg.Done()
				c, err := p.guest.DialTCP(ctx(t), netip.AddrPortFrom(remote.Addr(), 1))
				if err != nil {
					t.Error(err)
					return
				}
				defer c.Close()
				c.Write(data)
				c.CloseWrite()
				if got := <-received; got != want {
					t.Errorf("guest->stack: sha256 mismatch")
				}
			}()
			go func() {
				defer wg.Done()
				c, err := p.guest.DialTCP(ctx(t), netip.AddrPortFrom(remote.Addr(), 2))
				if err != nil {
					t.Error(err)
					return
				}
				defer c.Close()
				h := sha256.New()
				n, err := io.Copy(h, c)
				if err != nil || n != size || !bytes.Equal(h.Sum(nil), want[:]) {
					t.Errorf("stack->guest: %d bytes, err %v, sha256 match %v", n, err, bytes.Equal(h.Sum(nil), want[:]))
				}
			}()
			wg.Wait()
		})
	}
}

func TestUDPFlow(t *testing.T) {
	type seen struct {
		src, dst netip.AddrPort
		n        int
	}
	seenc := make(chan seen, 16)
	paths := map[netip.AddrPort]*stack.UDPPath{} // the handler runs on one goroutine
	p := newPair(t, false, 1500, stack.Config{UDP: func(pk *stack.UDPPacket) bool {
		if pk.Dst.Port() == 9 {
			return false // port unreachable
		}
		var msg []byte
		for _, b := range pk.Payload() {
			msg = append(msg, b...)
		}
		seenc <- seen{pk.Src, pk.Dst, len(msg)}
		path := paths[pk.Src]
		if path == nil {
			var err error
			if path, err = pk.ReturnPath(); err != nil {
				t.Error(err)
				return false
			}
			paths[pk.Src] = path
			t.Cleanup(func() { path.Close() })
		}
		// Answer from another goroutine, as the NAT does.
		go path.Write(append([]byte("echo:"), msg...))
		return true
	}})
	dst := netip.AddrPortFrom(remote.Addr(), 53)
	c, err := p.guest.DialUDP(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// 1472 fills an MTU-1500 packet; 3000 arrives in fragments, and its
	// answer leaves in fragments.
	for i, size := range []int{1, 1400, 1472, 3000} {
		msg := bytes.Repeat([]byte{byte('a' + i)}, size)
		c.Write(msg)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 4000)
		n, err := c.Read(buf)
		if err != nil || !bytes.Equal(buf[:n], append([]byte("echo:"), msg...)) {
			t.Fatalf("datagram %d (%d bytes): got %d bytes, %v", i, size, n, err)
		}
		s := <-seenc
		if s.dst != dst || s.src.Addr() != guestIP.Addr() || s.src.Port() == 0 || s.n != size {
			t.Errorf("datagram %d: handler saw %v -> %v, %d bytes", i, s.src, s.dst, s.n)
		}
	}
	if len(paths) != 1 {
		t.Errorf("one flow, %d return paths", len(paths))
	}
}

func TestEcho(t *testing.T) {
	p := newPair(t, false, 1500, stack.Config{Echo: func(r *stack.EchoRequest) bool {
		if r.Dst == remote.Addr() {
			go r.Reply(r.Seq, append([]byte("from-host:"), r.Data...))
			return true
		}
		return false
	}})
	c, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	got, err := p.guest.Ping(c, remote.Addr(), 7, []byte("ping"))
	if err != nil || string(got) != "from-host:ping" {
		t.Errorf("forwarded echo reply = %q, %v", got, err)
	}
	got, err = p.guest.Ping(c, gateway, 8, []byte("gw"))
	if err != nil || string(got) != "gw" {
		t.Errorf("the gateway's own echo reply = %q, %v", got, err)
	}
	// Nobody answers for another address: no forged reply.
	short, cancel2 := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel2()
	if got, err := p.guest.Ping(short, netip.MustParseAddr("198.51.100.1"), 9, []byte("x")); err == nil {
		t.Errorf("got a reply %q for an address nobody answered for", got)
	}
}

// TestEchoReplyFragmented: a forwarded echo reply larger than the MTU goes
// to the sandbox in fragments that fit it (a veth, the packet link's,
// drops a frame past its MTU), which the sandbox puts back together.
func TestEchoReplyFragmented(t *testing.T) {
	a, b := taptest.Pipe(false, 1024)
	st, err := stack.New(stack.Config{Device: a, MTU: 1500,
		Addresses: []netip.Prefix{netip.PrefixFrom(gateway, 24)},
		Echo: func(r *stack.EchoRequest) bool {
			go r.Reply(r.Seq, r.Data)
			return true
		}})
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Start(); err != nil {
		t.Fatal(err)
	}
	seen := &largestFrame{Device: b}
	g, err := stacktest.NewGuest(seen, guestIP, gateway, 1500)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		st.Close()
		g.Close()
	})
	for _, size := range []int{1472, 1473, 8000, 65000} {
		data := bytes.Repeat([]byte{byte(size)}, size)
		got, err := g.Ping(ctx(t), remote.Addr(), uint16(size), data)
		if err != nil || !bytes.Equal(got, data) {
			t.Errorf("%d bytes: reply of %d bytes, %v", size, len(got), err)
		}
	}
	if m := seen.most.Load(); m > 1500+14 {
		t.Errorf("a frame of %d bytes went to the sandbox; want at most the MTU, 1500, and the Ethernet header", m)
	}
}

// largestFrame notes the longest frame read from the device.
type largestFrame struct {
	tap.Device
	most atomic.Int64
}

func (l *largestFrame) Read(bufs [][]byte) (int, error) {
	n, err := l.Device.Read(bufs)
	if int64(n) > l.most.Load() {
		l.most.Store(int64(n))
	}
	return n, err
}

// A UDP socket of the stack gets its datagrams even though Config.UDP
// takes every other one, with or without the virtio-net header.
func TestUDPListenerBeforeHandler(t *testing.T) {
	for _, vnet := range []bool{false, true} {
		handled := make(chan netip.AddrPort, 4)
		p := newPair(t, vnet, 1500, stack.Config{UDP: func(pk *stack.UDPPacket) bool {
			handled <- pk.Dst
			return true
		}})
		dns := netip.AddrPortFrom(dnsAddr, 53)
		l, err := p.st.ListenUDP(dns)
		if err != nil {
			t.Fatal(err)
		}
		c, err := p.guest.DialUDP(dns)
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte("query"))
		l.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 100)
		n, _, err := l.ReadFrom(buf)
		if err != nil || string(buf[:n]) != "query" {
			t.Errorf("vnet=%v: the stack's socket read %q, %v", vnet, buf[:n], err)
		}
		other := netip.AddrPortFrom(dnsAddr, 54)
		c2, _ := p.guest.DialUDP(other)
		c2.Write([]byte("x"))
		select {
		case d := <-handled:
			if d != other {
				t.Errorf("vnet=%v: Config.UDP got a datagram for %v", vnet, d)
			}
		case <-time.After(5 * time.Second):
			t.Errorf("vnet=%v: Config.UDP did not get the datagram for %v", vnet, other)
		}
		c.Close()
		c2.Close()
		l.Close()
	}
}

func TestListenOnOwnAddress(t *testing.T) {
	p := newPair(t, false, 1500, stack.Config{})
	l, err := p.st.ListenTCP(netip.AddrPortFrom(dnsAddr, 53))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		c, err := l.Accept()
		if err == nil {
			c.Write([]byte("hi"))
			c.Close()
		}
	}()
	c, err := p.guest.DialTCP(ctx(t), netip.AddrPortFrom(dnsAddr, 53))
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(c)
	if string(got) != "hi" {
		t.Errorf("got %q", got)
	}
}

// Close must end every goroutine the stack started, and wake blocked
// readers.
func TestCloseLeavesNoGoroutines(t *testing.T) {
	before := runtime.NumGoroutine()
	a, b := taptest.Pipe(false, 64)
	blocked := make(chan error, 1)
	st, err := stack.New(stack.Config{
		Device:    a,
		MTU:       1500,
		Addresses: []netip.Prefix{netip.PrefixFrom(gateway, 24)},
		TCP: func(r *stack.TCPRequest) {
			c, err := r.Accept()
			if err != nil {
				blocked <- err
				return
			}
			_, err = c.Read(make([]byte, 1))
			c.Close()
			blocked <- err
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Start(); err != nil {
		t.Fatal(err)
	}
	g, err := stacktest.NewGuest(b, guestIP, gateway, 1500)
	if err != nil {
		t.Fatal(err)
	}
	c, err := g.DialTCP(ctx(t), remote)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	st.Close()
	select {
	case <-blocked:
	case <-time.After(5 * time.Second):
		t.Fatal("a blocked Read did not return after Close")
	}
	c.Close()
	g.Close()
	if !stacktest.WaitFor(5*time.Second, func() bool { return runtime.NumGoroutine() <= before }) {
		buf := make([]byte, 1<<20)
		n := runtime.Stack(buf, true)
		t.Errorf("%d goroutines before, %d after Close:\n%s", before, runtime.NumGoroutine(), buf[:n])
	}
}
