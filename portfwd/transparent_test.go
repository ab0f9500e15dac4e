package portfwd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/route"
	"github.com/gonetns/gonetns/port"
	"github.com/gonetns/gonetns/tap"
)

// netns is an OS thread in a network namespace of the test's own, and a
// way to run functions on it: the shape of the child's InNetNS hook.
type netns struct {
	tid  int // the thread, for "ip link set DEV netns TID"
	fns  chan func()
	done chan struct{}
}

func newNetns(t *testing.T) *netns {
	t.Helper()
	if os.Getuid() != 0 {
		t.Fatal("this test creates network namespaces and needs root: run `make test` (as root)")
	}
	n := &netns{fns: make(chan func()), done: make(chan struct{})}
	errc := make(chan error, 1)
	go func() {
		defer close(n.done)
		runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("unshare(CLONE_NEWNET): %w", err)
			return
		}
		n.tid = unix.Gettid()
		errc <- tap.LoopbackUp()
		for fn := range n.fns {
			fn()
		}
	}()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { close(n.fns); <-n.done })
	return n
}

// Do runs fn on the namespace's thread.
func (n *netns) Do(fn func() error) error {
	errc := make(chan error, 1)
	n.fns <- func() { errc <- fn() }
	return <-errc
}

func (n *netns) must(t testing.TB, fn func() error) {
	t.Helper()
	if err := n.Do(fn); err != nil {
		t.Fatal(err)
	}
}

// srcipWorld is a host and a sandbox, each a namespace of the test's own:
// the sandbox as gonetns lays it out (tap0 with 10.0.2.100/24 and
// fd00::100/64 and default routes through it; nobody reads the TAP, so
// whatever the sandbox routes out of it is lost), the host with the
// clients' addresses 198.18.0.2 and 2001:db8::2 and the published ports'
// 198.18.0.1 and 2001:db8::1 (on its lo), a Manager in the host and
// ServeChild in the sandbox, joined by the real dial protocol.
type srcipWorld struct {
	host, sandbox *netns
	m             *Manager
	child         *Dialer
	tapFile       *os.File
}

var (
	hostIP4, clientIP4 = netip.MustParseAddr("198.18.0.1"), netip.MustParseAddr("198.18.0.2")
	hostIP6, clientIP6 = netip.MustParseAddr("2001:db8::1"), netip.MustParseAddr("2001:db8::2")
	tapIP4, tapIP6     = netip.MustParseAddr("10.0.2.100"), netip.MustParseAddr("fd00::100")
)

func newSrcipWorld(t *testing.T, cfg Config) *srcipWorld {
	t.Helper()
	w := &srcipWorld{host: newNetns(t), sandbox: newNetns(t)}
	w.host.must(t, func() error {
		// The client's address first: it is the primary one then, and the
		// host's own preferred source for replies to the client (so UDP
		// replies leave from the published address only if the port says
		// so).
		for _, a := range []string{"198.18.0.2/15", "198.18.0.1/15"} {
			if err := tap.Configure(tap.LinkConfig{Name: "lo", Address: netip.MustParsePrefix(a)}); err != nil {
				return err
			}
		}
		for _, a := range []string{"2001:db8::2/64", "2001:db8::1/64"} {
			if err := tap.Configure(tap.LinkConfig{Name: "lo", Address6: netip.MustParsePrefix(a)}); err != nil {
				return err
			}
		}
		return nil
	})
	w.sandbox.must(t, func() error {
		dev, err := tap.Open(tap.Options{Name: "tap0"})
		if err != nil {
			return err
		}
		w.tapFile = dev.File
		return tap.Configure(tap.LinkConfig{
			Name: "tap0", MTU: 65520,
			Address: netip.PrefixFrom(tapIP4, 24), Gateway: netip.MustParseAddr("10.0.2.2"),
			Address6: netip.PrefixFrom(tapIP6, 64), Gateway6: netip.MustParseAddr("fd00::2"),
		})
	})
	t.Cleanup(func() { w.tapFile.Close() })
	// IPv6 addresses become usable (local routes) from a kernel work queue.
	waitFor(t, "the sandbox's IPv6 address", func() bool {
		return w.sandbox.Do(func() error {
			c, err := net.ListenPacket("udp6", "["+tapIP6.String()+"]:0")
			if err == nil {
				c.Close()
			}
			return err
		}) == nil
	})

	p, c := wirePair(t)
	served := make(chan error, 1)
	go func() {
		served <- ServeChild(context.Background(), c, ChildConfig{Logger: testLogger(t).With("side", "child"), InNetNS: w.sandbox.Do})
	}()
	w.child = NewDialer(p)
	w.child.Start()
	cfg.Dialer = w.child
	w.m = newTestManager(t, cfg)
	t.Cleanup(func() {
		w.m.Close()
		w.child.Close()
		if err := <-served; err != nil {
			t.Errorf("ServeChild: %v", err)
		}
	})
	return w
}

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("waited 10 s for %s", what)
		}
	}
}

