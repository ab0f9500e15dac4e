package nat

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gonetns/gonetns/stack"
	"github.com/gonetns/gonetns/stack/stacktest"
	"github.com/gonetns/gonetns/tap/taptest"
)

var (
	gateway = netip.MustParseAddr("10.0.2.2")
	subnet  = netip.MustParsePrefix("10.0.2.0/24")
	guestIP = netip.MustParsePrefix("10.0.2.100/24")
)

type fixture struct {
	nat   *NAT
	st    *stack.Stack
	guest *stacktest.Guest
}

func newFixture(t *testing.T, cfg Config) *fixture {
	t.Helper()
	cfg.Subnet, cfg.Gateway = subnet, gateway
	n, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	a, b := taptest.Pipe(true, 1024)
	st, err := stack.New(stack.Config{
		Device:    a,
		MTU:       65520,
		Addresses: []netip.Prefix{netip.PrefixFrom(gateway, 24)},
		TCP:       n.HandleTCP,
		UDP:       n.HandleUDP,
		Echo:      n.HandleEcho,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Start(); err != nil {
		t.Fatal(err)
	}
	if cfg.Now == nil {
		// With an injected clock the test expires flows itself; the
		// ticker would race with it.
		n.Start()
	}
	g, err := stacktest.NewGuest(b, guestIP, gateway, 65520)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		st.Close()
		n.Close()
		g.Close()
	})
	return &fixture{nat: n, st: st, guest: g}
}

func testCtx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return c
}

// listen starts a TCP server on 127.0.0.1 running handle per connection.
func listen(t *testing.T, handle func(*net.TCPConn)) netip.AddrPort {
	t.Helper()
	l, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { l.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.AcceptTCP()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() { defer wg.Done(); defer c.Close(); handle(c) }()
		}
	}()
	return l.Addr().(*net.TCPAddr).AddrPort()
}

func viaGateway(a netip.AddrPort) netip.AddrPort { return netip.AddrPortFrom(gateway, a.Port()) }

func TestTCPThroughGateway(t *testing.T) {
	f := newFixture(t, Config{HostLoopback: true})
	addr := listen(t, func(c *net.TCPConn) { io.Copy(c, c); c.CloseWrite() })
	c, err := f.guest.DialTCP(testCtx(t), viaGateway(addr))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("ping"))
	c.CloseWrite()
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "ping" {
		t.Errorf("echo through the gateway = %q, %v", got, err)
	}
}

func TestTCPHalfCloseBothWays(t *testing.T) {
	f := newFixture(t, Config{HostLoopback: true})
	// The host reads to EOF before answering: the sandbox's FIN must
	// arrive as a half-close, not a close.
	addr := listen(t, func(c *net.TCPConn) {
		n, _ := io.Copy(io.Discard, c)
		fmt.Fprintf(c, "%d", n)
		c.CloseWrite()
		io.Copy(io.Discard, c)
	})
	c, err := f.guest.DialTCP(testCtx(t), viaGateway(addr))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write(make([]byte, 300000))
	c.CloseWrite()
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "300000" {
		t.Errorf("after half-close got %q, %v", got, err)
	}

	// The other way: the host closes its write side first and keeps
	// reading what the sandbox sends afterwards.
	done := make(chan string, 1)
	addr2 := listen(t, func(c *net.TCPConn) {
		c.Write([]byte("bye"))
		c.CloseWrite()
		b, _ := io.ReadAll(c)
		done <- string(b)
	})
	c2, err := f.guest.DialTCP(testCtx(t), viaGateway(addr2))
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if b, _ := io.ReadAll(c2); string(b) != "bye" {
		t.Errorf("read %q before the host's FIN", b)
	}
	c2.Write([]byte("still here"))
	c2.CloseWrite()
	if s := <-done; s != "still here" {
		t.Errorf("host received %q after its own half-close", s)
	}
}

func TestTCPRefusedIsReset(t *testing.T) {
	f := newFixture(t, Config{HostLoopback: true})
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	port := l.Addr().(*net.TCPAddr).Port
	l.Close() // nothing listens there now
	// A RST gives ECONNREFUSED at once; a dropped SYN would end in the
	// context's deadline instead.
	_, err := f.guest.DialTCP(testCtx(t), netip.AddrPortFrom(gateway, uint16(port)))
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("dial to a closed host port: %v, want ECONNREFUSED", err)
	}
}

