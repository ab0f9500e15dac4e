package route

import (
	"errors"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/tap"
)

// inNewNetns runs f on a goroutine whose OS thread has its own network
// namespace; the thread is never returned to Go's pool (it exits with the
// goroutine), so no other goroutine ever runs in that namespace.
func inNewNetns(t *testing.T, f func()) {
	t.Helper()
	if os.Getuid() != 0 {
		t.Fatal("this test creates a network namespace and needs root: run `make test` (as root)")
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread() // never unlocked: the thread dies with this goroutine
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			t.Errorf("unshare(CLONE_NEWNET): %v", err)
			return
		}
		f()
	}()
	<-done
}

// The rules and routes portfwd's child sets up for source-keeping, made
// in a namespace of the test's own with a TAP and default routes (so that
// anything not routed locally would leave through it), and checked with the
// kernel's own route lookups and with a socket's choice of source address.
func TestRoutingRulesAndLocalRoutes(t *testing.T) {
	inNewNetns(t, func() {
		dev, err := tap.Open(tap.Options{Name: "gtest2"})
		if err != nil {
			t.Error(err)
			return
		}
		defer dev.File.Close()
		if err := tap.Configure(tap.LinkConfig{
			Name: "gtest2", MTU: 1500,
			Address: netip.MustParsePrefix("10.0.9.100/24"), Gateway: netip.MustParseAddr("10.0.9.2"),
			Address6: netip.MustParsePrefix("fd00:9::100/64"), Gateway6: netip.MustParseAddr("fd00:9::2"),
		}); err != nil {
			t.Error(err)
			return
		}
		r, err := Open()
		if err != nil {
			t.Error(err)
			return
		}
		defer r.Close()

		client4, client6 := netip.MustParseAddr("198.18.0.2"), netip.MustParseAddr("2001:db8::2")
		const mark, tcpTable, udpTable = 0x676e0001, 0x676e0001, 0x676e0101
		isLocal := func(f Flow, want bool) {
			t.Helper()
			got, err := r.IsLocal(f)
			if err != nil {
				t.Errorf("IsLocal(%+v): %v", f, err)
			} else if got != want {
				t.Errorf("IsLocal(%+v) = %v, want %v", f, got, want)
			}
		}
		// The kernel installs an IPv6 address's local route from a work
		// queue, even without duplicate address detection.
		for i := 0; i < 200; i++ {
			if ok, _ := r.IsLocal(Flow{Dst: netip.MustParseAddr("fd00:9::100")}); ok {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		// The namespace's own addresses, and others.
		for _, a := range []string{"127.0.0.1", "127.0.0.2", "10.0.9.100", "::1", "fd00:9::100"} {
			isLocal(Flow{Dst: netip.MustParseAddr(a)}, true)
		}
		for _, a := range []netip.Addr{client4, client6, netip.MustParseAddr("10.0.9.2")} {
			isLocal(Flow{Dst: a}, false)
		}
		isLocal(Flow{Dst: netip.MustParseAddr("::ffff:127.0.0.1")}, true) // unmapped

		// TCP: everything marked is local.
		var added []func() error
		for _, rt := range []LocalRoute{
			{Table: tcpTable, Dst: netip.MustParsePrefix("0.0.0.0/0")},
			{Table: tcpTable, Dst: netip.MustParsePrefix("::/0")},
		} {
			if err := r.AddLocalRoute(rt); err != nil {
				t.Error(err)
			}
			added = append(added, func() error { return r.DelLocalRoute(rt) })
		}
		for _, v6 := range []bool{false, true} {
			ru := Rule{IPv6: v6, Priority: 100, Table: tcpTable, Mark: mark}
			if err := r.AddRule(ru); err != nil {
				t.Error(err)
			}
			if err := r.AddRule(ru); !errors.Is(err, fs.ErrExist) {
				t.Errorf("adding %s twice: %v, want fs.ErrExist", ru, err)
			}
			added = append(added, func() error { return r.DelRule(ru) })
		}
		isLocal(Flow{Dst: client4, Mark: mark}, true)
		isLocal(Flow{Dst: client6, Mark: mark}, true)
		isLocal(Flow{Dst: client4, Mark: mark + 1}, false)
		isLocal(Flow{Dst: client4}, false)

		// UDP: replies from one port to one client, with the right source.
		for _, x := range []struct {
			ru Rule
			rt LocalRoute
		}{
			{Rule{Priority: 101, Table: udpTable, IPProto: unix.IPPROTO_UDP, SPort: 5353},
				LocalRoute{Table: udpTable, Dst: netip.PrefixFrom(client4, 32), Src: netip.MustParseAddr("127.0.0.1")}},
			{Rule{IPv6: true, Priority: 101, Table: udpTable, IPProto: unix.IPPROTO_UDP, SPort: 5353},
				LocalRoute{Table: udpTable, Dst: netip.PrefixFrom(client6, 128), Src: netip.MustParseAddr("::1")}},
		} {
			if err := r.AddRule(x.ru); err != nil {
				t.Error(err)
			}
			if err := r.AddLocalRoute(x.rt); err != nil {
				t.Error(err)
			}
			if err := r.AddLocalRoute(x.rt); !errors.Is(err, fs.ErrExist) {
				t.Errorf("adding %s twice: %v, want fs.ErrExist", x.rt, err)
			}
			added = append(added, func() error { return r.DelRule(x.ru) }, func() error { return r.DelLocalRoute(x.rt) })
		}
		for _, c := range []netip.Addr{client4, client6} {
			isLocal(Flow{Dst: c, IPProto: unix.IPPROTO_UDP, SPort: 5353}, true)
			isLocal(Flow{Dst: c, IPProto: unix.IPPROTO_UDP, SPort: 5354}, false)
			isLocal(Flow{Dst: c, IPProto: unix.IPPROTO_TCP, SPort: 5353}, false)
		}
		isLocal(Flow{Dst: netip.MustParseAddr("198.18.0.3"), IPProto: unix.IPPROTO_UDP, SPort: 5353}, false)

		// Forwarded UDP (arriving on gtest2, say from a container behind
		// it) to the client, from any port: local; what this host sends
		// itself skips the rule (iif lo goto, nop).
		const fwdTable = 0x676e00ff
		tapIndex := 0
		if ifi, err := net.InterfaceByName("gtest2"); err == nil {
			tapIndex = ifi.Index
		} else {
			t.Error(err)
		}
		for _, v6 := range []bool{false, true} {
			client, from := client4, netip.MustParseAddr("10.0.9.7")
			if v6 {
				client, from = client6, netip.MustParseAddr("fd00:9::7")
			}
			rules := []Rule{
				{IPv6: v6, Priority: 102, IIf: "lo", Goto: 104},
				{IPv6: v6, Priority: 103, IPProto: unix.IPPROTO_UDP, Table: fwdTable},
				{IPv6: v6, Priority: 104, Nop: true},
			}
			for _, ru := range rules {
				if err := r.AddRule(ru); err != nil {
					t.Error(err)
				}
				added = append(added, func() error { return r.DelRule(ru) })
			}
			rt := LocalRoute{Table: fwdTable, Dst: netip.PrefixFrom(client, client.BitLen())}
			if err := r.AddLocalRoute(rt); err != nil {
				t.Error(err)
			}
			added = append(added, func() error { return r.DelLocalRoute(rt) })
			isLocal(Flow{Dst: client, Src: from, IIf: tapIndex, IPProto: unix.IPPROTO_UDP, SPort: 9999}, true)
			isLocal(Flow{Dst: client, Src: from, IIf: tapIndex, IPProto: unix.IPPROTO_TCP, SPort: 9999}, false)
			isLocal(Flow{Dst: client, IPProto: unix.IPPROTO_UDP, SPort: 9999}, false)
		}

		// A socket on the wildcard address that "connects" to the client
		// from port 5353 gets the route's source, as a server's reply
		// would; from another port it goes out by the TAP.
		for _, c := range []struct {
			network, laddr, raddr, want string
		}{
			{"udp4", "0.0.0.0:5353", "198.18.0.2:40000", "127.0.0.1"},
			{"udp4", "0.0.0.0:5354", "198.18.0.2:40000", "10.0.9.100"},
			{"udp6", "[::]:5353", "[2001:db8::2]:40000", "::1"},
		} {
			la, _ := net.ResolveUDPAddr(c.network, c.laddr)
			ra, _ := net.ResolveUDPAddr(c.network, c.raddr)
			conn, err := net.DialUDP(c.network, la, ra)
			if err != nil {
				t.Errorf("%s -> %s: %v", c.laddr, c.raddr, err)
				continue
			}
			if got := conn.LocalAddr().(*net.UDPAddr).AddrPort().Addr().String(); got != c.want {
				t.Errorf("%s -> %s: source %s, want %s", c.laddr, c.raddr, got, c.want)
			}
			conn.Close()
		}

		for i := len(added) - 1; i >= 0; i-- {
			if err := added[i](); err != nil {
				t.Error(err)
			}
		}
		isLocal(Flow{Dst: client4, Mark: mark}, false)
		isLocal(Flow{Dst: client6, IPProto: unix.IPPROTO_UDP, SPort: 5353}, false)
		if err := r.DelRule(Rule{Priority: 100, Table: tcpTable, Mark: mark}); !errors.Is(err, unix.ENOENT) {
			t.Errorf("deleting a missing rule: %v, want ENOENT", err)
		}
		if err := r.DelLocalRoute(LocalRoute{Table: udpTable, Dst: netip.PrefixFrom(client4, 32)}); !errors.Is(err, unix.ESRCH) {
			t.Errorf("deleting a missing route: %v, want ESRCH", err)
		}
	})
}