// publish publishes proto on the host's address hostIP (zero: no PARENTIP,
// dual-stack), port chosen by the kernel, to target in the sandbox.
func (w *srcipWorld) publish(t testing.TB, proto string, hostIP netip.Addr, target netip.AddrPort) netip.AddrPort {
	t.Helper()
	var hp netip.AddrPort
	w.host.must(t, func() error {
		network := proto[:3]
		free := ":0"
		if hostIP.IsValid() {
			free = netip.AddrPortFrom(hostIP, 0).String()
		}
		var pn int
		if network == "tcp" {
			l, err := net.Listen("tcp", free)
			if err != nil {
				return err
			}
			pn = l.Addr().(*net.TCPAddr).Port
			l.Close()
		} else {
			l, err := net.ListenPacket("udp", free)
			if err != nil {
				return err
			}
			pn = l.LocalAddr().(*net.UDPAddr).Port
			l.Close()
		}
		spec := port.Spec{Proto: proto, ParentIP: hostIP, ParentPort: pn, ChildIP: target.Addr(), ChildPort: int(target.Port())}
		if _, err := w.m.AddPort(context.Background(), spec); err != nil {
			return err
		}
		hp = netip.AddrPortFrom(hostIP, uint16(pn))
		return nil
	})
	return hp
}

// peerServer serves in the sandbox on addr (port 0: any) and answers each
// TCP connection, or each UDP datagram, with the address it sees the peer
// at; UDP answers from an unconnected socket (the RootlessKit#592 case
// when bound to the wildcard address).
func (w *srcipWorld) peerServer(t testing.TB, network string, addr netip.AddrPort) netip.AddrPort {
	t.Helper()
	return peerServer(t, w.sandbox, network, addr)
}

func peerServer(t testing.TB, ns *netns, network string, addr netip.AddrPort) netip.AddrPort {
	t.Helper()
	var bound netip.AddrPort
	var wg sync.WaitGroup
	ns.must(t, func() error {
		if strings.HasPrefix(network, "tcp") {
			l, err := net.Listen(network, addr.String())
			if err != nil {
				return err
			}
			bound = l.Addr().(*net.TCPAddr).AddrPort()
			t.Cleanup(func() { l.Close(); wg.Wait() })
			wg.Go(func() {
				for {
					c, err := l.Accept()
					if err != nil {
						return
					}
					wg.Go(func() {
						defer c.Close()
						fmt.Fprintf(c, "%s\n", c.RemoteAddr())
						io.Copy(c, c) // echo, to the client's close
					})
				}
			})
			return nil
		}
		pc, err := net.ListenUDP(network, net.UDPAddrFromAddrPort(addr))
		if err != nil {
			return err
		}
		bound = pc.LocalAddr().(*net.UDPAddr).AddrPort()
		t.Cleanup(func() { pc.Close(); wg.Wait() })
		wg.Go(func() {
			b := make([]byte, 2048)
			for {
				n, from, err := pc.ReadFromUDPAddrPort(b)
				if err != nil {
					return
				}
				pc.WriteToUDPAddrPort(fmt.Appendf(nil, "%s %s", netip.AddrPortFrom(from.Addr().Unmap(), from.Port()), b[:n]), from)
			}
		})
		return nil
	})
	return netip.AddrPortFrom(addr.Addr(), bound.Port())
}