func TestDisableHostLoopback(t *testing.T) {
	f := newFixture(t, Config{HostLoopback: false})
	addr := listen(t, func(c *net.TCPConn) {})
	if _, err := f.guest.DialTCP(testCtx(t), viaGateway(addr)); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("dial to the gateway with host loopback disabled: %v, want refused", err)
	}
	// A packet to 127.0.0.1 arriving on the link is a martian: dropped.
	short, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if _, err := f.guest.DialTCP(short, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), addr.Port())); err == nil {
		t.Errorf("dial to 127.0.0.1 through the stack succeeded")
	}
}

func TestHostAddr(t *testing.T) {
	n, err := New(Config{Subnet: subnet, Gateway: gateway, HostLoopback: true,
		Subnet6: netip.MustParsePrefix("fd00::/64"), Gateway6: netip.MustParseAddr("fd00::2")})
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		dst  string
		want string // "" = refused
	}{
		{"fd00::2", "::1"},
		{"fd00::50", ""},
		{"::1", ""},
		{"ff02::1", ""},
		{"2001:db8::1", "2001:db8::1"},
		{"::ffff:10.0.2.2", "127.0.0.1"},
		{"10.0.2.2", "127.0.0.1"},
		{"192.0.2.1", "192.0.2.1"},
		{"10.0.2.50", ""},
		{"127.0.0.1", ""},
		{"0.0.0.0", ""},
		{"224.0.0.1", ""},
		{"255.255.255.255", ""},
	}
	for _, c := range cases {
		got, err := n.hostAddr(netip.MustParseAddr(c.dst))
		switch {
		case c.want == "" && !errors.Is(err, ErrRefused):
			t.Errorf("%s: got %v, %v; want refused", c.dst, got, err)
		case c.want != "" && (err != nil || got.String() != c.want):
			t.Errorf("%s: got %v, %v; want %s", c.dst, got, err, c.want)
		}
	}
	if _, err := New(Config{Subnet: subnet, Gateway: netip.MustParseAddr("10.0.3.2")}); err == nil {
		t.Error("a gateway outside the subnet was accepted")
	}
}

func TestTCPResetPropagates(t *testing.T) {
	f := newFixture(t, Config{HostLoopback: true})
	// Host resets -> the sandbox sees a reset.
	addr := listen(t, func(c *net.TCPConn) {
		c.Read(make([]byte, 1))
		c.SetLinger(0)
		c.Close()
	})
	c, err := f.guest.DialTCP(testCtx(t), viaGateway(addr))
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte("x"))
	if _, err := c.Read(make([]byte, 1)); err == nil || !strings.Contains(err.Error(), "reset") {
		t.Errorf("sandbox read after the host's reset: %v", err)
	}
	c.Close()

	// The sandbox resets -> the host sees ECONNRESET.
	hostErr := make(chan error, 1)
	addr2 := listen(t, func(c *net.TCPConn) {
		c.Write([]byte("hello"))
		_, err := c.Read(make([]byte, 10))
		hostErr <- err
	})
	c2, err := f.guest.DialTCP(testCtx(t), viaGateway(addr2))
	if err != nil {
		t.Fatal(err)
	}
	c2.Read(make([]byte, 5))
	c2.Abort()
	select {
	case err := <-hostErr:
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Errorf("host read after the sandbox's reset: %v, want ECONNRESET", err)
		}
	case <-time.After(5 * time.Second):
		t.Error("the host never saw the sandbox's reset")
	}
}

