// Package epoll is an epoll set of raw, non-blocking descriptors whose own
// descriptor Go's poller watches: one goroutine waits on any number of
// sockets, sleeping in the runtime's poller like any other network wait
// until one of them is ready. It serves the packet-path engines that keep
// their sockets out of Go's net package (the NAT's UDP flows, the TCP fast
// path), so that no socket costs a goroutine.
package epoll

import (
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/rawconn"
)

// Set is an epoll set. Add, Modify and Delete may be called from any
// goroutine; Wait from one at a time.
type Set struct {
	closed atomic.Bool
	f      *os.File
	rc     syscall.RawConn
	fd     int // valid while f is open
}

// New makes an empty set; name appears in error messages.
func New(name string) (*Set, error) {
	fd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("%s: epoll: %w", name, err)
	}
	// Non-blocking, so that Go's poller takes the descriptor: it is
	// readable when a member is ready.
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("%s: epoll: %w", name, err)
	}
	f := os.NewFile(uintptr(fd), name)
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: epoll: %w", name, err)
	}
	return &Set{f: f, rc: rc, fd: fd}, nil
}

// Add registers fd for events (EPOLLIN, EPOLLOUT, EPOLLET...); key comes
// back with its events.
func (s *Set) Add(fd int, events uint32, key uint32) error {
	return s.ctl(unix.EPOLL_CTL_ADD, fd, events, key)
}

// Modify changes what fd is registered for.
func (s *Set) Modify(fd int, events uint32, key uint32) error {
	return s.ctl(unix.EPOLL_CTL_MOD, fd, events, key)
}

// Delete removes fd. Closing fd removes it too, unless it was duplicated.
func (s *Set) Delete(fd int) error {
	return s.ctl(unix.EPOLL_CTL_DEL, fd, 0, 0)
}

func (s *Set) ctl(op, fd int, events uint32, key uint32) error {
	ev := unix.EpollEvent{Events: events, Fd: int32(key)}
	// The set's descriptor is used without the poller's reference: a
	// caller racing Close gets EBADF (or, were the number reused, an
	// error from a descriptor that is no epoll set), never a hang.
	if err := unix.EpollCtl(s.fd, op, fd, &ev); err != nil {
		return fmt.Errorf("epoll ctl: %w", err)
	}
	return nil
}

// Key returns the key an event carries.
func Key(ev *unix.EpollEvent) uint32 { return uint32(ev.Fd) }

// ErrClosed is returned by Wait once the set is closed.
var ErrClosed = os.ErrClosed

// Wait blocks until some member is ready and fills events with what is
// ready now; it returns ErrClosed once the set is closed. It always asks
// the set before it sleeps: Go's poller forgets a wake-up that came while
// nobody waited (a raw read resets the descriptor's readiness first), so
// an event that arrived while the caller handled the last ones would
// otherwise be slept through.
func (s *Set) Wait(events []unix.EpollEvent) (int, error) {
	n, err := rawconn.Read(s.rc, func(fd int) (int, error) {
		n, err := rawconn.EpollPoll(fd, events)
		if err == nil && n == 0 {
			return 0, unix.EAGAIN // nothing ready: wait for the poller
		}
		return n, err
	})
	if err != nil && (s.closed.Load() || errors.Is(err, os.ErrClosed) || errors.Is(err, syscall.EBADF)) {
		return 0, ErrClosed
	}
	return n, err
}

// Close closes the set; a Wait in progress returns ErrClosed.
func (s *Set) Close() error {
	s.closed.Store(true)
	return s.f.Close()
}
