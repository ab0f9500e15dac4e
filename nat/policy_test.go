package nat

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"golang.org/x/sys/unix"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gonetns/gonetns/stack/stacktest"
)

func rules(spec ...string) []Rule {
	var rs []Rule
	for _, s := range spec {
		verdict, p, _ := strings.Cut(s, " ")
		rs = append(rs, Rule{Prefix: netip.MustParsePrefix(p), Allow: verdict == "allow"})
	}
	return rs
}

func shorthand(ps []netip.Prefix) []string {
	var s []string
	for _, p := range ps {
		s = append(s, "deny "+p.String())
	}
	return s
}

func TestPolicyTable(t *testing.T) {
	private := shorthand(PrivatePrefixes)
	metadata := shorthand(MetadataPrefixes)
	cases := []struct {
		name  string
		rules []string
		allow []string
		deny  []string
	}{
		{"no rules", nil,
			[]string{"127.0.0.1", "192.0.2.1", "::1", "2001:db8::1", "10.1.2.3"}, nil},
		{"deny v4 host", []string{"deny 127.0.0.1/32"},
			[]string{"127.0.0.2", "::1", "192.0.2.1", "::ffff:127.0.0.2"},
			[]string{"127.0.0.1", "::ffff:127.0.0.1"}},
		{"deny v6 prefix", []string{"deny 2001:db8::/32"},
			[]string{"2001:db9::1", "192.0.2.1", "::1"},
			[]string{"2001:db8::1", "2001:db8:ffff::1"}},
		{"allow alone denies the rest, both families", []string{"allow 127.0.0.1/32"},
			[]string{"127.0.0.1"},
			[]string{"127.0.0.2", "::1", "192.0.2.1", "2001:db8::1"}},
		{"allow v6 alone", []string{"allow ::1/128"},
			[]string{"::1"},
			[]string{"127.0.0.1", "::2"}},
		{"most specific wins: deny inside allow", []string{"allow 10.0.0.0/8", "deny 10.1.0.0/16"},
			[]string{"10.2.0.1", "10.0.0.1"},
			[]string{"10.1.0.1", "192.0.2.1"}},
		{"most specific wins: allow inside deny, order does not matter", []string{"allow 10.1.2.3/32", "deny 10.0.0.0/8", "allow 0.0.0.0/0"},
			[]string{"10.1.2.3", "192.0.2.1"},
			[]string{"10.1.2.4", "10.0.0.1", "::1"}},
		{"three levels", []string{"deny 10.0.0.0/8", "allow 10.1.0.0/16", "deny 10.1.2.0/24", "allow ::/0", "allow 0.0.0.0/0"},
			[]string{"10.1.3.1", "192.0.2.1", "2001:db8::1"},
			[]string{"10.1.2.1", "10.2.0.1"}},
		{"a /0 deny is the default", []string{"deny 0.0.0.0/0"},
			[]string{"::1", "2001:db8::1"},
			[]string{"127.0.0.1", "192.0.2.1"}},
		{"--deny-private", private,
			[]string{"127.0.0.1", "192.0.2.1", "100.64.0.1", "172.32.0.1", "::1", "2001:db8::1", "fe00::1"},
			[]string{"10.0.0.1", "10.255.255.255", "172.16.0.1", "172.31.255.255", "192.168.1.1", "169.254.1.1",
				"fc00::1", "fd00::2", "fdff::1", "fe80::1", "febf::1"}},
		{"--deny-metadata", metadata,
			[]string{"169.254.169.253", "127.0.0.1", "fd00:ec2::253", "10.0.0.1"},
			[]string{"169.254.169.254", "fd00:ec2::254"}},
		{"--deny-private with a hole and the rest open", append(private, "allow 192.168.1.0/24", "allow 0.0.0.0/0", "allow ::/0"),
			[]string{"192.168.1.7", "192.0.2.1", "2001:db8::1"},
			[]string{"192.168.2.7", "10.0.0.1", "fd00::1"}},
		{"duplicates of the same verdict are one rule", []string{"deny 127.0.0.1/32", "deny 127.0.0.1/32"},
			[]string{"127.0.0.2"},
			[]string{"127.0.0.1"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p, err := NewPolicy(rules(c.rules...))
			if err != nil {
				t.Fatal(err)
			}
			for _, a := range c.allow {
				if !p.Allows(netip.MustParseAddr(a)) {
					t.Errorf("%s denied, want allowed", a)
				}
			}
			for _, a := range c.deny {
				if p.Allows(netip.MustParseAddr(a)) {
					t.Errorf("%s allowed, want denied", a)
				}
			}
		})
	}
	var nilPolicy *Policy
	if !nilPolicy.Allows(netip.MustParseAddr("127.0.0.1")) || !nilPolicy.DefaultAllow() || nilPolicy.Rules() != nil {
		t.Error("a nil policy does not allow everything")
	}
}

