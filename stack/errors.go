package stack

import (
	"io"
	"syscall"

	"gvisor.dev/gvisor/pkg/tcpip"
)

// Err converts a gVisor tcpip.Error into a Go error that callers can test
// with errors.Is: syscall errnos for the conditions that have one (so that
// errors.Is(err, syscall.ECONNRESET) works as with kernel sockets), io.EOF
// for an orderly end of stream, nil for nil. This is the one place where
// gVisor errors are translated.
func Err(e tcpip.Error) error {
	if e == nil {
		return nil
	}
	switch e.(type) {
	case *tcpip.ErrClosedForReceive:
		return io.EOF
	case *tcpip.ErrConnectionReset:
		return syscall.ECONNRESET
	case *tcpip.ErrConnectionAborted, *tcpip.ErrAborted:
		return syscall.ECONNABORTED
	case *tcpip.ErrConnectionRefused:
		return syscall.ECONNREFUSED
	case *tcpip.ErrClosedForSend:
		return syscall.EPIPE
	case *tcpip.ErrTimeout:
		return syscall.ETIMEDOUT
	case *tcpip.ErrWouldBlock:
		return syscall.EAGAIN
	case *tcpip.ErrPortInUse, *tcpip.ErrDuplicateAddress:
		return syscall.EADDRINUSE
	case *tcpip.ErrBadLocalAddress:
		return syscall.EADDRNOTAVAIL
	case *tcpip.ErrHostUnreachable:
		return syscall.EHOSTUNREACH
	case *tcpip.ErrNetworkUnreachable:
		return syscall.ENETUNREACH
	case *tcpip.ErrNotConnected:
		return syscall.ENOTCONN
	case *tcpip.ErrAlreadyConnected:
		return syscall.EISCONN
	case *tcpip.ErrMessageTooLong:
		return syscall.EMSGSIZE
	case *tcpip.ErrInvalidEndpointState:
		return syscall.EINVAL
	case *tcpip.ErrNoBufferSpace:
		return syscall.ENOBUFS
	case *tcpip.ErrNotPermitted:
		return syscall.EPERM
	case *tcpip.ErrBadAddress:
		return syscall.EFAULT
	case *tcpip.ErrUnknownProtocol, *tcpip.ErrUnknownProtocolOption:
		return syscall.ENOPROTOOPT
	}
	return &tcpipError{e}
}

// tcpipError carries a gVisor error with no errno equivalent.
type tcpipError struct{ e tcpip.Error }

func (t *tcpipError) Error() string { return "netstack: " + t.e.String() }
