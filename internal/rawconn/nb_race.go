//go:build race

package rawconn

import (
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// BigIO: see nb.go.
const BigIO = 32 << 10

// With the race detector, the announced calls, which tell it what the
// kernel read and wrote (nb.go has the unannounced ones).

func Readv(fd int, bufs [][]byte) (int, error)  { return unix.Readv(fd, bufs) }
func Writev(fd int, bufs [][]byte) (int, error) { return unix.Writev(fd, bufs) }
func ReadFD(fd int, b []byte) (int, error)      { return unix.Read(fd, b) }
func EpollPoll(epfd int, events []unix.EpollEvent) (int, error) {
	return unix.EpollWait(epfd, events, 0)
}

func EpollWaitBrief(epfd int, events []unix.EpollEvent, timeout time.Duration) (int, error) {
	ts := unix.NsecToTimespec(int64(timeout))
	n, _, e := unix.Syscall6(unix.SYS_EPOLL_PWAIT2, uintptr(epfd), uintptr(unsafe.Pointer(&events[0])), uintptr(len(events)), uintptr(unsafe.Pointer(&ts)), 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

func Recvmsg(fd int, bufs [][]byte, name []byte, flags int) (n, nameLen, msgFlags int, err error) {
	msg := msghdr(iovecs(nil, bufs), name)
	r, _, e := unix.Syscall(unix.SYS_RECVMSG, uintptr(fd), uintptr(unsafe.Pointer(&msg)), uintptr(flags))
	if e != 0 {
		return 0, 0, 0, e
	}
	return int(r), int(msg.Namelen), int(msg.Flags), nil
}

func recvmmsg(fd int, hdrs *unix.Mmsghdr, n int) (int, error) {
	r, _, e := unix.Syscall6(unix.SYS_RECVMMSG, uintptr(fd), uintptr(unsafe.Pointer(hdrs)), uintptr(n), unix.MSG_DONTWAIT, 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(r), nil
}

func Discard(fd int, n int) (int, error) {
	r, _, e := unix.Syscall6(unix.SYS_RECVFROM, uintptr(fd), 0, uintptr(n), unix.MSG_TRUNC|unix.MSG_DONTWAIT, 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(r), nil
}

func SendTo(fd int, bufs [][]byte, name []byte, flags int) (int, error) {
	msg := msghdr(iovecs(nil, bufs), name)
	n, _, e := unix.Syscall(unix.SYS_SENDMSG, uintptr(fd), uintptr(unsafe.Pointer(&msg)), uintptr(flags))
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

func Send(fd int, bufs [][]byte, flags int) (int, error) {
	return unix.SendmsgBuffers(fd, bufs, nil, nil, flags)
}
