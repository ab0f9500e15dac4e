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
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

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

	// A blocking set's own: an eventfd in the set (key ReservedKey) that
	// Close and Wake make readable, and the lock WaitFor holds, so that
	// Close closes the set only once no thread sleeps in it.
	wake      int
	waitMu    sync.Mutex
	closeOnce sync.Once

	// While the set sleeps in Go's poller (Sleep, until the next WaitFor
	// or WaitBrief): a duplicate of fd, which the poller watches. Under
	// waitMu.
	parkedRC syscall.RawConn
	parkedF  *os.File
}

// ReservedKey is the key of a blocking set's wake-up descriptor: Add
// refuses it, WaitFor never returns it.
const ReservedKey = ^uint32(0)

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

// NewBlocking makes an empty set that one goroutine waits on with WaitFor
// or WaitBrief, sleeping in epoll_wait itself: its thread wakes straight
// into the events, without the runtime's poller in between, and holds its
// P while it sleeps (the process needs one P more than its other work: the
// launcher sizes GOMAXPROCS for it); or with Sleep, in the runtime's
// poller, giving the P back.
func NewBlocking(name string) (*Set, error) {
	fd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("%s: epoll: %w", name, err)
	}
	wake, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("%s: eventfd: %w", name, err)
	}
	// Non-blocking, so that Sleep's duplicate is taken by Go's poller (the
	// flag is the open file's, shared by the duplicates; epoll_wait
	// ignores it).
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(wake)
		unix.Close(fd)
		return nil, fmt.Errorf("%s: epoll: %w", name, err)
	}
	s := &Set{fd: fd, wake: wake}
	if err := s.ctl(unix.EPOLL_CTL_ADD, wake, unix.EPOLLIN|unix.EPOLLET, ReservedKey); err != nil {
		unix.Close(wake)
		unix.Close(fd)
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return s, nil
}

// Add registers fd for events (EPOLLIN, EPOLLOUT, EPOLLET...); key comes
// back with its events. ReservedKey is refused.
func (s *Set) Add(fd int, events uint32, key uint32) error {
	if key == ReservedKey {
		return fmt.Errorf("epoll key %#x is reserved", key)
	}
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

// pollCalls look into a set that Go's poller watches.
var pollCalls = rawconn.NewCalls(func(fd int, events []unix.EpollEvent) (int, error) {
	n, err := rawconn.EpollPoll(fd, events)
	if err == nil && n == 0 {
		return 0, unix.EAGAIN // nothing ready: wait for the poller
	}
	return n, err
})

// Wait blocks until some member is ready and fills events with what is
// ready now; it returns ErrClosed once the set is closed. It always asks
// the set before it sleeps: Go's poller forgets a wake-up that came while
// nobody waited (a raw read resets the descriptor's readiness first), so
// an event that arrived while the caller handled the last ones would
// otherwise be slept through.
func (s *Set) Wait(events []unix.EpollEvent) (int, error) {
	n, err := pollCalls.Read(s.rc, events)
	if err != nil && (s.closed.Load() || errors.Is(err, os.ErrClosed) || errors.Is(err, syscall.EBADF)) {
		return 0, ErrClosed
	}
	return n, err
}

// WaitFor waits, in a set made by NewBlocking, until some member is ready,
// Wake is called or timeout passes (a negative timeout: no limit), and
// fills events with what is ready; 0 events for a timeout or a Wake. It
// returns ErrClosed once the set is closed.
func (s *Set) WaitFor(events []unix.EpollEvent, timeout time.Duration) (int, error) {
	if len(events) == 0 {
		return 0, errors.New("epoll: WaitFor needs room for an event")
	}
	s.waitMu.Lock()
	defer s.waitMu.Unlock()
	s.unpark()
	for {
		if s.closed.Load() {
			return 0, ErrClosed
		}
		n, err := pwait2(s.fd, events, timeout)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("epoll wait: %w", err)
		}
		return s.members(events[:n])
	}
}