// 32 MB each way, sha256 compared.
func TestTCPLargeTransfer(t *testing.T) {
	f := newFixture(t, Config{HostLoopback: true})
	data := make([]byte, 32<<20)
	rand.Read(data)
	want := sha256.Sum256(data)
	sums := make(chan [32]byte, 1)
	addr := listen(t, func(c *net.TCPConn) {
		var mode [1]byte
		c.Read(mode[:])
		if mode[0] == 'u' {
			h := sha256.New()
			io.Copy(h, c)
			var s [32]byte
			copy(s[:], h.Sum(nil))
			sums <- s
			return
		}
		c.Write(data)
	})
	up, err := f.guest.DialTCP(testCtx(t), viaGateway(addr))
	if err != nil {
		t.Fatal(err)
	}
	up.Write([]byte("u"))
	up.Write(data)
	up.CloseWrite()
	if got := <-sums; got != want {
		t.Error("upload: sha256 mismatch")
	}
	up.Close()
	down, err := f.guest.DialTCP(testCtx(t), viaGateway(addr))
	if err != nil {
		t.Fatal(err)
	}
	down.Write([]byte("d"))
	h := sha256.New()
	n, err := io.Copy(h, down)
	if err != nil || n != int64(len(data)) || !bytes.Equal(h.Sum(nil), want[:]) {
		t.Errorf("download: %d bytes, %v, sha match %v", n, err, bytes.Equal(h.Sum(nil), want[:]))
	}
}

