package portfwd

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/sockaddr"
)

// The child's sockets. Each is created through the child's InNetNS hook, so
// that it belongs to the sandbox's network namespace even when the child
// itself lives in another one (--detach-netns); a socket stays in the
// namespace it was created in, so connecting and waiting happen on any
// thread, and a slow connect never holds the namespace's thread.

// socketOpts are what a dial's socket needs before it connects.
type socketOpts struct {
	typ int // unix.SOCK_STREAM or unix.SOCK_DGRAM
	// from, when valid, is the client address to connect from
	// (IP_TRANSPARENT, and for TCP the firewall mark; see transparent.go).
	from netip.AddrPort
}

// openSocket creates a non-blocking, close-on-exec socket of to's family in
// the namespace, prepared as o says, and the address to connect to.
func openSocket(inNS func(func() error) error, to netip.AddrPort, o socketOpts) (int, unix.Sockaddr, error) {
	fd := -1
	var sa unix.Sockaddr
	err := inNS(func() error {
		var err error
		if sa, err = sockaddr.Of(to); err != nil { // a zone names an interface of the namespace
			return err
		}
		family := unix.AF_INET
		if to.Addr().Is6() {
			family = unix.AF_INET6
		}
		if fd, err = unix.Socket(family, o.typ|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0); err != nil {
			return os.NewSyscallError("socket", err)
		}
		if o.from.IsValid() {
			err = prepareTransparent(fd, family, o)
		}
		return err
	})
	if err != nil {
		if fd >= 0 {
			unix.Close(fd)
		}
		return -1, nil, err
	}
	return fd, sa, nil
}

// prepareTransparent lets fd send from o.from, an address the namespace
// does not own, and binds it there.
func prepareTransparent(fd, family int, o socketOpts) error {
	level, opt := unix.SOL_IP, unix.IP_TRANSPARENT
	if family == unix.AF_INET6 {
		level, opt = unix.SOL_IPV6, unix.IPV6_TRANSPARENT
	}
	if err := unix.SetsockoptInt(fd, level, opt, 1); err != nil {
		return os.NewSyscallError("setsockopt IP_TRANSPARENT", err)
	}
	if o.typ == unix.SOCK_STREAM {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, transparentMark); err != nil {
			return os.NewSyscallError("setsockopt SO_MARK", err)
		}
	}
	// The client's address and port may be bound already: for TCP by an
	// earlier connection still in TIME_WAIT, for both by one from the same
	// client port to another published port. connect then fails only if
	// the whole 4-tuple is taken. For UDP this is safe too: the socket is
	// connected before any reply can come, and the kernel delivers a
	// datagram to the socket connected to its sender, never to one
	// connected elsewhere.
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		return os.NewSyscallError("setsockopt SO_REUSEADDR", err)
	}
	sa, err := sockaddr.Of(netip.AddrPortFrom(o.from.Addr().Unmap(), o.from.Port()))
	if err != nil {
		return err
	}
	if err := unix.Bind(fd, sa); err != nil {
		return os.NewSyscallError("bind", err)
	}
	return nil
}

// connectSocket connects fd (which it owns from now on, also on error) to
// sa, waiting until ctx ends or timeout passes, and returns it as a file
// registered with the runtime poller. sent, if not nil, runs once the
// connection request has left and before the wait; its error abandons the
// connection.
func connectSocket(ctx context.Context, fd int, sa unix.Sockaddr, timeout time.Duration, sent func() error) (*os.File, error) {
	err := unix.Connect(fd, sa)
	f := os.NewFile(uintptr(fd), "portfwd-socket") // non-blocking: pollable
	switch err {
	case nil:
		return f, nil
	case unix.EINPROGRESS, unix.EINTR: // EINTR: the connect goes on
	default:
		f.Close()
		return nil, os.NewSyscallError("connect", err)
	}
	if sent != nil {
		if err := sent(); err != nil {
			f.Close()
			return nil, err
		}
	}
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, err
	}
	deadline := time.Now().Add(timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	f.SetWriteDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { f.SetWriteDeadline(time.Unix(1, 0)) })
	var cerr error
	err = rc.Write(func(fd uintptr) bool {
		// Writable means done, one way or the other; SO_ERROR says which.
		// Not writable yet (the first call comes before any wait): still
		// connecting, as getpeername's ENOTCONN says.
		v, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ERROR)
		switch {
		case err != nil:
			cerr = err
		case v != 0:
			cerr = unix.Errno(v)
		default:
			if _, err := unix.Getpeername(int(fd)); err == unix.ENOTCONN {
				return false
			} else if err != nil {
				cerr = err
			}
		}
		return true
	})
	stop()
	if err == nil {
		err = cerr
	}
	if err != nil {
		f.Close()
		if errors.Is(err, os.ErrDeadlineExceeded) && ctx.Err() != nil {
			return nil, fmt.Errorf("connect: %w", ctx.Err())
		}
		return nil, os.NewSyscallError("connect", err)
	}
	f.SetWriteDeadline(time.Time{})
	return f, nil
}