func TestPolicyRejects(t *testing.T) {
	cases := []struct {
		rules []Rule
		want  string
	}{
		{rules("deny 10.0.0.1/8"), "did you mean 10.0.0.0/8"},
		{rules("deny ::ffff:127.0.0.1/128"), "IPv4-mapped"},
		{rules("deny 10.0.0.0/8", "allow 10.0.0.0/8"), "contradict"},
		{[]Rule{{Prefix: netip.MustParsePrefix("10.0.0.0/8"), Origin: "--deny-private"}, {Prefix: netip.MustParsePrefix("10.0.0.0/8"), Allow: true, Origin: "--allow"}},
			"--deny-private (deny 10.0.0.0/8) and --allow (allow 10.0.0.0/8) contradict"},
		{[]Rule{{}}, "invalid prefix"},
	}
	for _, c := range cases {
		_, err := NewPolicy(c.rules)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("NewPolicy(%v) = %v, want an error with %q", c.rules, err, c.want)
		}
	}
	p, _ := NewPolicy(rules("deny 10.0.0.0/8", "allow 10.1.0.0/16", "deny 0.0.0.0/0"))
	if got := fmt.Sprint(p.Rules()); got != "[allow 10.1.0.0/16 deny 10.0.0.0/8 deny 0.0.0.0/0]" || p.DefaultAllow() {
		t.Errorf("Rules() = %s, DefaultAllow() = %v", got, p.DefaultAllow())
	}
}

// syncBuffer is a bytes.Buffer for a logger written from many goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

func mustPolicy(t *testing.T, spec ...string) *Policy {
	t.Helper()
	p, err := NewPolicy(rules(spec...))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// The policy judges the host address: denying 127.0.0.1 closes the
// gateway, at once and before any host socket exists.
func TestPolicyRefusesTCPAtOnce(t *testing.T) {
	var logs syncBuffer
	log := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	f := newFixture(t, Config{HostLoopback: true, Policy: mustPolicy(t, "deny 127.0.0.1/32"), Logger: log})
	accepted := make(chan struct{}, 1)
	addr := listen(t, func(c *net.TCPConn) { accepted <- struct{}{} })
	for range 2 {
		_, err := f.guest.DialTCP(testCtx(t), viaGateway(addr))
		if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("dial to a denied host address: %v, want ECONNREFUSED", err)
		}
	}
	select {
	case <-accepted:
		t.Error("the host server was connected to despite the policy")
	case <-time.After(100 * time.Millisecond):
	}
	if n := strings.Count(logs.String(), "refused by the egress policy"); n != 1 {
		t.Errorf("two refusals of one destination logged %d lines, want 1:\n%s", n, logs.String())
	}
}

func TestPolicyAllowsTCP(t *testing.T) {
	f := newFixture(t, Config{HostLoopback: true, Policy: mustPolicy(t, "allow 127.0.0.1/32")})
	addr := listen(t, func(c *net.TCPConn) { c.Write([]byte("hi")); c.Close() })
	c, err := f.guest.DialTCP(testCtx(t), viaGateway(addr))
	if err != nil {
		t.Fatalf("dial to an allowed host address: %v", err)
	}
	c.Close()
}

// UDP refused by the policy gets ICMP destination unreachable (its code,
// "administratively prohibited", is checked in package stack and end to
// end: gVisor's sockets, unlike Linux's, report only port unreachable), and
// no host socket is made.
func TestPolicyProhibitsUDP(t *testing.T) {
	f := newFixture(t, Config{HostLoopback: true, Policy: mustPolicy(t, "deny 127.0.0.0/8")})
	srv := udpServer(t)
	c, err := f.guest.DialUDP(viaGateway(srv))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("x"))
	unreachable := f.guest.Stats().ICMP.V4.PacketsReceived.DstUnreachable
	if !stacktest.WaitFor(5*time.Second, func() bool { return unreachable.Value() == 1 }) {
		t.Errorf("the guest received %d destination unreachable, want 1", unreachable.Value())
	}
	if f.nat.udp.Len() != 0 {
		t.Errorf("a prohibited flow made %d host flows", f.nat.udp.Len())
	}
}

func TestPolicyProhibitsEcho(t *testing.T) {
	f := newFixture(t, Config{HostLoopback: true, Policy: mustPolicy(t, "deny 127.0.0.1/32")})
	short, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if got, err := f.guest.Ping(short, gateway, 1, []byte("x")); err == nil {
		t.Errorf("ping to a denied address was answered: %q", got)
	}
	if got := f.guest.Stats().ICMP.V4.PacketsReceived.DstUnreachable.Value(); got != 1 {
		t.Errorf("the guest received %d destination unreachable, want 1", got)
	}
	if f.nat.echo.Len() != 0 {
		t.Errorf("a prohibited echo made %d host flows", f.nat.echo.Len())
	}
}