// Hundreds of connections at once must not stall behind a small
// in-flight limit.
func TestTCPConnectBurst(t *testing.T) {
	f := newFixture(t, Config{HostLoopback: true})
	addr := listen(t, func(c *net.TCPConn) { c.Write([]byte("k")) })
	const n = 300
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := f.guest.DialTCP(testCtx(t), viaGateway(addr))
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			b := make([]byte, 1)
			if _, err := io.ReadFull(c, b); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func udpServer(t *testing.T) netip.AddrPort {
	t.Helper()
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	go func() {
		buf := make([]byte, 65536)
		for {
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			c.WriteToUDPAddrPort(append([]byte(from.String()+"|"), buf[:n]...), from)
		}
	}()
	return c.LocalAddr().(*net.UDPAddr).AddrPort()
}

func TestUDPRoundTrip(t *testing.T) {
	f := newFixture(t, Config{HostLoopback: true})
	srv := udpServer(t)
	var conns []net.Conn
	for i := 0; i < 2; i++ {
		c, err := f.guest.DialUDP(viaGateway(srv))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		conns = append(conns, c)
	}
	froms := map[string]bool{}
	for round := 0; round < 3; round++ {
		for i, c := range conns {
			msg := fmt.Sprintf("client%d-round%d", i, round)
			if round == 2 {
				msg += strings.Repeat("x", 60000) // large datagrams too
			}
			c.Write([]byte(msg))
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			buf := make([]byte, 65536)
			n, err := c.Read(buf)
			if err != nil {
				t.Fatalf("client %d round %d: %v", i, round, err)
			}
			from, payload, _ := strings.Cut(string(buf[:n]), "|")
			if payload != msg {
				t.Errorf("client %d got someone else's reply (%d bytes)", i, len(payload))
			}
			froms[from] = true
		}
	}
	if len(froms) != 2 || f.nat.udp.Len() != 2 {
		t.Errorf("2 sandbox sockets used %d host sockets and %d flows", len(froms), f.nat.udp.Len())
	}
}

// hostUDP is a UDP socket on the host's ip, closed when the test ends.
func hostUDP(t *testing.T, ip string) *net.UDPConn {
	t.Helper()
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.ParseIP(ip)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestUDPAnswerFromAnotherPort: a server that answers from a port of its
// own, as TFTP's does, is heard by the sandbox's unconnected socket, from
// that port of the gateway; the sandbox's next datagram, to that port,
// leaves from the host port of its first, which is how the server knows
// its client. A datagram from a host address the socket never sent to is
// not taken. Before, each destination was a host socket connected to it:
// the answer was never heard (TFTP from the host timed out).
func TestUDPAnswerFromAnotherPort(t *testing.T) {
	f := newFixture(t, Config{HostLoopback: true})
	listen := func(ip string) *net.UDPConn {
		c := hostUDP(t, ip)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		return c
	}
	first, second, stranger := listen("127.0.0.1"), listen("127.0.0.1"), listen("127.0.0.2")
	c, err := f.guest.ListenUDP()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	to := func(u *net.UDPConn) net.Addr {
		return net.UDPAddrFromAddrPort(viaGateway(u.LocalAddr().(*net.UDPAddr).AddrPort()))
	}
	buf := make([]byte, 100)
	if _, err := c.WriteTo([]byte("RRQ"), to(first)); err != nil {
		t.Fatal(err)
	}
	_, client, err := first.ReadFromUDPAddrPort(buf)
	if err != nil {
		t.Fatalf("the first datagram did not reach the host: %v", err)
	}
	stranger.WriteToUDPAddrPort([]byte("not yours"), client)
	second.WriteToUDPAddrPort([]byte("DATA"), client)
	n, from, err := c.ReadFrom(buf)
	if err != nil {
		t.Fatalf("the answer from another port of the host was not heard: %v", err)
	}
	if string(buf[:n]) != "DATA" || from.String() != to(second).String() {
		t.Fatalf("the sandbox read %q from %v; want DATA from %v", buf[:n], from, to(second))
	}
	if _, err := c.WriteTo([]byte("ACK"), from); err != nil {
		t.Fatal(err)
	}
	n, client2, err := second.ReadFromUDPAddrPort(buf)
	if err != nil || string(buf[:n]) != "ACK" {
		t.Fatalf("the answer to the other port: %q, %v", buf[:n], err)
	}
	if client2 != client {
		t.Errorf("the sandbox's datagrams left from %v, then from %v: one source, one host port", client, client2)
	}
	if got := f.nat.udp.Len(); got != 1 {
		t.Errorf("%d flows for one source", got)
	}
}

// TestUDPClosedPortBesideOpen: one source sending in turn to a port where
// nothing listens and to one where a server answers gets every answer.
// The host socket reports the first one's ICMP error at its next send as
// well as in its error queue: that send (to the server) failed, and the
// datagram was lost and answered "port unreachable" (probe Q1: 26-46 of
// 200 answers).
func TestUDPClosedPortBesideOpen(t *testing.T) {
	f := newFixture(t, Config{HostLoopback: true})
	srv := udpServer(t)
	closed := hostUDP(t, "127.0.0.1")
	closedPort := closed.LocalAddr().(*net.UDPAddr).AddrPort().Port()
	closed.Close()
	c, err := f.guest.ListenUDP()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 100)
	for i := range 50 {
		c.WriteTo([]byte("x"), net.UDPAddrFromAddrPort(netip.AddrPortFrom(gateway, closedPort)))
		c.WriteTo([]byte("y"), net.UDPAddrFromAddrPort(viaGateway(srv)))
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, _, err := c.ReadFrom(buf); err != nil {
			t.Fatalf("round %d: no answer from the server: %v", i+1, err)
		}
	}
}

// TestUDPDestinationsForgetTheIdlest: past maxUDPDests destinations, a
// flow forgets the one idle longest, not the first it sent to: a stream
// the sandbox subscribed to with one datagram stopped once it had sent to
// 64 others.
func TestUDPDestinationsForgetTheIdlest(t *testing.T) {
	f := newFixture(t, Config{HostLoopback: true})
	stream := hostUDP(t, "127.0.0.1")
	first := viaGateway(stream.LocalAddr().(*net.UDPAddr).AddrPort())
	c, err := f.guest.ListenUDP()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.WriteTo([]byte("subscribe"), net.UDPAddrFromAddrPort(first))
	stream.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, client, err := stream.ReadFromUDPAddrPort(make([]byte, 100))
	if err != nil {
		t.Fatal(err)
	}
	sink := hostUDP(t, "127.0.0.1") // takes the others, unread
	for i := range maxUDPDests + 5 {
		stream.WriteToUDPAddrPort([]byte("tick"), client) // the stream goes on
		time.Sleep(time.Millisecond)                      // the flow's clock counts in real time
		port := sink.LocalAddr().(*net.UDPAddr).AddrPort().Port()
		c.WriteTo([]byte("x"), net.UDPAddrFromAddrPort(netip.AddrPortFrom(gateway, port+uint16(i)+1)))
	}
	fl := guestFlow(t, f, c.LocalAddr())
	fl.mu.RLock()
	kept, n := fl.dest(first) != nil, len(fl.dests)
	fl.mu.RUnlock()
	if !kept || n != maxUDPDests {
		t.Errorf("after %d destinations: the stream's kept: %v; %d remembered, want %d", maxUDPDests+6, kept, n, maxUDPDests)
	}
}

// guestFlow is the flow of the guest's socket at local, to the gateway.
func guestFlow(t *testing.T, f *fixture, local net.Addr) *udpFlow {
	t.Helper()
	src := netip.AddrPortFrom(guestIP.Addr(), local.(*net.UDPAddr).AddrPort().Port())
	fl, ok := f.nat.udp.Get(udpKey{src, udpToLoopback})
	if !ok {
		t.Fatalf("no flow for %v", src)
	}
	return fl
}

// TestUDPStrangerKeepsNoFlow: datagrams to a flow's host port from an
// address it never sent to are dropped, and do not keep it from ending
// idle (anyone who could reach the port kept it open for ever).
func TestUDPStrangerKeepsNoFlow(t *testing.T) {
	var mu sync.Mutex
	now := time.Unix(1_000_000, 0)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	f := newFixture(t, Config{HostLoopback: true, Now: clock})
	srv := hostUDP(t, "127.0.0.1")
	c, err := f.guest.DialUDP(viaGateway(srv.LocalAddr().(*net.UDPAddr).AddrPort()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("x"))
	srv.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, client, err := srv.ReadFromUDPAddrPort(make([]byte, 10))
	if err != nil {
		t.Fatal(err)
	}
	stranger := hostUDP(t, "127.0.0.2")
	mu.Lock()
	now = now.Add(100 * time.Second)
	mu.Unlock()
	for range 3 {
		stranger.WriteToUDPAddrPort([]byte("let me in"), client)
	}
	time.Sleep(200 * time.Millisecond) // for the poller to read them
	if last := guestFlow(t, f, c.LocalAddr()).LastActive(); !last.Equal(time.Unix(1_000_000, 0)) {
		t.Errorf("the flow was last active at %v after a stranger's datagrams; want its own datagram's %v", last, time.Unix(1_000_000, 0))
	}
}

// TestUDPEmptyDatagram: a datagram without payload goes through both
// ways, as the kernel sends and delivers one (a NAT keepalive, a probe).
// Before, the sandbox's was written to the host socket with writev, which
// sends nothing for no bytes.
func TestUDPEmptyDatagram(t *testing.T) {
	f := newFixture(t, Config{HostLoopback: true})
	srv, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	c, err := f.guest.DialUDP(viaGateway(srv.LocalAddr().(*net.UDPAddr).AddrPort()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 100)
	for i := range 2 { // the flow's first datagram, and one on the flow
		if _, err := c.Write(nil); err != nil {
			t.Fatal(err)
		}
		srv.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, from, err := srv.ReadFromUDPAddrPort(buf)
		if err != nil || n != 0 {
			t.Fatalf("datagram %d: the host got %d bytes, %v; want an empty datagram", i+1, n, err)
		}
		if _, err := srv.WriteToUDPAddrPort(nil, from); err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, err := c.Read(buf); err != nil || n != 0 {
			t.Fatalf("datagram %d: the sandbox got %d bytes, %v; want the host's empty answer", i+1, n, err)
		}
	}
}

// Expiry runs on an injected clock: no sleeping for 240 s.
func TestUDPFlowExpiry(t *testing.T) {
	var mu sync.Mutex
	now := time.Unix(1_000_000, 0)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }
	f := newFixture(t, Config{HostLoopback: true, Now: clock})
	srv := udpServer(t)
	c, err := f.guest.DialUDP(viaGateway(srv))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	dns, err := f.guest.DialUDP(netip.AddrPortFrom(gateway, 53))
	if err != nil {
		t.Fatal(err)
	}
	defer dns.Close()
	c.Write([]byte("a"))
	dns.Write([]byte("q"))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	c.Read(make([]byte, 100))
	if !stacktest.WaitFor(5*time.Second, func() bool { return f.nat.udp.Len() == 2 }) {
		t.Fatalf("%d flows, want 2", f.nat.udp.Len())
	}
	advance(DefaultDNSIdleTimeout + time.Second)
	if n := f.nat.udp.Expire(clock()); n != 1 {
		t.Errorf("after %v, %d flows expired, want only the DNS one", DefaultDNSIdleTimeout, n)
	}
	advance(DefaultUDPIdleTimeout)
	if n := f.nat.udp.Expire(clock()); n != 1 || f.nat.udp.Len() != 0 {
		t.Errorf("after %v, %d expired and %d left", DefaultUDPIdleTimeout, n, f.nat.udp.Len())
	}
	// The sandbox's socket still works: the next datagram is a new flow.
	c.Write([]byte("b"))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 100)); err != nil {
		t.Errorf("after expiry: %v", err)
	}
}