// clientConn connects from the host's client address to to.
func (w *srcipWorld) clientConn(t testing.TB, network string, from netip.Addr, to netip.AddrPort) net.Conn {
	t.Helper()
	var c net.Conn
	w.host.must(t, func() error {
		var err error
		d := net.Dialer{Timeout: 10 * time.Second}
		if network == "tcp" {
			d.LocalAddr = net.TCPAddrFromAddrPort(netip.AddrPortFrom(from, 0))
		} else {
			d.LocalAddr = net.UDPAddrFromAddrPort(netip.AddrPortFrom(from, 0))
		}
		c, err = d.Dial(network, to.String())
		return err
	})
	t.Cleanup(func() { c.Close() })
	return c
}

// askTCP connects and returns the peer address the server saw, after a
// round trip of data both ways.
func (w *srcipWorld) askTCP(t testing.TB, from netip.Addr, to netip.AddrPort) (seen, client string) {
	t.Helper()
	c := w.clientConn(t, "tcp", from, to)
	c.SetDeadline(time.Now().Add(20 * time.Second))
	line := make([]byte, 0, 64)
	b := make([]byte, 1)
	for {
		if _, err := c.Read(b); err != nil {
			t.Fatalf("%s -> %s: read the server's line: %v", from, to, err)
		}
		if b[0] == '\n' {
			break
		}
		line = append(line, b[0])
	}
	msg := strings.Repeat("x", 100000)
	go io.WriteString(c, msg)
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != msg {
		t.Fatalf("%s -> %s: echo: %v", from, to, err)
	}
	return string(line), c.LocalAddr().String()
}

// askUDP sends a datagram and returns the peer address in the server's
// answer.
func askUDP(t testing.TB, c net.Conn, msg string) string {
	t.Helper()
	b := make([]byte, 2048)
	for i := 0; i < 50; i++ { // datagrams may be lost; the flow is set up by the first
		if _, err := c.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		n, err := c.Read(b)
		if err == nil {
			seen, rest, _ := strings.Cut(string(b[:n]), " ")
			if rest != msg {
				t.Fatalf("%s -> %s: answer %q to %q", c.LocalAddr(), c.RemoteAddr(), b[:n], msg)
			}
			return seen
		}
		if !errors.Is(err, os.ErrDeadlineExceeded) && !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatal(err)
		}
	}
	t.Fatalf("%s -> %s: no answer to 50 datagrams", c.LocalAddr(), c.RemoteAddr())
	return ""
}

// unmapped formats an address as the server reports it.
func unmapped(s string) string {
	ap := netip.MustParseAddrPort(s)
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()).String()
}

