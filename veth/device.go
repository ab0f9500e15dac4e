package veth

import (
	"errors"
	"fmt"
	"net"
	"os"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/epoll"
	"github.com/gonetns/gonetns/internal/rawconn"
	"github.com/gonetns/gonetns/tap"
)

// device is a tap.Device over the packet sockets of the pair's far end:
// one that sends, and the receiving ones, a fanout group that rolls over
// from one socket to the next when one is three quarters full.
//
// Why several receiving sockets: a packet socket queues at most its
// receive buffer, which an unprivileged process can raise only to
// net.core.rmem_max (212992 bytes on most distributions, so 416 KiB: six
// 64 KB segments), and frames beyond it are dropped, not held back as the
// TAP's queue of 10,000 frames holds them. Bulk sandbox -> host at MTU 1500
// (iperf3, 5 s) with one such socket retransmitted 326,342 segments
// (4.3 Gbit/s); with fifteen, 592 (8.5 Gbit/s). The group's sockets add
// their buffers up, and cost nothing while the first one keeps up: the
// kernel rolls over to the next only when one is three quarters full.
//
// Rollover keeps frames in order: the kernel fills the sockets one after
// the other in a ring, moving on from a socket only when it is full, so
// that the frames not yet read are, oldest first, those of the socket
// being read, then of the next ones. Read takes from the socket it read
// last until it is empty, then moves on to the next one that holds
// frames. (Only when every socket is full at once does the kernel come
// back to a socket before it is empty; then a frame can overtake others,
// where a single socket would have dropped it.)
type device struct {
	tx   *os.File // the socket that sends, bound without a protocol: it receives nothing; not in Go's poller (Write)
	txrc syscall.RawConn
	rx   []*os.File // the fanout group, in rollover order
	rxrc []syscall.RawConn
	// wait is what Read waits on when every receiving socket is empty,
	// with several of them (one is waited on in Go's poller itself).
	wait *epoll.Set

	cur    int // the socket Read takes from (Read is not concurrent)
	events []unix.EpollEvent
	name   [unix.SizeofSockaddrLinklayer]byte

	closed atomic.Bool
}

var _ tap.Device = (*device)(nil)

// ErrGone reports that the sandbox's end of the pair was removed (with
// the sandbox's network namespace, or by a command inside that deleted
// it): no frame will ever come or go again. It wraps net.ErrClosed.
var ErrGone = fmt.Errorf("the sandbox's interface is gone: %w", net.ErrClosed)

// NewDevice makes a Device of the sockets Open made (Opened.Files: the
// sending one, then the receiving ones), e.g. received from the child.
// The files are duplicated; the caller still owns them and may close them.
func NewDevice(files []*os.File) (tap.Device, error) {
	if len(files) < 2 {
		return nil, fmt.Errorf("packet link: %d sockets, want a sending one and at least one receiving one", len(files))
	}
	d := &device{}
	fail := func(err error) (tap.Device, error) {
		d.Close()
		return nil, fmt.Errorf("packet link: %w", err)
	}
	var err error
	if d.tx, d.txrc, err = dupFile(files[0], false); err != nil {
		return fail(err)
	}
	// One receiving socket is waited on in Go's poller; several are read
	// without waiting (MSG_DONTWAIT) and waited on through an epoll set of
	// their own, so that their frames do not each wake Go's poller too.
	for _, f := range files[1:] {
		nf, rc, err := dupFile(f, len(files) == 2)
		if err != nil {
			return fail(err)
		}
		d.rx, d.rxrc = append(d.rx, nf), append(d.rxrc, rc)
	}
	if len(d.rx) == 1 {
		return d, nil
	}
	if d.wait, err = epoll.New("packet link"); err != nil {
		return fail(err)
	}
	d.events = make([]unix.EpollEvent, len(d.rx))
	for i, rc := range d.rxrc {
		fd, err := rawconn.FD(rc)
		if err == nil {
			err = d.wait.Add(fd, unix.EPOLLIN, uint32(i))
		}
		if err != nil {
			return fail(err)
		}
	}
	return d, nil
}

// dupFile duplicates f's descriptor in the given mode: non-blocking ones
// are waited on in Go's poller.
func dupFile(f *os.File, nonblock bool) (*os.File, syscall.RawConn, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, nil, err
	}
	fd, err := rawconn.FD(rc)
	if err != nil {
		return nil, nil, err
	}
	dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("duplicate socket descriptor: %w", err)
	}
	if err := unix.SetNonblock(dup, nonblock); err != nil {
		unix.Close(dup)
		return nil, nil, err
	}
	nf := os.NewFile(uintptr(dup), f.Name())
	nrc, err := nf.SyscallConn()
	if err != nil {
		nf.Close()
		return nil, nil, err
	}
	return nf, nrc, nil
}

func (d *device) VNetHdr() bool { return true }

// Read reads the next frame (see device for the order).
func (d *device) Read(bufs [][]byte) (int, error) {
	for {
		n, pkttype, err := d.readAny(bufs)
		if err != nil {
			return 0, d.ioErr("read", err)
		}
		// Frames leaving the far end, were any looped back to the
		// receiving sockets (PACKET_IGNORE_OUTGOING keeps them out where
		// the kernel has it; the sending socket bypasses the taps that
		// would see its own, and the far end, having no address, sends
		// nothing itself): not the sandbox's.
		if pkttype == unix.PACKET_OUTGOING {
			continue
		}
		return n, nil
	}
}

