// Package tap owns the layer-2 device between the sandbox's kernel and the
// gonetns netstack: opening a TAP on /dev/net/tun (with the virtio-net
// header and kernel offloads when available), configuring it and the
// loopback over rtnetlink without the ip(8) binary, and the Device
// interface the netstack reads and writes frames through.
package tap

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/rawconn"
)

// VNetHdrLen is the size of struct virtio_net_hdr, which prefixes every
// frame on a device opened with IFF_VNET_HDR.
const VNetHdrLen = 10

// Device is a layer-2 device carrying Ethernet frames: the TAP (Open,
// NewDevice), its in-memory twin (package taptest), and what wraps them
// (pcap's recorder). With VNetHdr, every frame read or written starts with
// a virtio_net_hdr (VNetHdrLen bytes) describing checksum and segmentation
// offload.
type Device interface {
	// Read reads one frame, scattered into bufs in order, and returns how
	// many bytes it stored. It blocks until a frame arrives or the device
	// is closed. A frame longer than the buffers is truncated: the rest of
	// it is lost. The buffers are the caller's and are not retained after
	// Read returns. Concurrent Reads each get whole frames (the netstack
	// uses one reader). After Close, pending and later Reads return an
	// error wrapping os.ErrClosed (net.ErrClosed for the twin).
	Read(bufs [][]byte) (int, error)
	// Write writes one frame gathered from bufs and returns its length.
	// It blocks while the device cannot take the frame (the kernel's
	// queue, the twin's channel). The buffers are not retained. Safe for
	// concurrent use; each call is one frame. After Close, Write returns
	// an error wrapping os.ErrClosed (net.ErrClosed for the twin).
	Write(bufs [][]byte) (int, error)
	// VNetHdr reports whether frames carry a virtio_net_hdr; it does not
	// change during the device's life.
	VNetHdr() bool
	// Close unblocks pending Reads and Writes and releases the device.
	// Idempotent, and safe to call concurrently with Read and Write.
	Close() error
}

var _ Device = (*fileDevice)(nil)

// Options of Open.
type Options struct {
	// Name of the interface, e.g. "tap0".
	Name string
	// VNetHdr asks for IFF_VNET_HDR and the TSO/checksum offloads, so the
	// kernel hands over 64 KB TCP segments regardless of the MTU.
	VNetHdr bool
}

// Opened describes the device Open made.
type Opened struct {
	File *os.File
	Name string
	// VNetHdr is true when frames carry a virtio_net_hdr.
	VNetHdr bool
	// Offload is true when TUNSETOFFLOAD accepted checksum and TSO
	// offloads (the kernel then sends large segments).
	Offload bool
}

// ErrTunAccess reports that /dev/net/tun could not be opened.
var ErrTunAccess = errors.New("cannot open /dev/net/tun")

// Open creates a TAP interface. It must run inside the network namespace
// that should own the interface, with CAP_NET_ADMIN there.
func Open(o Options) (Opened, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return Opened{}, tunOpenError(err)
	}
	ok := false
	defer func() {
		if !ok {
			unix.Close(fd)
		}
	}()
	flags := uint16(unix.IFF_TAP | unix.IFF_NO_PI)
	if o.VNetHdr {
		flags |= unix.IFF_VNET_HDR
	}
	ifr, err := unix.NewIfreq(o.Name)
	if err != nil {
		return Opened{}, fmt.Errorf("interface name %q: %w", o.Name, err)
	}
	ifr.SetUint16(flags)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		return Opened{}, fmt.Errorf("create TAP %q (TUNSETIFF): %w", o.Name, err)
	}
	res := Opened{Name: ifr.Name(), VNetHdr: o.VNetHdr}
	if o.VNetHdr {
		hdrLen := VNetHdrLen
		if err := ioctlPtr(fd, unix.TUNSETVNETHDRSZ, unsafe.Pointer(&hdrLen)); err != nil {
			return Opened{}, fmt.Errorf("TAP %q: set virtio-net header size: %w", o.Name, err)
		}
		// TSO needs checksum offload; the kernel then passes segments up
		// to 64 KB with a partial checksum for us to leave unverified.
		off := unix.TUN_F_CSUM | unix.TUN_F_TSO4 | unix.TUN_F_TSO6
		if err := unix.IoctlSetInt(fd, unix.TUNSETOFFLOAD, off); err == nil {
			res.Offload = true
		}
	}
	ok = true
	res.File = os.NewFile(uintptr(fd), "/dev/net/tun:"+res.Name)
	return res, nil
}