// TestSourceKept: through published ports, servers in the sandbox see the
// client's own address and port, for TCP and UDP, IPv4 and IPv6, bound to
// the wildcard address, to loopback and to the TAP's address, and replies
// find their way back.
func TestSourceKept(t *testing.T) {
	w := newSrcipWorld(t, Config{SourceIPTransparent: true, UDPIdleTimeout: 500 * time.Millisecond})
	cases := []struct {
		name         string
		bind, target netip.Addr // the server's address, the CHILDIP
		host, client netip.Addr
	}{
		{"v4/loopback", netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("127.0.0.1"), hostIP4, clientIP4},
		{"v4/wildcard", netip.IPv4Unspecified(), netip.MustParseAddr("127.0.0.1"), hostIP4, clientIP4},
		{"v4/tap", tapIP4, tapIP4, hostIP4, clientIP4},
		{"v4/wildcard-via-tap", netip.IPv4Unspecified(), tapIP4, hostIP4, clientIP4},
		{"v6/loopback", netip.IPv6Loopback(), netip.IPv6Loopback(), hostIP6, clientIP6},
		{"v6/wildcard", netip.IPv6Unspecified(), netip.IPv6Loopback(), hostIP6, clientIP6},
		{"v6/tap", tapIP6, tapIP6, hostIP6, clientIP6},
		// A dual-stack host listener, an IPv4 client (IPv4-mapped there)
		// and an IPv6 one. The host's route to the client prefers the
		// client's own address as the source (both are on the host's lo),
		// so UDP replies come from the right address only if the port
		// names it (pktinfo).
		{"v4-on-dual-stack", netip.IPv4Unspecified(), netip.MustParseAddr("127.0.0.1"), netip.Addr{}, clientIP4},
		{"v6-on-dual-stack", netip.IPv6Unspecified(), netip.IPv6Loopback(), netip.Addr{}, clientIP6},
		{"v4-on-v4-wildcard", netip.IPv4Unspecified(), netip.MustParseAddr("127.0.0.1"), netip.IPv4Unspecified(), clientIP4},
	}
	for _, c := range cases {
		t.Run("tcp/"+c.name, func(t *testing.T) {
			fam := "tcp4"
			if c.bind.Is6() {
				fam = "tcp6"
			}
			srv := w.peerServer(t, fam, netip.AddrPortFrom(c.bind, 0))
			proto := "tcp"
			hp := w.publish(t, proto, c.host, netip.AddrPortFrom(c.target, srv.Port()))
			dst := hp
			if !c.host.IsValid() || c.host.IsUnspecified() {
				dst = netip.AddrPortFrom(map[bool]netip.Addr{false: hostIP4, true: hostIP6}[c.client.Is6()], hp.Port())
			}
			for range 3 {
				seen, client := w.askTCP(t, c.client, dst)
				if seen != unmapped(client) {
					t.Errorf("the server saw %s, the client is %s", seen, client)
				}
			}
		})
		t.Run("udp/"+c.name, func(t *testing.T) {
			fam := "udp4"
			if c.bind.Is6() {
				fam = "udp6"
			}
			srv := w.peerServer(t, fam, netip.AddrPortFrom(c.bind, 0))
			hp := w.publish(t, "udp", c.host, netip.AddrPortFrom(c.target, srv.Port()))
			dst := hp
			if !c.host.IsValid() || c.host.IsUnspecified() {
				dst = netip.AddrPortFrom(map[bool]netip.Addr{false: hostIP4, true: hostIP6}[c.client.Is6()], hp.Port())
			}
			conn := w.clientConn(t, "udp", c.client, dst)
			for i := range 3 {
				if seen := askUDP(t, conn, fmt.Sprint("datagram ", i)); seen != unmapped(conn.LocalAddr().String()) {
					t.Errorf("the server saw %s, the client is %s", seen, conn.LocalAddr())
				}
			}
		})
	}

	t.Run("loopback-client", func(t *testing.T) {
		srv := w.peerServer(t, "tcp4", netip.MustParseAddrPort("0.0.0.0:0"))
		hp := w.publish(t, "tcp", netip.MustParseAddr("127.0.0.1"), netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), srv.Port()))
		seen, _ := w.askTCP(t, netip.MustParseAddr("127.0.0.1"), hp)
		if !strings.HasPrefix(seen, "127.0.0.1:") {
			t.Errorf("a loopback client: the server saw %s, want 127.0.0.1 as without transparency", seen)
		}
		usrv := w.peerServer(t, "udp4", netip.MustParseAddrPort("127.0.0.1:0"))
		uhp := w.publish(t, "udp", netip.MustParseAddr("127.0.0.1"), usrv)
		if seen := askUDP(t, w.clientConn(t, "udp", netip.MustParseAddr("127.0.0.1"), uhp), "hi"); !strings.HasPrefix(seen, "127.0.0.1:") {
			t.Errorf("a loopback UDP client: the server saw %s", seen)
		}
	})

	t.Run("udp/20-clients-at-once", func(t *testing.T) {
		for _, v6 := range []bool{false, true} {
			bind, host, client := netip.IPv4Unspecified(), hostIP4, clientIP4
			if v6 {
				bind, host, client = netip.IPv6Unspecified(), hostIP6, clientIP6
			}
			fam := map[bool]string{false: "udp4", true: "udp6"}[v6]
			srv := w.peerServer(t, fam, netip.AddrPortFrom(bind, 0))
			target := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), srv.Port())
			if v6 {
				target = netip.AddrPortFrom(netip.IPv6Loopback(), srv.Port())
			}
			hp := w.publish(t, "udp", host, target)
			var wg sync.WaitGroup
			for i := range 20 {
				conn := w.clientConn(t, "udp", client, hp)
				wg.Go(func() {
					for j := range 5 {
						msg := fmt.Sprintf("client %d datagram %d", i, j)
						if seen := askUDP(t, conn, msg); seen != unmapped(conn.LocalAddr().String()) {
							t.Errorf("client %s: the server saw %s", conn.LocalAddr(), seen)
						}
					}
				})
			}
			wg.Wait()
		}
	})

	t.Run("refused-at-once", func(t *testing.T) {
		closed := w.peerServer(t, "tcp4", netip.MustParseAddrPort("127.0.0.1:0"))
		// The server's socket closes at cleanup; use a port nothing
		// listens on: the server's port plus one is not guaranteed free,
		// so ask the child directly with a port of a listener just closed.
		var pn uint16
		w.sandbox.must(t, func() error {
			l, err := net.Listen("tcp4", "127.0.0.1:0")
			if err != nil {
				return err
			}
			pn = l.Addr().(*net.TCPAddr).AddrPort().Port()
			return l.Close()
		})
		_ = closed
		// The RST comes back marked (fwmark_reflect), so the refusal is
		// an ECONNREFUSED and not a timeout.
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_, err := w.child.Dial(ctx, "tcp", netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), pn), netip.MustParseAddrPort("198.18.0.2:41000"))
		if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("a transparent dial to a closed port: %v, want ECONNREFUSED", err)
		}
	})

	t.Run("udp-routes-released", func(t *testing.T) {
		rt := w.routing(t)
		srv := w.peerServer(t, "udp4", netip.MustParseAddrPort("0.0.0.0:0"))
		hp := w.publish(t, "udp", hostIP4, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), srv.Port()))
		conn := w.clientConn(t, "udp", clientIP4, hp)
		askUDP(t, conn, "hello")
		flow := route.Flow{Dst: clientIP4, IPProto: unix.IPPROTO_UDP, SPort: srv.Port()}
		if local, err := rt.IsLocal(flow); err != nil || !local {
			t.Fatalf("while the flow lives, its replies are not routed back: local %v, %v", local, err)
		}
		// The flow ends after its idle timeout; its rule and route go.
		waitFor(t, "the flow's route to go away", func() bool {
			local, err := rt.IsLocal(flow)
			return err == nil && !local
		})
	})
}

