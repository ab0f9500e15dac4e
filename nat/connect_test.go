package nat

import (
	"net"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"
)

// connect reaches an IPv4 and an IPv6 listener at the port given (the
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
				if err := connect(fd, to); err != nil {
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
				t.Errorf("connect allocated %.1f objects; want 0", allocs)
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
	if err := connect(fd, netip.AddrPortFrom(to.Addr().Unmap(), to.Port())); err != unix.ECONNREFUSED {
		t.Errorf("connect to %v, where nothing listens: %v; want ECONNREFUSED", to, err)
	}
}