func pingAllowed() bool {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ping_group_range")
	if err != nil {
		return false
	}
	f := strings.Fields(string(b))
	lo, _ := strconv.Atoi(f[0])
	hi, _ := strconv.Atoi(f[1])
	gids, _ := os.Getgroups()
	gids = append(gids, os.Getgid())
	for _, g := range gids {
		if lo <= g && g <= hi {
			return true
		}
	}
	return false
}

// Pings to the gateway go to the host's 127.0.0.1 through a ping socket
// when the user may open one; otherwise the stack answers for the gateway
// itself and the NAT says once why it does not forward.
func TestEchoToGateway(t *testing.T) {
	f := newFixture(t, Config{HostLoopback: true})
	c, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	got, err := f.guest.Ping(c, gateway, 3, []byte("payload-123"))
	if err != nil || string(got) != "payload-123" {
		t.Fatalf("ping 10.0.2.2: %q, %v", got, err)
	}
	allowed := pingAllowed()
	if allowed && f.nat.echo.Len() != 1 {
		t.Errorf("ping sockets are allowed but the echo was not forwarded (%d flows)", f.nat.echo.Len())
	}
	if !allowed && !f.nat.pingBlocked.Load() {
		t.Errorf("ping sockets are not allowed, yet no notice was recorded")
	}
	t.Logf("ping sockets allowed: %v; forwarded flows: %d", allowed, f.nat.echo.Len())
}

