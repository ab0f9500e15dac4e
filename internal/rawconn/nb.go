//go:build !race

package rawconn

import (
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The system calls below are for descriptors in non-blocking mode: they
// return at once (EAGAIN when not ready) and so are made with
// syscall.RawSyscall, as gVisor's rawfile package does for the same
// reason, instead of telling the scheduler they may block. Telling it
// costs more than the call on this path: the runtime's monitor thread,
// asleep whenever the only P is idle (between two packets of a
// request/response exchange), is woken by the first announced system call
// with a futex wake on the other CPU, 5-17 µs each in a traced
// round trip here, twice per 1-byte round trip. The race detector's build
// uses the announced calls of x/sys/unix, which tell it about the buffers.

// maxStackIovecs is how many buffers an I/O vector holds without
// allocating.
const maxStackIovecs = 8

// BigIO is the size from which Writev announces its call after all: a
// call that copies this much takes long enough for the runtime to hand
// the P to another thread meanwhile, which is what keeps a bulk transfer
// reading the TAP while the kernel copies a batch into a host socket.
// Unannounced, sandbox -> host at MTU 65520 fell from 7.9 to 6.3 Gbit/s
// (medians of 4 interleaved iperf3 runs); small messages, where the
// monitor thread's wake-up costs more than the call, stay unannounced.
const BigIO = 32 << 10

// Readv reads into bufs from the non-blocking descriptor fd.
func Readv(fd int, bufs [][]byte) (int, error) {
	var arr [maxStackIovecs]unix.Iovec
	iov := iovecs(arr[:0], bufs)
	var p unsafe.Pointer
	if len(iov) > 0 {
		p = unsafe.Pointer(&iov[0])
	}
	n, _, e := syscall.RawSyscall(unix.SYS_READV, uintptr(fd), uintptr(p), uintptr(len(iov)))
	return result(n, e)
}

// Writev writes bufs to the non-blocking descriptor fd.
func Writev(fd int, bufs [][]byte) (int, error) {
	total := 0
	for _, b := range bufs {
		total += len(b)
	}
	if total >= BigIO {
		return unix.Writev(fd, bufs)
	}
	var arr [maxStackIovecs]unix.Iovec
	iov := iovecs(arr[:0], bufs)
	var p unsafe.Pointer
	if len(iov) > 0 {
		p = unsafe.Pointer(&iov[0])
	}
	n, _, e := syscall.RawSyscall(unix.SYS_WRITEV, uintptr(fd), uintptr(p), uintptr(len(iov)))
	return result(n, e)
}

// ReadFD reads into b from the non-blocking descriptor fd.
func ReadFD(fd int, b []byte) (int, error) {
	var p unsafe.Pointer
	if len(b) > 0 {
		p = unsafe.Pointer(&b[0])
	}
	n, _, e := syscall.RawSyscall(unix.SYS_READ, uintptr(fd), uintptr(p), uintptr(len(b)))
	return result(n, e)
}

// Send sends bufs on the non-blocking socket fd with sendmsg's flags
// (MSG_NOSIGNAL...). Like Writev, a large send announces its call.
func Send(fd int, bufs [][]byte, flags int) (int, error) {
	var arr [maxStackIovecs]unix.Iovec
	msg := msghdr(iovecs(arr[:0], bufs), nil)
	total := 0
	for _, b := range bufs {
		total += len(b)
	}
	call := syscall.RawSyscall
	if total >= BigIO {
		call = syscall.Syscall
	}
	n, _, e := call(unix.SYS_SENDMSG, uintptr(fd), uintptr(unsafe.Pointer(&msg)), uintptr(flags))
	return result(n, e)
}

// SendTo is Send of one datagram to name, a raw socket address
// (sockaddr.Raw).
func SendTo(fd int, bufs [][]byte, name []byte, flags int) (int, error) {
	var arr [maxStackIovecs]unix.Iovec
	msg := msghdr(iovecs(arr[:0], bufs), name)
	n, _, e := syscall.Syscall(unix.SYS_SENDMSG, uintptr(fd), uintptr(unsafe.Pointer(&msg)), uintptr(flags))
	return result(n, e)
}

// Discard drops up to n bytes from the front of the non-blocking stream
// socket fd's receive queue without copying them (MSG_TRUNC).
func Discard(fd int, n int) (int, error) {
	r, _, e := syscall.RawSyscall6(unix.SYS_RECVFROM, uintptr(fd), 0, uintptr(n), unix.MSG_TRUNC|unix.MSG_DONTWAIT, 0, 0)
	return result(r, e)
}

// recvmmsg receives up to n messages into hdrs[:n] from the
// non-blocking socket fd (ReadBatch).
func recvmmsg(fd int, hdrs *unix.Mmsghdr, n int) (int, error) {
	r, _, e := syscall.RawSyscall6(unix.SYS_RECVMMSG, uintptr(fd), uintptr(unsafe.Pointer(hdrs)), uintptr(n), unix.MSG_DONTWAIT, 0, 0)
	return result(r, e)
}

// EpollPoll returns the events of the epoll set epfd that are ready now,
// without waiting (epoll_wait with a timeout of 0).
func EpollPoll(epfd int, events []unix.EpollEvent) (int, error) {
	if len(events) == 0 {
		return 0, nil
	}
	n, _, e := syscall.RawSyscall6(unix.SYS_EPOLL_WAIT, uintptr(epfd), uintptr(unsafe.Pointer(&events[0])), uintptr(len(events)), 0, 0, 0)
	return result(n, e)
}

// EpollWaitBrief waits up to timeout (which must be short: see
// epoll.Set.WaitBrief) for events of the epoll set epfd, with
// epoll_pwait2, unannounced: the thread keeps its P and the runtime's
// monitor is not woken. A signal (the runtime's preemption) ends the wait
// with EINTR. ENOSYS before Linux 5.11.
func EpollWaitBrief(epfd int, events []unix.EpollEvent, timeout time.Duration) (int, error) {
	ts := unix.NsecToTimespec(int64(timeout))
	n, _, e := syscall.RawSyscall6(unix.SYS_EPOLL_PWAIT2, uintptr(epfd), uintptr(unsafe.Pointer(&events[0])), uintptr(len(events)), uintptr(unsafe.Pointer(&ts)), 0, 0)
	return result(n, e)
}

// Recvmsg reads one message into bufs from the socket fd (with
// MSG_DONTWAIT in flags, whatever the descriptor's mode), and the sender's
// address into name (which may be empty). It returns the length read,
// the address's length and the message's flags (MSG_TRUNC, ...).
func Recvmsg(fd int, bufs [][]byte, name []byte, flags int) (n, nameLen, msgFlags int, err error) {
	var arr [maxStackIovecs]unix.Iovec
	msg := msghdr(iovecs(arr[:0], bufs), name)
	r, _, e := syscall.RawSyscall(unix.SYS_RECVMSG, uintptr(fd), uintptr(unsafe.Pointer(&msg)), uintptr(flags))
	if e != 0 {
		return 0, 0, 0, e
	}
	return int(r), int(msg.Namelen), int(msg.Flags), nil
}

func result(n uintptr, e syscall.Errno) (int, error) {
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}
