// Package rawconn runs system calls on descriptors that Go's poller
// watches (non-blocking sockets, the TAP): the call is tried at once and,
// when the descriptor is not ready (EAGAIN), retried after the poller says
// it is. This is the one place that rule, and the retry on EINTR, live.
package rawconn

import (
	"errors"
	"syscall"

	"golang.org/x/sys/unix"
)

// Op is one system call on fd, returning a count and an error
// (EAGAIN: not ready yet).
type Op func(fd int) (int, error)

// Read runs op until the descriptor behind rc is readable enough for it
// to succeed or fail for another reason than EAGAIN, and returns op's
// result. An error of the poller (the descriptor was closed, a deadline
// passed) is returned as it is.
func Read(rc syscall.RawConn, op Op) (int, error) {
	var n int
	var opErr error
	err := rc.Read(func(fd uintptr) bool {
		n, opErr = retryEINTR(int(fd), op)
		return !errors.Is(opErr, syscall.EAGAIN)
	})
	if err != nil {
		return 0, err
	}
	return n, opErr
}

// Write is Read for writing: op is retried when the descriptor becomes
// writable.
func Write(rc syscall.RawConn, op Op) (int, error) {
	var n int
	var opErr error
	err := rc.Write(func(fd uintptr) bool {
		n, opErr = retryEINTR(int(fd), op)
		return !errors.Is(opErr, syscall.EAGAIN)
	})
	if err != nil {
		return 0, err
	}
	return n, opErr
}

// FD returns the descriptor behind rc, for calls that do not wait (an
// ioctl, a setsockopt). It is valid while the file stays open, which the
// caller guarantees.
func FD(rc syscall.RawConn) (int, error) {
	fd := -1
	if err := rc.Control(func(f uintptr) { fd = int(f) }); err != nil {
		return -1, err
	}
	return fd, nil
}

func retryEINTR(fd int, op Op) (int, error) {
	for {
		n, err := op(fd)
		if err != syscall.EINTR {
			return n, err
		}
	}
}

var zero byte

func iovecs(iov []unix.Iovec, bufs [][]byte) []unix.Iovec {
	for _, b := range bufs {
		v := unix.Iovec{Base: &zero}
		if len(b) > 0 {
			v.Base = &b[0]
		}
		v.SetLen(len(b))
		iov = append(iov, v)
	}
	return iov
}

func msghdr(iov []unix.Iovec, name []byte) unix.Msghdr {
	var msg unix.Msghdr
	if len(iov) > 0 {
		msg.Iov = &iov[0]
		msg.SetIovlen(len(iov))
	}
	if len(name) > 0 {
		msg.Name = &name[0]
		msg.Namelen = uint32(len(name))
	}
	return msg
}