// routing opens a routing socket in the sandbox, for looking at its routes.
func (w *srcipWorld) routing(t testing.TB) *route.Routing {
	t.Helper()
	var rt *route.Routing
	w.sandbox.must(t, func() error {
		var err error
		rt, err = route.Open()
		return err
	})
	t.Cleanup(func() { rt.Close() })
	return rt
}

// TestSourceNotKept: with SourceIPTransparent off, connections come from
// the namespace's own address, and the namespace's routing is untouched.
func TestSourceNotKept(t *testing.T) {
	w := newSrcipWorld(t, Config{})
	srv := w.peerServer(t, "tcp4", netip.MustParseAddrPort("0.0.0.0:0"))
	for _, target := range []netip.Addr{netip.MustParseAddr("127.0.0.1"), tapIP4} {
		hp := w.publish(t, "tcp", hostIP4, netip.AddrPortFrom(target, srv.Port()))
		seen, _ := w.askTCP(t, clientIP4, hp)
		if !strings.HasPrefix(seen, target.String()+":") {
			t.Errorf("to %s: the server saw %s", target, seen)
		}
	}
	usrv := w.peerServer(t, "udp4", netip.MustParseAddrPort("0.0.0.0:0"))
	hp := w.publish(t, "udp", hostIP4, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), usrv.Port()))
	if seen := askUDP(t, w.clientConn(t, "udp", clientIP4, hp), "hi"); !strings.HasPrefix(seen, "127.0.0.1:") {
		t.Errorf("UDP: the server saw %s", seen)
	}
	rt := w.routing(t)
	if local, err := rt.IsLocal(route.Flow{Dst: clientIP4, Mark: transparentMark}); err != nil || local {
		t.Errorf("transparency off, yet marked packets are routed locally (%v, %v)", local, err)
	}
}