func tunOpenError(err error) error {
	switch {
	case errors.Is(err, unix.EACCES), errors.Is(err, unix.EPERM):
		hint := "its mode must allow the user gonetns runs as to read and write it"
		if st, serr := os.Stat("/dev/net/tun"); serr == nil {
			hint = fmt.Sprintf("it is mode %04o here; most distributions ship it 0666", st.Mode().Perm())
		}
		return fmt.Errorf("%w: %w (%s). Fix: sudo chmod 0666 /dev/net/tun, and to keep it after reboot "+
			`add a udev rule, e.g. echo 'KERNEL=="tun", MODE="0666"' | sudo tee /etc/udev/rules.d/99-tun.rules. `+
			"Or run with --link=packet (a veth pair instead of the TAP), --net=none or --net=host", ErrTunAccess, err, hint)
	case errors.Is(err, unix.ENOENT), errors.Is(err, unix.ENODEV), errors.Is(err, unix.ENXIO):
		return fmt.Errorf("%w: %w. The tun driver is missing: sudo modprobe tun (in a container, pass the device: --device /dev/net/tun), or run with --link=packet (a veth pair instead of the TAP)", ErrTunAccess, err)
	}
	return fmt.Errorf("%w: %w", ErrTunAccess, err)
}

func ioctlPtr(fd int, req uint, arg unsafe.Pointer) error {
	_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(req), uintptr(arg))
	if e != 0 {
		return e
	}
	return nil
}

// Pollable is a Device whose frames an event loop of the caller's may read
// instead of Read: it waits for FD to be readable (EPOLLIN, level-
// triggered, in its own epoll set) and reads with ReadNow. Read and
// ReadNow are not to be mixed on one device.
type Pollable interface {
	Device
	// FD is the descriptor to wait on; valid until Close, which the loop
	// must no longer be waiting on FD for (an epoll set keeps reporting a
	// closed descriptor whose file lives on).
	FD() int
	// ReadNow reads one frame like Read, without waiting: unix.EAGAIN
	// itself, unwrapped, when none is there (the loop meets it at the end
	// of every drain, so it costs no allocation).
	ReadNow(bufs [][]byte) (int, error)
}

var _ Pollable = (*fileDevice)(nil)

// fileDevice is a Device over a TAP file descriptor. Read waits in Go's
// poller; a device read with ReadNow instead is never in Go's poller,
// whose epoll set would otherwise be woken by every frame (the TAP's
// edge-triggered registration there reports each one) for nobody.
type fileDevice struct {
	fd      int // non-blocking
	vnetHdr bool
	closed  atomic.Bool

	// mu is held shared by ReadNow and by Writes without the poller, and
	// exclusively by Close, so that no call uses the descriptor number
	// after it is closed (it could be another file's by then).
	mu        sync.RWMutex
	closeOnce sync.Once

	pollerOnce sync.Once
	poller     atomic.Pointer[polledFile] // set by the first Read
	pollerErr  error
}

// polledFile is the descriptor in Go's poller.
type polledFile struct {
	f  *os.File
	rc syscall.RawConn
}