// MaxBrief bounds WaitBrief's timeout. A goroutine that keeps its P for
// 10 ms without being scheduled again is preempted by the runtime's
// monitor with a signal, which would cut every longer wait short; and the
// longer the wait, the longer the P is kept from the rest of the process.
const MaxBrief = 5 * time.Millisecond

// WaitBrief is WaitFor for a wait of at most MaxBrief (longer timeouts,
// and negative ones, are cut to it), made without telling the scheduler:
// the thread keeps its P while it sleeps, so it wakes straight into the
// events, and the runtime's monitor is not woken. An announced wait
// (WaitFor) wakes a monitor that is asleep and, since a P in a system call
// counts as busy, keeps it ticking every 20 µs at first for as long as the
// wait lasts (some 60 wake-ups in its first 10 ms); an unannounced one
// keeps a monitor that is awake ticking too, but never wakes one. A wait
// ended by a signal returns 0 events, as a timeout does.
func (s *Set) WaitBrief(events []unix.EpollEvent, timeout time.Duration) (int, error) {
	if err := s.blockingCall("WaitBrief", events); err != nil {
		return 0, err
	}
	timeout = min(max(timeout, 0), MaxBrief)
	if noPwait2.Load() {
		return s.WaitFor(events, timeout)
	}
	if err := s.lockOpen(); err != nil {
		return 0, err
	}
	s.unpark()
	n, err := rawconn.EpollWaitBrief(s.fd, events, timeout)
	s.waitMu.Unlock()
	switch {
	case err == unix.EINTR:
		// The runtime's preemption, most likely: back to Go code, where
		// the goroutine can be stopped.
		return 0, nil
	case err == unix.ENOSYS:
		noPwait2.Store(true)
		return s.WaitFor(events, timeout)
	case err != nil:
		return 0, fmt.Errorf("epoll wait: %w", err)
	}
	return s.members(events[:n])
}

// Sleep waits, in a set made by NewBlocking, until some member is ready or
// Wake is called, in Go's poller, as any network wait does: the goroutine
// parks and its P is given back, so that when nothing else runs the
// runtime's monitor sleeps too, however long the wait. For a set that has
// gone quiet: the set joins the poller (a duplicate of its descriptor) at
// the first Sleep and stays until the next WaitFor or WaitBrief, and
// while it is there every event of a member also wakes the poller's
// thread; leaving costs an announced close, which wakes the monitor.
// 0 events for a Wake; if the poller cannot take the set, it waits as
// WaitFor does.
func (s *Set) Sleep(events []unix.EpollEvent) (int, error) {
	if err := s.blockingCall("Sleep", events); err != nil {
		return 0, err
	}
	if err := s.lockOpen(); err != nil {
		return 0, err
	}
	n, err := s.parked(events)
	s.waitMu.Unlock()
	if err != nil {
		return s.WaitFor(events, -1)
	}
	return s.members(events[:n])
}

// parked is Sleep's wait in Go's poller. s.waitMu is held.
func (s *Set) parked(events []unix.EpollEvent) (int, error) {
	if s.parkedF == nil {
		dup, err := unix.FcntlInt(uintptr(s.fd), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			return 0, err
		}
		f := os.NewFile(uintptr(dup), "epoll set")
		rc, err := f.SyscallConn()
		if err != nil {
			f.Close()
			return 0, err
		}
		s.parkedF, s.parkedRC = f, rc
	}
	n, err := pollCalls.Read(s.parkedRC, events)
	if err != nil {
		s.unpark()
	}
	return n, err
}

// unpark takes the set out of Go's poller, if Sleep put it there.
// s.waitMu is held.
func (s *Set) unpark() {
	if s.parkedF != nil {
		s.parkedF.Close()
		s.parkedF, s.parkedRC = nil, nil
	}
}

