package stack

import (
	"errors"
	"io"
	"syscall"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
)

// The fast paths between a TCPConn and a kernel stream socket: data moves
// between the socket and the stack's own buffers with no copy in between
// (one copy per byte, in the kernel, instead of two).

// Limits of one writev batch.
const (
	maxBatchIovs  = 1024 // IOV_MAX
	maxBatchBytes = 4 << 20
)

var errBatchFull = errors.New("batch full")

// iovCollector gathers, without copying, the views a peeking Read hands
// over. They stay valid until the bytes are consumed from the endpoint.
type iovCollector struct {
	iovs [][]byte
	n    int
}

func (c *iovCollector) Write(p []byte) (int, error) {
	if len(c.iovs) >= maxBatchIovs || c.n >= maxBatchBytes {
		return 0, errBatchFull
	}
	c.iovs = append(c.iovs, p)
	c.n += len(p)
	return len(p), nil
}

// discard consumes exactly n bytes of a Read.
type discard struct{ n int }

func (d *discard) Write(p []byte) (int, error) {
	if len(p) <= d.n {
		d.n -= len(p)
		return len(p), nil
	}
	k := d.n
	d.n = 0
	return k, errBatchFull
}

// writeToSocket sends what the sandbox sends to a kernel socket with
// writev straight from the stack's receive buffers: peek, write, then
// consume what was written.
func (c *TCPConn) writeToSocket(rc syscall.RawConn) (int64, error) {
	var total int64
	col := iovCollector{iovs: make([][]byte, 0, 64)}
	for {
		if err := c.waitReadable(); err != nil {
			return total, err
		}
		n, done, err := c.writeBatch(rc, &col)
		total += int64(n)
		if err != nil || done {
			return total, err
		}
	}
}

// writeBatch peeks what is queued, writes it to the socket and consumes
// what was written. done reports EOF from the sandbox.
func (c *TCPConn) writeBatch(rc syscall.RawConn, col *iovCollector) (n int, done bool, err error) {
	if !c.beginBatch() {
		return 0, false, errClosed
	}
	defer c.endBatch()
	col.iovs, col.n = col.iovs[:0], 0
	_, terr := c.ep.Read(col, tcpip.ReadOptions{Peek: true})
	if terr != nil {
		if _, ok := terr.(*tcpip.ErrWouldBlock); ok {
			return 0, false, nil
		}
		if err := Err(terr); !errors.Is(err, io.EOF) {
			return 0, false, err
		}
		return 0, true, nil
	}
	n, werr := writevAll(rc, col.iovs)
	clear(col.iovs) // drop references to the views before consuming them
	if n > 0 {
		d := discard{n: n}
		c.ep.Read(&d, tcpip.ReadOptions{})
		c.ep.ModerateRecvBuf(n)
	}
	return n, false, werr
}

// writevAll writes all of iovs, waiting for the socket to drain as needed.
func writevAll(rc syscall.RawConn, iovs [][]byte) (int, error) {
	total := 0
	for len(iovs) > 0 {
		var n int
		var werr error
		err := rc.Write(func(fd uintptr) bool {
			n, werr = unix.Writev(int(fd), iovs)
			return werr != unix.EAGAIN
		})
		if err != nil {
			return total, err
		}
		if werr != nil {
			return total, werr
		}
		total += n
		for n > 0 && len(iovs) > 0 {
			if n >= len(iovs[0]) {
				n -= len(iovs[0])
				iovs = iovs[1:]
			} else {
				iovs[0] = iovs[0][n:]
				n = 0
			}
		}
	}
	return total, nil
}

// readFromSocket sends what a kernel socket receives to the sandbox,
// reading straight into the stack's send buffers: wait for data, learn how
// much is queued (FIONREAD), and let the endpoint read exactly that.
func (c *TCPConn) readFromSocket(rc syscall.RawConn) (int64, error) {
	var total int64
	p := &socketPayload{rc: rc}
	for {
		avail, err := waitSocketData(rc)
		if err != nil {
			return total, err
		}
		if avail == 0 {
			return total, nil // EOF
		}
		p.remaining = avail
		for p.remaining > 0 {
			n, terr := c.ep.Write(p, tcpip.WriteOptions{})
			total += n
			if p.err != nil {
				return total, p.err
			}
			if terr == nil {
				continue
			}
			if _, ok := terr.(*tcpip.ErrWouldBlock); !ok {
				return total, Err(terr)
			}
			select {
			case <-c.writeCh:
			case <-c.closed:
				return total, errClosed
			}
		}
	}
}

// socketPayload lets the endpoint read up to remaining bytes, which are
// known to be queued on the socket, directly into its own buffers.
type socketPayload struct {
	rc        syscall.RawConn
	remaining int
	err       error
}

func (p *socketPayload) Len() int { return p.remaining }

func (p *socketPayload) Read(b []byte) (int, error) {
	if p.remaining == 0 {
		return 0, io.EOF
	}
	if len(b) == 0 {
		return 0, nil // a probe for EOF (buffer.View.ReadFrom makes one)
	}
	if len(b) > p.remaining {
		b = b[:p.remaining]
	}
	var n int
	var rerr error
	err := p.rc.Read(func(fd uintptr) bool {
		n, rerr = unix.Read(int(fd), b)
		return rerr != unix.EAGAIN
	})
	if err == nil {
		err = rerr
	}
	if err == nil && n == 0 {
		err = io.ErrUnexpectedEOF
	}
	if err != nil {
		p.err = err
		return 0, err
	}
	p.remaining -= n
	return n, nil
}

// waitSocketData blocks until the socket has data, EOF or an error, and
// returns how many bytes can be read (0 at EOF). While data streams in,
// FIONREAD alone answers; only an empty queue costs a peek (to tell EOF and
// errors from "nothing yet") and a wait. A pending error (a reset) is
// returned: the kernel reports it once, and the peek consumes it.
func waitSocketData(rc syscall.RawConn) (int, error) {
	var one [1]byte
	var avail int
	var perr error
	err := rc.Read(func(fd uintptr) bool {
		if avail, perr = unix.IoctlGetInt(int(fd), unix.SIOCINQ); perr != nil || avail > 0 {
			return true
		}
		var n int
		n, _, perr = unix.Recvfrom(int(fd), one[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		if perr == unix.EAGAIN {
			return false
		}
		if perr == nil && n > 0 {
			avail, perr = unix.IoctlGetInt(int(fd), unix.SIOCINQ)
		}
		return true
	})
	if err != nil {
		return 0, err
	}
	if perr != nil {
		return 0, perr
	}
	return avail, nil
}
