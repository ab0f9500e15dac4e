package sockaddr

import (
	"net"
	"net/netip"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// Connect reaches an IPv4 and an IPv6 listener at the port given (the
// port in network order, the family's own address layout), and allocates
// nothing doing so.
func TestConnect(t *testing.T) {
	for _, tc := range []struct {
		network string
		family  int
		addr    string
	}{
		{"tcp4", unix.AF_INET, "127.0.0.1:0"},
		{"tcp6", unix.AF_INET6, "[::1]:0"},
	} {
		t.Run(tc.network, func(t *testing.T) {
			l, err := net.Listen(tc.network, tc.addr)
			if err != nil {
				t.Fatalf("listen on %s: %v (the test needs %s loopback)", tc.addr, err, tc.network)
			}
			defer l.Close()
			to := l.Addr().(*net.TCPAddr).AddrPort()
			to = netip.AddrPortFrom(to.Addr().Unmap(), to.Port())
			dial := func() int {
				fd, err := unix.Socket(tc.family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
				if err != nil {
					t.Fatal(err)
				}
				if err := Connect(fd, to); err != nil {
					unix.Close(fd)
					t.Fatalf("connect to %v: %v", to, err)
				}
				return fd
			}
			fd := dial()
			defer unix.Close(fd)
			c, err := l.Accept()
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			sa, err := unix.Getsockname(fd)
			if err != nil {
				t.Fatal(err)
			}
			var local netip.AddrPort
			switch sa := sa.(type) {
			case *unix.SockaddrInet4:
				local = netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
			case *unix.SockaddrInet6:
				local = netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port))
			}
			if peer := c.RemoteAddr().(*net.TCPAddr).AddrPort(); netip.AddrPortFrom(peer.Addr().Unmap(), peer.Port()) != local {
				t.Errorf("the listener accepted %v; the socket connected is %v", peer, local)
			}
			allocs := testing.AllocsPerRun(20, func() {
				fd := dial()
				unix.Close(fd)
			})
			if allocs != 0 {
				t.Errorf("Connect allocated %.1f objects; want 0", allocs)
			}
		})
	}
}

// A port where nothing listens is refused with the kernel's own error.
func TestConnectRefused(t *testing.T) {
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	to := l.Addr().(*net.TCPAddr).AddrPort()
	l.Close()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := Connect(fd, netip.AddrPortFrom(to.Addr().Unmap(), to.Port())); err != unix.ECONNREFUSED {
		t.Errorf("connect to %v, where nothing listens: %v; want ECONNREFUSED", to, err)
	}
}

// Of keeps the family, the port and the zone, by index or by name; a zone
// naming no interface is an error that says so.
func TestOf(t *testing.T) {
	lo, err := net.InterfaceByName("lo")
	if err != nil {
		t.Fatalf("the test names the loopback interface lo: %v", err)
	}
	for _, tc := range []struct {
		in   string
		want unix.Sockaddr
		err  string
	}{
		{in: "127.0.0.1:8080", want: &unix.SockaddrInet4{Port: 8080, Addr: [4]byte{127, 0, 0, 1}}},
		{in: "0.0.0.0:0", want: &unix.SockaddrInet4{}},
		{in: "[::1]:53", want: &unix.SockaddrInet6{Port: 53, Addr: netip.IPv6Loopback().As16()}},
		{in: "[fe80::1%7]:1", want: &unix.SockaddrInet6{Port: 1, Addr: netip.MustParseAddr("fe80::1").As16(), ZoneId: 7}},
		{in: "[fe80::1%lo]:1", want: &unix.SockaddrInet6{Port: 1, Addr: netip.MustParseAddr("fe80::1").As16(), ZoneId: uint32(lo.Index)}},
		{in: "[fe80::1%nosuch0]:1", err: "the zone of fe80::1%nosuch0 names no interface here"},
	} {
		got, err := Of(netip.MustParseAddrPort(tc.in))
		switch {
		case tc.err != "":
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("Of(%s): %v, %v; want the error %q", tc.in, got, err, tc.err)
			}
		case err != nil:
			t.Errorf("Of(%s): %v", tc.in, err)
		default:
			switch w := tc.want.(type) {
			case *unix.SockaddrInet4:
				if g, ok := got.(*unix.SockaddrInet4); !ok || g.Port != w.Port || g.Addr != w.Addr {
					t.Errorf("Of(%s) = %#v; want %#v", tc.in, got, w)
				}
			case *unix.SockaddrInet6:
				if g, ok := got.(*unix.SockaddrInet6); !ok || g.Port != w.Port || g.Addr != w.Addr || g.ZoneId != w.ZoneId {
					t.Errorf("Of(%s) = %#v; want %#v", tc.in, got, w)
				}
			}
		}
	}
}

// Connect turns an unknown zone into Of's error before any system call.
func TestConnectUnknownZone(t *testing.T) {
	fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("an IPv6 socket: %v (the test needs IPv6)", err)
	}
	defer unix.Close(fd)
	if err := Connect(fd, netip.MustParseAddrPort("[fe80::1%nosuch0]:1")); err == nil || !strings.Contains(err.Error(), "names no interface here") {
		t.Errorf("Connect to a zone naming no interface: %v; want the zone's error", err)
	}
}