// readAny reads one frame: from the current socket, else from the first
// one after it in rollover order that holds any, else after waiting.
func (d *device) readAny(bufs [][]byte) (int, uint8, error) {
	if d.wait == nil {
		var nameLen int
		n, err := rawconn.Read(d.rxrc[0], func(fd int) (int, error) {
			n, l, _, err := rawconn.Recvmsg(fd, bufs, d.name[:], 0)
			nameLen = l
			return n, err
		})
		return n, d.pkttype(nameLen), err
	}
	for {
		n, pkttype, err := d.readFrom(d.cur, bufs)
		if !errors.Is(err, unix.EAGAIN) {
			return n, pkttype, err
		}
		n, err = d.wait.Wait(d.events)
		if err != nil {
			return 0, 0, err
		}
		d.cur = d.next(d.events[:n])
	}
}

// next is the first socket at or after the current one, in rollover
// order, among the ready ones.
func (d *device) next(ready []unix.EpollEvent) int {
	best, bestDist := d.cur, len(d.rx)
	for _, ev := range ready {
		i := int(epoll.Key(&ev))
		if dist := (i - d.cur + len(d.rx)) % len(d.rx); dist < bestDist {
			best, bestDist = i, dist
		}
	}
	return best
}

// readFrom reads a frame from receiving socket i without waiting.
func (d *device) readFrom(i int, bufs [][]byte) (int, uint8, error) {
	var n, nameLen int
	var rerr error
	err := d.rxrc[i].Control(func(fd uintptr) {
		for {
			n, nameLen, _, rerr = rawconn.Recvmsg(int(fd), bufs, d.name[:], unix.MSG_DONTWAIT)
			if rerr != unix.EINTR {
				return
			}
		}
	})
	if err == nil {
		err = rerr
	}
	if err != nil {
		return 0, 0, err
	}
	return n, d.pkttype(nameLen), nil
}

// pkttype is sll_pkttype of the address the last frame came with.
func (d *device) pkttype(nameLen int) uint8 {
	const off = 10 // sockaddr_ll: family, protocol, ifindex, hatype, pkttype
	if nameLen <= off {
		return 0
	}
	return d.name[off]
}

// Write sends one frame. Safe for concurrent use.
//
// The sending socket stays out of Go's poller, which watches a descriptor
// for writing as well as reading: each frame the sandbox takes gives room
// back to the socket's send buffer, and a socket an epoll set watches then
// wakes that set (sock_def_write_space), for Go's poller a thread woken
// per frame. BenchmarkWrite (3 runs each, TAP in the same run): a 66-byte
// frame took 3.0-4.2 µs with the socket in the poller (TAP 2.2-2.6), and
// 2.8-2.9 µs out of it (TAP 2.7-3.0); a 64 KB segment 6.6-8.6 µs (TAP
// 6.1-8.2), and 4.5-4.7 µs (TAP 4.9-5.7). A full send buffer (frames the
// sandbox has not taken yet) is waited out in poll(2).
func (d *device) Write(bufs [][]byte) (int, error) {
	for {
		var n int
		var werr error
		err := d.txrc.Control(func(fd uintptr) {
			for {
				n, werr = rawconn.Send(int(fd), bufs, unix.MSG_DONTWAIT)
				if werr != unix.EINTR {
					return
				}
			}
		})
		if err == nil && werr == nil {
			return n, nil
		}
		if err == nil && werr == unix.EAGAIN {
			err = d.waitWritable()
		} else if err == nil {
			err = werr
		}
		if err != nil {
			return 0, d.ioErr("write", err)
		}
	}
}

// waitWritable waits until the sending socket has room, or the device is
// closed.
func (d *device) waitWritable() error {
	for !d.closed.Load() {
		var n int
		var perr error
		err := d.txrc.Control(func(fd uintptr) {
			// Bounded, so that Close is seen: the descriptor is not in Go's
			// poller, which would wake this on Close.
			n, perr = unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}, 100)
		})
		switch {
		case err != nil:
			return err
		case perr != nil && perr != unix.EINTR:
			return perr
		case n > 0:
			return nil
		}
	}
	return os.ErrClosed
}

// ioErr reports a failed read or write: after Close it is os.ErrClosed,
// and ENETDOWN (the socket's device went away) is ErrGone.
func (d *device) ioErr(op string, err error) error {
	switch {
	case d.closed.Load():
		return fmt.Errorf("%s packet link: %w", op, os.ErrClosed)
	case errors.Is(err, unix.ENETDOWN), errors.Is(err, unix.ENXIO):
		return fmt.Errorf("%s packet link: %w", op, ErrGone)
	}
	return fmt.Errorf("%s packet link: %w", op, err)
}

// Close closes the sockets; a Read waiting returns os.ErrClosed.
func (d *device) Close() error {
	if d.closed.Swap(true) {
		return nil
	}
	if d.wait != nil {
		d.wait.Close()
	}
	for _, f := range d.rx {
		f.Close()
	}
	if d.tx != nil {
		d.tx.Close()
	}
	return nil
}
