// Package sockaddr turns a netip.AddrPort into the address a socket
// system call takes: one rule for the family, the port's byte order and
// an IPv6 zone, for the NAT's host sockets and the published ports'.
package sockaddr

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Of returns ap as a unix.Sockaddr for bind, connect or sendto. An IPv6
// zone, an interface's index or name, becomes the scope id; a name is
// looked up in the caller's network namespace.
func Of(ap netip.AddrPort) (unix.Sockaddr, error) {
	a := ap.Addr()
	if a.Is4() {
		return &unix.SockaddrInet4{Port: int(ap.Port()), Addr: a.As4()}, nil
	}
	id, err := zoneID(a)
	if err != nil {
		return nil, err
	}
	return &unix.SockaddrInet6{Port: int(ap.Port()), Addr: a.As16(), ZoneId: id}, nil
}

// Connect starts fd's connect to ap. It is unix.Connect without the
// allocation of its address (an interface, so it escapes), which was one
// of the objects each new connection of the sandbox cost. A connect
// interrupted by a signal goes on without the call, as after EINPROGRESS
// (Go's net package takes it so too), and is reported as EINPROGRESS; a
// datagram socket's connect does not block, so it is never interrupted.
func Connect(fd int, ap netip.AddrPort) error {
	var (
		sa4 unix.RawSockaddrInet4
		sa6 unix.RawSockaddrInet6
		sa  unsafe.Pointer
		n   uintptr
	)
	a := ap.Addr()
	if a.Is4() {
		sa4.Family, sa4.Addr = unix.AF_INET, a.As4()
		binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&sa4.Port))[:], ap.Port())
		sa, n = unsafe.Pointer(&sa4), unix.SizeofSockaddrInet4
	} else {
		id, err := zoneID(a)
		if err != nil {
			return err
		}
		sa6.Family, sa6.Addr, sa6.Scope_id = unix.AF_INET6, a.As16(), id
		binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&sa6.Port))[:], ap.Port())
		sa, n = unsafe.Pointer(&sa6), unix.SizeofSockaddrInet6
	}
	_, _, errno := unix.Syscall(unix.SYS_CONNECT, uintptr(fd), uintptr(sa), n)
	switch errno {
	case 0:
		return nil
	case unix.EINTR:
		return unix.EINPROGRESS
	}
	return errno
}

// Raw returns ap as the bytes of a struct sockaddr_in or sockaddr_in6,
// for a system call's address argument (rawconn.SendTo).
func Raw(ap netip.AddrPort) ([]byte, error) {
	a := ap.Addr()
	if a.Is4() {
		b := make([]byte, unix.SizeofSockaddrInet4)
		sa := (*unix.RawSockaddrInet4)(unsafe.Pointer(&b[0]))
		sa.Family, sa.Addr = unix.AF_INET, a.As4()
		binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:], ap.Port())
		return b, nil
	}
	id, err := zoneID(a)
	if err != nil {
		return nil, err
	}
	b := make([]byte, unix.SizeofSockaddrInet6)
	sa := (*unix.RawSockaddrInet6)(unsafe.Pointer(&b[0]))
	sa.Family, sa.Addr, sa.Scope_id = unix.AF_INET6, a.As16(), id
	binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:], ap.Port())
	return b, nil
}

// Parse reads the address a system call wrote into b (a sockaddr_in or
// sockaddr_in6, of length n); false for another family or a short one. An
// IPv4-mapped IPv6 address is returned as IPv4; a zone is not kept.
func Parse(b []byte, n int) (netip.AddrPort, bool) {
	if n < 2 || n > len(b) {
		return netip.AddrPort{}, false
	}
	port := func(p []byte) uint16 { return binary.BigEndian.Uint16(p) }
	switch binary.NativeEndian.Uint16(b) {
	case unix.AF_INET:
		if n < unix.SizeofSockaddrInet4 {
			return netip.AddrPort{}, false
		}
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[4:8])), port(b[2:4])), true
	case unix.AF_INET6:
		if n < unix.SizeofSockaddrInet6 {
			return netip.AddrPort{}, false
		}
		return netip.AddrPortFrom(netip.AddrFrom16([16]byte(b[8:24])).Unmap(), port(b[2:4])), true
	}
	return netip.AddrPort{}, false
}

// zoneID is the scope id of a's zone: 0 without one.
func zoneID(a netip.Addr) (uint32, error) {
	z := a.Zone()
	if z == "" {
		return 0, nil
	}
	if n, err := strconv.ParseUint(z, 10, 32); err == nil {
		return uint32(n), nil
	}
	ifi, err := net.InterfaceByName(z)
	if err != nil {
		return 0, fmt.Errorf("the zone of %s names no interface here: %w", a, err)
	}
	return uint32(ifi.Index), nil
}
