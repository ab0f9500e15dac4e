// Package rawconn runs system calls on descriptors that Go's poller
// watches (non-blocking sockets, the TAP): the call is tried at once and,
// when the descriptor is not ready (EAGAIN), retried after the poller says
// it is. This is the one place that rule, and the retry on EINTR, live.
package rawconn

import (
	"errors"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// Op is one system call on fd, returning a count and an error
// (EAGAIN: not ready yet).
type Op func(fd int) (int, error)

// Read runs op until the descriptor behind rc is readable enough for it
// to succeed or fail for another reason than EAGAIN, and returns op's
// result. An error of the poller (the descriptor was closed, a deadline
// passed) is returned as it is. Each call allocates (op, and the closure
// RawConn.Read keeps, escape); a path taken per packet uses Calls.
func Read(rc syscall.RawConn, op Op) (int, error) {
	c := call[Op]{op: runOp}
	return c.wait(rc.Read, op)
}

// Write is Read for writing: op is retried when the descriptor becomes
// writable.
func Write(rc syscall.RawConn, op Op) (int, error) {
	c := call[Op]{op: runOp}
	return c.wait(rc.Write, op)
}

func runOp(fd int, op Op) (int, error) { return op(fd) }

// Calls runs one system call, op with an argument of type A (the
// buffers), as Read and Write do, without allocating: the closure that
// RawConn.Read and Write take escapes to the heap, so Read and Write
// allocate it (and op's) on every call, 3 objects (measured: a write and
// a read, 6), most of the 11.5 per round trip the packet path made
// before Calls; a Calls makes each closure once and
// keeps it in a sync.Pool for concurrent callers. Make it once, at
// package level or with the descriptor's owner.
type Calls[A any] struct {
	op   func(fd int, a A) (int, error)
	pool sync.Pool // of *call[A]
}

// NewCalls returns a Calls for op. op must not keep a or call back into
// the Calls.
func NewCalls[A any](op func(fd int, a A) (int, error)) *Calls[A] {
	cs := &Calls[A]{op: op}
	cs.pool.New = func() any {
		c := &call[A]{op: op}
		c.try = c.run
		return c
	}
	return cs
}

// Read is Read with op's argument a.
func (cs *Calls[A]) Read(rc syscall.RawConn, a A) (int, error) {
	c := cs.pool.Get().(*call[A])
	defer cs.pool.Put(c)
	return c.wait(rc.Read, a)
}

// Write is Write with op's argument a.
func (cs *Calls[A]) Write(rc syscall.RawConn, a A) (int, error) {
	c := cs.pool.Get().(*call[A])
	defer cs.pool.Put(c)
	return c.wait(rc.Write, a)
}

// The calls the packet path makes on polled descriptors, each one Calls
// that its callers share.
var (
	ReadvCalls  = NewCalls(Readv)
	WritevCalls = NewCalls(Writev)
	ReadCalls   = NewCalls(ReadFD)
)

// call is one system call's state while the poller runs it.
type call[A any] struct {
	op  func(fd int, a A) (int, error)
	a   A
	n   int
	err error
	try func(fd uintptr) bool // c.run, made once for a pooled call
}

// wait runs the call through RawConn's Read or Write (wait): tried at
// once, and again each time the poller says the descriptor is ready,
// until it finds it ready.
func (c *call[A]) wait(wait func(func(uintptr) bool) error, a A) (int, error) {
	c.a = a
	try := c.try
	if try == nil {
		try = c.run
	}
	err := wait(try)
	n, opErr := c.n, c.err
	var zero A
	c.a, c.err = zero, nil // the pool keeps no buffer of the caller's alive
	if err != nil {
		return 0, err
	}
	return n, opErr
}

// run is one try: op, again while interrupted; false (wait for the
// poller) while the descriptor is not ready.
func (c *call[A]) run(fd uintptr) bool {
	for {
		c.n, c.err = c.op(int(fd), c.a)
		if c.err != syscall.EINTR {
			return !errors.Is(c.err, syscall.EAGAIN)
		}
	}
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

// MaxBatch bounds ReadBatch's messages: its headers live on the stack.
const MaxBatch = 8

// ReadBatch reads up to len(bufs) datagrams (at most MaxBatch) from the
// non-blocking socket fd with one recvmmsg, one into each buffer, and
// sets lens[i] to the i-th one's length. A count short of len(bufs) says
// the socket's queue was empty after it, which a caller that read one
// datagram at a time learnt only from a last read that failed with
// EAGAIN. An error comes only when no datagram was read (the kernel keeps
// a later one for the next call).
func ReadBatch(fd int, bufs [][]byte, lens []int) (int, error) {
	return ReadBatchFrom(fd, bufs, lens, nil, nil)
}

// ReadBatchFrom is ReadBatch that also reads each datagram's sender into
// names[i] (a buffer of unix.SizeofSockaddrAny bytes, or of the family's
// size), its length into nameLens[i]; names nil reads no senders.
func ReadBatchFrom(fd int, bufs [][]byte, lens []int, names [][]byte, nameLens []int) (int, error) {
	var hdrs [MaxBatch]unix.Mmsghdr
	var iov [MaxBatch]unix.Iovec
	m := min(len(bufs), MaxBatch)
	if m == 0 {
		return 0, nil
	}
	for i := range m {
		var name []byte
		if names != nil {
			name = names[i]
		}
		hdrs[i].Hdr = msghdr(iovecs(iov[i:i], bufs[i:i+1]), name)
	}
	n, err := recvmmsg(fd, &hdrs[0], m)
	for i := range n {
		lens[i] = int(hdrs[i].Len)
		if names != nil {
			nameLens[i] = int(hdrs[i].Hdr.Namelen)
		}
	}
	return n, err
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