// TestSourceKeptFallsBack: a target that is not the namespace's own address
// gets a plain connection (its replies would be routed, not delivered); a
// client address of the namespace too.
func TestSourceKeptFallsBack(t *testing.T) {
	w := newSrcipWorld(t, Config{SourceIPTransparent: true})
	srv := w.peerServer(t, "tcp4", netip.MustParseAddrPort("0.0.0.0:0"))
	ctx := context.Background()
	// The client claims an address the namespace owns.
	c, err := w.child.Dial(ctx, "tcp", netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), srv.Port()), netip.AddrPortFrom(tapIP4, 42000))
	if err != nil {
		t.Fatal(err)
	}
	if got := c.LocalAddr().(*net.TCPAddr).AddrPort(); got.Port() == 42000 && got.Addr() == tapIP4 {
		t.Errorf("bound to the namespace's own address %s", got)
	}
	c.Close()
	// A family mismatch: an IPv6 client to an IPv4 target.
	c, err = w.child.Dial(ctx, "tcp", netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), srv.Port()), netip.AddrPortFrom(clientIP6, 42001))
	if err != nil {
		t.Fatal(err)
	}
	if got := c.LocalAddr().(*net.TCPAddr).AddrPort().Addr(); got != netip.MustParseAddr("127.0.0.1") {
		t.Errorf("an IPv6 client to an IPv4 target: bound to %s", got)
	}
	c.Close()
	// A transparent connection is bound to the client's address.
	c, err = w.child.Dial(ctx, "tcp", netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), srv.Port()), netip.AddrPortFrom(clientIP4, 42002))
	if err != nil {
		t.Fatal(err)
	}
	if got := c.LocalAddr().(*net.TCPAddr).AddrPort(); got != netip.AddrPortFrom(clientIP4, 42002) {
		t.Errorf("a transparent connection is bound to %s", got)
	}
	c.Close()
}