// Poll is WaitFor without the wait, in a set made by NewBlocking, for a
// caller that polls the set in a loop (busy polling) or watches it from
// another set (FD): it fills events with what is ready now, 0 if nothing
// is. Not announced to the scheduler: epoll_wait with no timeout never
// sleeps, and the calls come too often to pay for that.
func (s *Set) Poll(events []unix.EpollEvent) (int, error) {
	if err := s.blockingCall("Poll", events); err != nil {
		return 0, err
	}
	// Close waits for a Poll in progress, as for a WaitFor: the descriptor
	// is not closed (and its number not reused) under it.
	if err := s.lockOpen(); err != nil {
		return 0, err
	}
	defer s.waitMu.Unlock()
	n, err := rawconn.EpollPoll(s.fd, events)
	switch {
	case errors.Is(err, unix.EINTR):
		return 0, nil
	case err != nil:
		return 0, fmt.Errorf("epoll wait: %w", err)
	}
	return s.members(events[:n])
}

// blockingCall checks what WaitBrief, Sleep and Poll need: room for an
// event, and a set made by NewBlocking.
func (s *Set) blockingCall(op string, events []unix.EpollEvent) error {
	if len(events) == 0 {
		return fmt.Errorf("epoll: %s needs room for an event", op)
	}
	if s.f != nil {
		return fmt.Errorf("epoll: %s needs a set made by NewBlocking", op)
	}
	return nil
}

// lockOpen takes waitMu for a call on the set's descriptor, which Close
// then waits for; ErrClosed, without the lock, once the set is closed.
func (s *Set) lockOpen() error {
	s.waitMu.Lock()
	if s.closed.Load() {
		s.waitMu.Unlock()
		return ErrClosed
	}
	return nil
}

// members drops the wake-up descriptor's event from events, and says
// ErrClosed when that was the only one and the set is closed.
func (s *Set) members(events []unix.EpollEvent) (int, error) {
	j := 0
	for i := range events {
		if Key(&events[i]) != ReservedKey {
			events[j] = events[i]
			j++
		}
	}
	if j == 0 && s.closed.Load() {
		return 0, ErrClosed
	}
	return j, nil
}

// noPwait2 is set once the kernel lacks epoll_pwait2 (before 5.11):
// timeouts are then rounded up to milliseconds.
var noPwait2 atomic.Bool

// pwait2 is epoll_pwait2: a timeout in nanoseconds (epoll_wait's are
// milliseconds, too coarse for a 500 µs delayed ACK). Announced to the
// scheduler: the thread may sleep.
func pwait2(fd int, events []unix.EpollEvent, timeout time.Duration) (int, error) {
	if !noPwait2.Load() {
		var tsp unsafe.Pointer
		var ts unix.Timespec
		if timeout >= 0 {
			ts = unix.NsecToTimespec(int64(timeout))
			tsp = unsafe.Pointer(&ts)
		}
		n, _, e := unix.Syscall6(unix.SYS_EPOLL_PWAIT2, uintptr(fd), uintptr(unsafe.Pointer(&events[0])), uintptr(len(events)), uintptr(tsp), 0, 0)
		if e != unix.ENOSYS {
			if e != 0 {
				return 0, e
			}
			return int(n), nil
		}
		noPwait2.Store(true)
	}
	ms := -1
	if timeout >= 0 {
		ms = int((timeout + time.Millisecond - 1) / time.Millisecond)
	}
	return unix.EpollWait(fd, events, ms)
}

// Wake makes a WaitFor in progress (or the next one) return at once.
func (s *Set) Wake() {
	one := [8]byte{1}
	unix.Write(s.wake, one[:])
}

// Close closes the set; a Wait or WaitFor in progress returns ErrClosed
// (Close waits for a WaitFor to have returned). Idempotent.
func (s *Set) Close() error {
	if s.f != nil {
		s.closed.Store(true)
		return s.f.Close()
	}
	s.closeOnce.Do(func() {
		s.closed.Store(true)
		s.Wake()
		s.waitMu.Lock()
		s.unpark()
		unix.Close(s.fd)
		unix.Close(s.wake)
		s.waitMu.Unlock()
	})
	return nil
}