func TestCloseLeavesNothing(t *testing.T) {
	before := runtime.NumGoroutine()
	f := newFixture(t, Config{HostLoopback: true})
	block := listen(t, func(c *net.TCPConn) { io.Copy(io.Discard, c) })
	c, err := f.guest.DialTCP(testCtx(t), viaGateway(block))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	srv := udpServer(t)
	u, _ := f.guest.DialUDP(viaGateway(srv))
	u.Write([]byte("x"))
	stacktest.WaitFor(2*time.Second, func() bool { return f.nat.udp.Len() == 1 })
	f.st.Close()
	f.nat.Close()
	f.guest.Close()
	u.Close()
	if !stacktest.WaitFor(5*time.Second, func() bool { return runtime.NumGoroutine() <= before+2 }) {
		buf := make([]byte, 1<<20)
		t.Errorf("%d goroutines before, %d after:\n%s", before, runtime.NumGoroutine(), buf[:runtime.Stack(buf, true)])
	}
}

func TestTCPConnLimit(t *testing.T) {
	f := newFixture(t, Config{HostLoopback: true, MaxTCPConns: 2})
	// The host side ends when the sandbox's side does.
	addr := listen(t, func(c *net.TCPConn) { io.Copy(io.Discard, c) })
	var conns []*stacktest.Conn
	for i := 0; i < 2; i++ {
		c, err := f.guest.DialTCP(testCtx(t), viaGateway(addr))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		conns = append(conns, c)
	}
	if _, err := f.guest.DialTCP(testCtx(t), viaGateway(addr)); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("third connection over a limit of 2: %v, want ECONNREFUSED", err)
	}
	// What GET /v1/info reports of it.
	if st, _, _ := f.nat.Stats(); st != (TCPStats{Max: 2, Open: 2, Peak: 2, Reset: 1}) {
		t.Errorf("Stats: %+v, want 2 of 2 open, peak 2, 1 reset", st)
	}
	conns[0].Close()
	if !stacktest.WaitFor(5*time.Second, func() bool { return f.nat.tcpActive.Load() < 2 }) {
		t.Fatal("a closed connection still counts")
	}
	c, err := f.guest.DialTCP(testCtx(t), viaGateway(addr))
	if err != nil {
		t.Errorf("after one closed: %v", err)
	} else {
		c.Close()
	}
}