// --outbound-addr=127.0.0.2: the host's loopback sees connections and
// datagrams from 127.0.0.2.
func TestOutboundAddrLoopback(t *testing.T) {
	f := newFixture(t, Config{HostLoopback: true, OutboundAddr: netip.MustParseAddr("127.0.0.2")})
	from := make(chan string, 1)
	addr := listen(t, func(c *net.TCPConn) { from <- c.RemoteAddr().(*net.TCPAddr).IP.String(); c.Close() })
	c, err := f.guest.DialTCP(testCtx(t), viaGateway(addr))
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if got := <-from; got != "127.0.0.2" {
		t.Errorf("TCP from %s at the host, want 127.0.0.2", got)
	}
	srv := udpServer(t)
	u, err := f.guest.DialUDP(viaGateway(srv))
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	u.Write([]byte("x"))
	u.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 100)
	n, err := u.Read(buf)
	if err != nil || !strings.HasPrefix(string(buf[:n]), "127.0.0.2:") {
		t.Errorf("UDP reply %q, %v: want it from a socket at 127.0.0.2", buf[:n], err)
	}
}

// A TCP socket bound to the outbound address takes its port at connect
// (IP_BIND_ADDRESS_NO_PORT), on both TCP paths, so that ports a
// connection in TIME_WAIT holds stay usable for other peers.
func TestOutboundPortAtConnect(t *testing.T) {
	f := newFixture(t, Config{HostLoopback: true, OutboundAddr: netip.MustParseAddr("127.0.0.2")})
	addr := listen(t, func(c *net.TCPConn) { c.Close() })
	noPort := func(fd int) int {
		v, err := unix.GetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_BIND_ADDRESS_NO_PORT)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	fd, err := f.nat.dialTCP(viaGateway(addr))
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if noPort(fd) != 1 {
		t.Error("the fast path's socket took its port at bind")
	}
	c, err := f.nat.out.tcpDialer(addr.Addr()).Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	rc, _ := c.(*net.TCPConn).SyscallConn()
	var v int
	rc.Control(func(fd uintptr) { v = noPort(int(fd)) })
	if v != 1 {
		t.Error("the netstack path's socket took its port at bind")
	}
}

func TestOutboundScope(t *testing.T) {
	lo4, lo6 := netip.MustParseAddr("127.0.0.2"), netip.MustParseAddr("::1")
	ext4, ext6 := netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("2001:db8::10")
	cases := []struct {
		src4, src6 netip.Addr
		everywhere bool
		host       string
		want       netip.Addr
	}{
		{lo4, netip.Addr{}, false, "127.0.0.1", lo4},
		{lo4, netip.Addr{}, false, "192.0.2.1", netip.Addr{}}, // a loopback source cannot leave the host
		{ext4, netip.Addr{}, false, "192.0.2.1", ext4},
		{ext4, netip.Addr{}, false, "127.0.0.1", netip.Addr{}}, // the host's loopback keeps its own source
		{ext4, ext6, false, "2001:db8::1", ext6},
		{ext4, lo6, false, "::1", lo6},
		{ext4, netip.Addr{}, false, "2001:db8::1", netip.Addr{}},
		{netip.Addr{}, ext6, false, "192.0.2.1", netip.Addr{}},
		{ext6, ext4, false, "192.0.2.1", netip.Addr{}}, // wrong families are ignored
		// slirp4netns's rule: an outside source for the loopback too.
		{ext4, netip.Addr{}, true, "127.0.0.1", ext4},
		{ext4, ext6, true, "::1", ext6},
		{lo4, netip.Addr{}, true, "192.0.2.1", netip.Addr{}}, // still cannot leave the host
		{ext4, netip.Addr{}, true, "192.0.2.1", ext4},
	}
	d := &net.Dialer{}
	for _, c := range cases {
		o := newOutbound(c.src4, c.src6, c.everywhere, d, d)
		host := netip.MustParseAddr(c.host)
		if got := o.source(host); got != c.want {
			t.Errorf("src4=%v src6=%v everywhere=%v host=%s: source %v, want %v", c.src4, c.src6, c.everywhere, host, got, c.want)
		}
		la := o.tcpDialer(host).LocalAddr
		if c.want.IsValid() != (la != nil) || (la != nil && la.(*net.TCPAddr).AddrPort().Addr() != c.want) {
			t.Errorf("src4=%v src6=%v host=%s: dialer bound to %v, want %v", c.src4, c.src6, host, la, c.want)
		}
	}
}
