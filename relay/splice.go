package relay

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/rawconn"
)

// PipeSize is the capacity asked for each pipe, and so the most one
// splice(2) moves: 1 MiB, the default fs.pipe-max-size and what Go's own
// splice uses. The kernel counts it against the user's
// fs.pipe-user-pages-soft (64 MiB by default): beyond that, new pipes of
// that user (the sandbox's too) get a single page, so a pool should stay
// well under 64 such pipes.
const PipeSize = 1 << 20

// copyBufSize is the buffer of the copy through user space, used when the
// pool has no pipe to give.
const copyBufSize = 64 << 10

var copyBufs = sync.Pool{New: func() any { b := make([]byte, copyBufSize); return &b }}

// PipePool lends pipes to splicing relays: at most Max pipes are open at
// once (each two descriptors), of which at most MaxIdle wait unused; a
// pipe given back beyond that is closed at once. A relay holds a pipe only
// while data moves through it, never while it waits for data. Its methods
// are safe for concurrent use.
type PipePool struct {
	max, maxIdle int

	mu     sync.Mutex
	idle   []*pipe
	open   int // in use and idle
	closed bool
}

type pipe struct{ r, w int }

func (p *pipe) close() {
	unix.Close(p.r)
	unix.Close(p.w)
}

// NewPipePool returns a pool of at most max pipes, keeping at most
// maxIdle of them open while unused (clamped to 0..max). max < 1 means
// every relay copies through user space.
func NewPipePool(max, maxIdle int) *PipePool {
	return &PipePool{max: max, maxIdle: min(maxIdle, max)}
}

// Stats reports the pipes open (in use or idle) and idle.
func (pp *PipePool) Stats() (open, idle int) {
	pp.mu.Lock()
	defer pp.mu.Unlock()
	return pp.open, len(pp.idle)
}

// Close closes the idle pipes; the ones in use are closed when given
// back. Later gets return no pipe (relays copy through user space).
func (pp *PipePool) Close() error {
	pp.mu.Lock()
	idle := pp.idle
	pp.idle = nil
	pp.closed = true
	pp.open -= len(idle)
	pp.mu.Unlock()
	for _, p := range idle {
		p.close()
	}
	return nil
}

// get returns an empty pipe, or nil when max are open already (or the
// pipe cannot be made, e.g. out of descriptors).
func (pp *PipePool) get() *pipe {
	pp.mu.Lock()
	if n := len(pp.idle); n > 0 {
		p := pp.idle[n-1]
		pp.idle = pp.idle[:n-1]
		pp.mu.Unlock()
		return p
	}
	if pp.closed || pp.open >= pp.max {
		pp.mu.Unlock()
		return nil
	}
	pp.open++
	pp.mu.Unlock()
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		pp.mu.Lock()
		pp.open--
		pp.mu.Unlock()
		return nil
	}
	// A smaller pipe works too, with more system calls.
	unix.FcntlInt(uintptr(fds[0]), unix.F_SETPIPE_SZ, PipeSize)
	return &pipe{r: fds[0], w: fds[1]}
}

// put gives p back. A pipe that may hold data (empty false) is closed.
func (pp *PipePool) put(p *pipe, empty bool) {
	pp.mu.Lock()
	if empty && !pp.closed && len(pp.idle) < pp.maxIdle {
		pp.idle = append(pp.idle, p)
		pp.mu.Unlock()
		return
	}
	pp.open--
	pp.mu.Unlock()
	p.close()
}

// errNoProgress: a splice out of a pipe that holds data moved nothing.
var errNoProgress = errors.New("relay: splice made no progress")

// splice copies src to dst until src's EOF (returning nil) or an error,
// adding what it writes to moved as it goes.
//
// The whole copy runs inside one src.SyscallConn().Read callback, which
// Go's poller calls again each time src becomes readable. Each call
// moves what is queued (socket -> pipe -> socket, or through a buffer if
// the pool has no pipe) until src has nothing more (EAGAIN); then the pipe
// goes back to the pool, empty, and the callback returns false to wait.
// So an idle direction holds no pipe, and no system call beyond Go's own
// is spent on waiting: the splice that finds src empty is the check.
func (pp *PipePool) splice(dst, src *net.TCPConn, moved *atomic.Int64) (int64, error) {
	srcRC, err := src.SyscallConn()
	if err != nil {
		return 0, err
	}
	dstRC, err := dst.SyscallConn()
	if err != nil {
		return 0, err
	}
	var (
		total  int64
		p      *pipe
		buf    *[]byte
		opErr  error
		inPipe int // bytes in p
	)
	release := func() {
		if p != nil {
			pp.put(p, inPipe == 0)
			p, inPipe = nil, 0
		}
		if buf != nil {
			copyBufs.Put(buf)
			buf = nil
		}
	}
	defer release()
	rerr := srcRC.Read(func(fd uintptr) bool {
		for {
			if p == nil && buf == nil {
				if p = pp.get(); p == nil {
					buf = copyBufs.Get().(*[]byte)
				}
			}
			var n int
			var err error
			if p != nil {
				var n64 int64
				n64, err = unix.Splice(int(fd), nil, p.w, nil, PipeSize, unix.SPLICE_F_NONBLOCK)
				n = int(n64)
			} else {
				n, err = unix.Read(int(fd), *buf)
			}
			switch {
			case err == unix.EINTR:
				continue
			case err == unix.EAGAIN:
				release() // nothing queued: wait without a pipe
				return false
			case err != nil:
				opErr = fmt.Errorf("read: %w", err)
				return true
			case n == 0:
				return true // EOF
			}
			var m int
			if p != nil {
				inPipe = n
				m, err = drain(dstRC, p, &inPipe)
			} else {
				m, err = writeAll(dstRC, (*buf)[:n])
			}
			total += int64(m)
			moved.Add(int64(m))
			if err != nil {
				opErr = fmt.Errorf("write: %w", err)
				return true
			}
		}
	})
	if opErr != nil {
		return total, opErr
	}
	return total, rerr
}

// drain splices all *inPipe bytes of p to the socket, waiting for room in
// it as needed, and counts them down in *inPipe.
func drain(dst syscall.RawConn, p *pipe, inPipe *int) (int, error) {
	total := 0
	for *inPipe > 0 {
		n, err := rawconn.Write(dst, func(fd int) (int, error) {
			n, err := unix.Splice(p.r, nil, fd, nil, *inPipe, unix.SPLICE_F_NONBLOCK)
			return int(n), err
		})
		if err == nil && n == 0 {
			err = errNoProgress
		}
		if err != nil {
			return total, err
		}
		total += n
		*inPipe -= n
	}
	return total, nil
}

// writeAll writes b to the socket, waiting for room in it as needed.
func writeAll(dst syscall.RawConn, b []byte) (int, error) {
	total := 0
	for len(b) > 0 {
		n, err := rawconn.Write(dst, func(fd int) (int, error) { return unix.Write(fd, b) })
		if err == nil && n == 0 {
			err = io.ErrShortWrite
		}
		if err != nil {
			return total, err
		}
		total += n
		b = b[n:]
	}
	return total, nil
}