// A burst of new source ports, each one datagram, all get their answers;
// the flows cost no goroutine and no buffer of their own (with two
// goroutines and 2 x 64 KiB each, 5,000 of them took 600 MB), and
// expiring them frees them.
func TestUDPBurstOfNewPorts(t *testing.T) {
	const flows = 5000
	var mu sync.Mutex
	now := time.Unix(1_000_000, 0)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	f := newFixture(t, Config{HostLoopback: true, Now: clock})
	// Several servers: one socket's receive buffer (rmem_default) holds
	// only a few hundred datagrams, and the NAT sends the burst faster
	// than one server goroutine reads it.
	var srvs []netip.AddrPort
	for range 25 {
		srvs = append(srvs, udpServer(t))
	}
	conns := make([]net.Conn, flows)
	for i := range conns {
		c, err := f.guest.DialUDP(viaGateway(srvs[i%len(srvs)]))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		conns[i] = c
	}
	// One round trip first, so that both stacks have resolved each
	// other's link address: a burst that finds the neighbor entry
	// unresolved is queued behind it, up to gVisor's 256 packets.
	warm, err := f.guest.DialUDP(viaGateway(srvs[0]))
	if err != nil {
		t.Fatal(err)
	}
	warm.Write([]byte("warm"))
	warm.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := warm.Read(make([]byte, 64)); err != nil {
		t.Fatal(err)
	}
	warm.Close()
	var ms runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms)
	heap0, goroutines0 := ms.HeapInuse, runtime.NumGoroutine()
	for i, c := range conns {
		if _, err := fmt.Fprintf(c, "burst-%d", i); err != nil {
			t.Fatal(err)
		}
	}
	got := 0
	buf := make([]byte, 256)
	deadline := time.Now().Add(30 * time.Second)
	for i, c := range conns {
		c.SetReadDeadline(deadline)
		n, err := c.Read(buf)
		if err != nil {
			t.Errorf("port %d: no answer: %v", i, err)
			break
		}
		if _, payload, _ := strings.Cut(string(buf[:n]), "|"); payload == fmt.Sprintf("burst-%d", i) {
			got++
		}
	}
	if got != flows || f.nat.udp.Len() != flows+1 {
		t.Fatalf("%d of %d answers, %d flows", got, flows, f.nat.udp.Len())
	}
	runtime.GC()
	runtime.ReadMemStats(&ms)
	grew := int64(ms.HeapInuse) - int64(heap0)
	t.Logf("%d flows: heap +%d KiB, goroutines +%d", flows, grew>>10, runtime.NumGoroutine()-goroutines0)
	if g := runtime.NumGoroutine() - goroutines0; g > 10 {
		t.Errorf("%d flows started %d goroutines", flows, g)
	}
	if grew > 64<<20 {
		t.Errorf("%d flows grew the heap by %d MiB", flows, grew>>20)
	}
	mu.Lock()
	now = now.Add(DefaultUDPIdleTimeout)
	mu.Unlock()
	if n := f.nat.udp.Expire(clock()); n != flows+1 || f.nat.udp.Len() != 0 || f.nat.udpPoll.Len() != 0 {
		t.Errorf("expired %d of %d flows; %d left, %d in the poller", n, flows, f.nat.udp.Len(), f.nat.udpPoll.Len())
	}
}

// Host sockets for both families (the sandbox's IPv6 flows go to ::1).
func TestUDPSocketFamilies(t *testing.T) {
	n, err := New(Config{Subnet: subnet, Gateway: gateway})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	for _, dst := range []string{"127.0.0.1", "::1", "::ffff:127.0.0.1"} {
		fd, err := n.udpSocket(netip.MustParseAddr(dst))
		if err != nil {
			t.Errorf("%s: %v", dst, err)
			continue
		}
		syscall.Close(fd)
	}
}