// NewDevice wraps a TAP file (e.g. received from the child) as a Device. f
// is duplicated and put in non-blocking mode; the caller still owns f and
// may close it.
func NewDevice(f *os.File, vnetHdr bool) (Device, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("TAP file: %w", err)
	}
	var dup int
	var derr error
	if err := rc.Control(func(fd uintptr) {
		dup, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return nil, fmt.Errorf("TAP file: %w", err)
	}
	if derr != nil {
		return nil, fmt.Errorf("duplicate TAP descriptor: %w", derr)
	}
	if err := unix.SetNonblock(dup, true); err != nil {
		unix.Close(dup)
		return nil, fmt.Errorf("TAP descriptor: %w", err)
	}
	return &fileDevice{fd: dup, vnetHdr: vnetHdr}, nil
}

func (d *fileDevice) VNetHdr() bool { return d.vnetHdr }

func (d *fileDevice) FD() int { return d.fd }

// polled puts the descriptor in Go's poller, once.
func (d *fileDevice) polled() (*polledFile, error) {
	d.pollerOnce.Do(func() {
		d.mu.Lock()
		defer d.mu.Unlock()
		if d.closed.Load() {
			d.pollerErr = os.ErrClosed
			return
		}
		f := os.NewFile(uintptr(d.fd), "tap")
		rc, err := f.SyscallConn()
		if err != nil {
			d.pollerErr = err
			return
		}
		d.poller.Store(&polledFile{f: f, rc: rc})
	})
	return d.poller.Load(), d.pollerErr
}

func (d *fileDevice) Read(bufs [][]byte) (int, error) {
	p, err := d.polled()
	if err != nil {
		return 0, d.ioErr("read", err)
	}
	n, err := rawconn.ReadvCalls.Read(p.rc, bufs)
	if err != nil {
		return 0, d.ioErr("read", err)
	}
	return n, nil
}

func (d *fileDevice) ReadNow(bufs [][]byte) (int, error) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.closed.Load() {
		return 0, d.ioErr("read", os.ErrClosed)
	}
	for {
		n, err := rawconn.Readv(d.fd, bufs)
		switch err {
		case nil:
			return n, nil
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			return 0, err
		}
		return 0, d.ioErr("read", err)
	}
}

func (d *fileDevice) Write(bufs [][]byte) (int, error) {
	if p := d.poller.Load(); p != nil {
		n, err := rawconn.WritevCalls.Write(p.rc, bufs)
		if err != nil {
			return n, d.ioErr("write", err)
		}
		return n, nil
	}
	d.mu.RLock()
	defer d.mu.RUnlock()
	for {
		if d.closed.Load() {
			return 0, d.ioErr("write", os.ErrClosed)
		}
		n, err := rawconn.Writev(d.fd, bufs)
		switch {
		case err == nil:
			return n, nil
		case err == unix.EAGAIN:
			// Not in practice: the kernel takes a frame written to a TAP
			// at once (its send buffer is unlimited by default). Waited
			// out in bounded sleeps, so that Close is seen.
			pfd := [1]unix.PollFd{{Fd: int32(d.fd), Events: unix.POLLOUT}}
			unix.Poll(pfd[:], 10)
		case err != unix.EINTR:
			return n, d.ioErr("write", err)
		}
	}
}

// ioErr reports a failed read or write: after Close it is os.ErrClosed,
// as Device promises (the poller's own "use of closed file" is not an
// exported error).
func (d *fileDevice) ioErr(op string, err error) error {
	if d.closed.Load() {
		return fmt.Errorf("%s TAP: %w", op, os.ErrClosed)
	}
	return fmt.Errorf("%s TAP: %w", op, err)
}

func (d *fileDevice) Close() error {
	var err error
	d.closeOnce.Do(func() {
		d.closed.Store(true)
		d.mu.Lock()
		defer d.mu.Unlock()
		if p := d.poller.Load(); p != nil {
			err = p.f.Close()
			return
		}
		err = unix.Close(d.fd)
	})
	return err
}
