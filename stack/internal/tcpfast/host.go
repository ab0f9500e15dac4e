package tcpfast

import (
	"errors"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/rawconn"
)

// The host socket's side of a connection: what the sandbox sends is
// written to it; what the host sends stays in its receive queue, read
// with MSG_PEEK, until the sandbox acknowledges it and it is dropped
// (MSG_TRUNC). The kernel's SO_PEEK_OFF (TCP since Linux 6.10) makes each
// peek start after what the previous ones returned; without it, a peek
// reads past the bytes already sent into a scratch buffer.

// discardBuf receives the bytes a peek without SO_PEEK_OFF reads again.
// Its contents are never looked at, so the goroutines may share it.
var discardBuf = make([]byte, 64<<10)

// enablePeekOff turns SO_PEEK_OFF on for fd at offset 0; false if the
// kernel does not have it for TCP.
func enablePeekOff(fd int) bool {
	return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PEEK_OFF, 0) == nil
}

// oobInline keeps the host's urgent byte (MSG_OOB) in the stream, where
// a peek returns it and a MSG_TRUNC read drops it like any other: the
// engine counts the socket's bytes one for one as sequence numbers.
// Otherwise a peek skips that byte while the peek offset lags one behind
// it, so the last byte went to the sandbox twice and the drop of the
// acknowledged bytes came up one short (found it empty: a reset).
func oobInline(fd int) {
	unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_OOBINLINE, 1)
}

// setPeekOff moves the socket's peek offset (with SO_PEEK_OFF on).
func setPeekOff(fd int, off uint32) error {
	return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PEEK_OFF, int(off))
}

// peek reads up to len(b) bytes of the receive queue, from offset skip on,
// without taking them out. peekOff says whether the socket's own peek
// offset is at skip already. It returns 0, nil at the end of the stream
// (the host's FIN), and EAGAIN when nothing new has arrived.
func peek(fd int, b []byte, skip uint32, peekOff bool) (int, error) {
	if peekOff || skip == 0 {
		var iov [1][]byte
		iov[0] = b
		n, _, _, err := rawconn.Recvmsg(fd, iov[:], nil, unix.MSG_PEEK|unix.MSG_DONTWAIT)
		return n, err
	}
	var arr [rawconnMaxIov][]byte
	iov := arr[:0]
	left := int(skip)
	for left > 0 && len(iov) < len(arr)-1 {
		n := min(left, len(discardBuf))
		iov = append(iov, discardBuf[:n])
		left -= n
	}
	if left > 0 {
		return 0, errTooFarAhead
	}
	iov = append(iov, b)
	n, err := recvMany(fd, iov, unix.MSG_PEEK|unix.MSG_DONTWAIT)
	if err != nil {
		return 0, err
	}
	if n <= int(skip) {
		if n == 0 {
			return 0, nil // nothing left at all: the host's FIN
		}
		return 0, unix.EAGAIN // only what was sent already
	}
	return n - int(skip), nil
}

// rawconnMaxIov bounds the scratch vectors of a peek without SO_PEEK_OFF:
// 64 × 64 KiB reaches 4 MiB past the acknowledged bytes, more than the
// windows a sandbox advertises by default.
const rawconnMaxIov = 65

var errTooFarAhead = errors.New("tcpfast: more unacknowledged data than a peek without SO_PEEK_OFF can skip")

// recvMany is recvmsg with any number of buffers (rawconn.Recv keeps eight
// on its stack).
func recvMany(fd int, bufs [][]byte, flags int) (int, error) {
	n, _, _, _, err := unix.RecvmsgBuffers(fd, bufs, nil, flags)
	return n, err
}

// consume drops n acknowledged bytes from the front of the receive queue.
func consume(fd int, n uint32) error {
	for n > 0 {
		m, err := rawconn.Discard(fd, int(min(n, 1<<30)))
		if err != nil {
			return err
		}
		if m == 0 {
			return nil // the FIN: nothing more to drop
		}
		n -= uint32(m)
	}
	return nil
}

// sendRoom is how many bytes the socket's send buffer has room for now,
// in the kernel's own accounting of memory (which counts a buffer's
// overhead too, so the bytes it takes are at least as many).
func sendRoom(fd int) (room, sndbuf int, err error) {
	var mi [unix.SK_MEMINFO_VARS]uint32
	l := uint32(unsafe.Sizeof(mi))
	_, _, e := syscall.RawSyscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_MEMINFO,
		uintptr(unsafe.Pointer(&mi[0])), uintptr(unsafe.Pointer(&l)), 0)
	if e != 0 {
		return 0, 0, e
	}
	sndbuf = int(mi[unix.SK_MEMINFO_SNDBUF])
	return max(sndbuf-int(mi[unix.SK_MEMINFO_WMEM_QUEUED]), 0), sndbuf, nil
}

// socketError returns and clears the socket's pending error.
func socketError(fd int) error {
	v, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
	if err != nil {
		return err
	}
	if v != 0 {
		return syscall.Errno(v)
	}
	return nil
}

// connected reports whether a non-blocking connect on fd has finished,
// and whether it failed (see connectDone), without waiting.
func connected(fd int) (done, failed bool) {
	pfd := [1]unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
	n, _, e := syscall.RawSyscall(unix.SYS_POLL, uintptr(unsafe.Pointer(&pfd[0])), 1, 0)
	if e != 0 || n != 1 || pfd[0].Revents == 0 {
		return false, false
	}
	return true, pfd[0].Revents&(unix.POLLERR|unix.POLLHUP|unix.POLLNVAL) != 0
}

// abortClose closes fd so that its peer sees a reset.
func abortClose(fd int) {
	resetOnClose(fd, true)
	unix.Close(fd)
}

// resetOnClose makes the close of fd, whoever closes it (the kernel, when
// the process dies), end its connection with a reset while on (SO_LINGER
// 0), with its queued bytes and a FIN once off.
func resetOnClose(fd int, on bool) {
	l := unix.Linger{}
	if on {
		l.Onoff = 1
	}
	unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &l)
}