// run runs a command (ip, iptables) on the namespace's thread, so in the
// namespace.
func (n *netns) run(t testing.TB, args ...string) {
	t.Helper()
	if err := n.Do(func() error {
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			return fmt.Errorf("%s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// TestSourceKeptThroughRedirect: a firewall in the sandbox redirects the
// published ports' targets to a "container" (a namespace behind a veth), as
// Docker's DNAT does with userland-proxy=false. UDP keeps the client's
// address through it; TCP cannot (no connection marks without iptables), and
// connects at once without it instead of timing out.
func TestSourceKeptThroughRedirect(t *testing.T) {
	for _, bin := range []string{"ip", "iptables"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Fatalf("this test sets up a redirect with %s: install it (apt-get install iproute2 iptables)", bin)
		}
	}
	w := newSrcipWorld(t, Config{SourceIPTransparent: true})
	ctr := newNetns(t)
	w.sandbox.run(t, "ip", "link", "add", "gnctr0", "type", "veth", "peer", "name", "eth0", "netns", fmt.Sprint(ctr.tid))
	w.sandbox.run(t, "ip", "addr", "add", "172.30.0.1/24", "dev", "gnctr0")
	w.sandbox.run(t, "ip", "link", "set", "gnctr0", "up")
	ctr.run(t, "ip", "addr", "add", "172.30.0.2/24", "dev", "eth0")
	ctr.run(t, "ip", "link", "set", "eth0", "up")
	ctr.run(t, "ip", "route", "add", "default", "via", "172.30.0.1")
	// What Docker sets up for a published port without its userland proxy.
	w.sandbox.must(t, func() error {
		for _, f := range []string{"/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv4/conf/gnctr0/route_localnet"} {
			if err := os.WriteFile(f, []byte("1"), 0); err != nil {
				return err
			}
		}
		return nil
	})
	tcpSrv := peerServer(t, ctr, "tcp4", netip.MustParseAddrPort("0.0.0.0:9998"))
	udpSrv := peerServer(t, ctr, "udp4", netip.MustParseAddrPort("0.0.0.0:9999"))
	w.sandbox.run(t, "iptables", "-t", "nat", "-A", "OUTPUT", "-d", "127.0.0.1", "-p", "tcp", "--dport", "7998", "-j", "DNAT", "--to-destination", "172.30.0.2:"+fmt.Sprint(tcpSrv.Port()))
	w.sandbox.run(t, "iptables", "-t", "nat", "-A", "OUTPUT", "-d", "127.0.0.1", "-p", "udp", "--dport", "7999", "-j", "DNAT", "--to-destination", "172.30.0.2:"+fmt.Sprint(udpSrv.Port()))
	w.sandbox.run(t, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "gnctr0", "-m", "addrtype", "--src-type", "LOCAL", "-j", "MASQUERADE")

	uhp := w.publish(t, "udp", hostIP4, netip.MustParseAddrPort("127.0.0.1:7999"))
	conn := w.clientConn(t, "udp", clientIP4, uhp)
	for i := range 3 {
		if seen := askUDP(t, conn, fmt.Sprint("datagram ", i)); seen != conn.LocalAddr().String() {
			t.Errorf("UDP through the redirect: the container saw %s, the client is %s", seen, conn.LocalAddr())
		}
	}
	hp := w.publish(t, "tcp", hostIP4, netip.MustParseAddrPort("127.0.0.1:7998"))
	seen, client := w.askTCP(t, clientIP4, hp)
	t.Logf("TCP through the redirect: client %s, the container saw %s", client, seen)
	if !strings.HasPrefix(seen, "172.30.0.1:") {
		t.Errorf("TCP through the redirect: the container saw %s, want the sandbox's 172.30.0.1 (masqueraded)", seen)
	}
}

// A client whose address lies in the sandbox's own subnets (10.0.2.2 is
// the gateway's inside) is never its own source there.
func TestSourceInSandboxSubnetNotKept(t *testing.T) {
	tp := newTransparency(func(fn func() error) error { return fn() }, discardLogger)
	tp.sandbox = []netip.Prefix{netip.MustParsePrefix("10.0.2.0/24"), netip.MustParsePrefix("fd00::/64")}
	for _, src := range []string{"10.0.2.2:40000", "[fd00::2]:40000"} {
		source := netip.MustParseAddrPort(src)
		target := netip.MustParseAddrPort("127.0.0.1:80")
		if source.Addr().Is6() {
			target = netip.MustParseAddrPort("[::1]:80")
		}
		var nt *errNotTransparent
		if err := tp.eligible("udp", target, source); !errors.As(err, &nt) || !strings.Contains(err.Error(), "sandbox's own subnet") {
			t.Errorf("client %s: %v; want it refused as inside the sandbox's subnet", src, err)
		}
	}
}
