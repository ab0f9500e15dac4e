package stack

import (
	"errors"
	"io"
	"syscall"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"

	"github.com/gonetns/gonetns/internal/rawconn"
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
		n, err := rawconn.WritevCalls.Write(rc, iovs)
		if err != nil {
			return total, err
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

// smallRead is the buffer readFromSocket reads into first: a message that
// fits (a request, a reply, an ACK-sized chunk) costs one read(2) and a
// small copy; a larger amount continues on the zero-copy path.
const smallRead = 4096

// readFromSocket sends what a kernel socket receives to the sandbox. Each
// wake-up starts with one read(2) into a small buffer — for a short
// message that is the only system call — and if that fills, the rest of
// what is queued (FIONREAD) is read by the endpoint straight into its own
// buffers.
func (c *TCPConn) readFromSocket(rc syscall.RawConn) (int64, error) {
	var total int64
	buf := make([]byte, smallRead)
	p := &socketPayload{rc: rc}
	for {
		n, err := readSocket(rc, buf)
		if err != nil {
			return total, err
		}
		if n == 0 {
			return total, nil // EOF
		}
		m, err := c.Write(buf[:n])
		total += int64(m)
		if err != nil {
			return total, err
		}
		if n < len(buf) {
			continue
		}
		fd, err := rawconn.FD(rc)
		if err != nil {
			return total, err
		}
		for {
			avail, err := unix.IoctlGetInt(fd, unix.SIOCINQ)
			if err != nil || avail == 0 {
				break
			}
			p.remaining = avail
			m, err := c.writeAll(p)
			total += m
			if p.err != nil {
				return total, p.err // the socket failed while the endpoint read it
			}
			if err != nil {
				return total, err
			}
		}
	}
}

// readSocket reads what is queued, waiting for data; 0 means EOF.
func readSocket(rc syscall.RawConn, b []byte) (int, error) {
	return rawconn.ReadCalls.Read(rc, b)
}

// bigReads are the announced reads of rawconn.BigIO bytes or more.
var bigReads = rawconn.NewCalls(unix.Read)

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
	var err error
	if len(b) >= rawconn.BigIO {
		// Announced: see rawconn.BigIO.
		n, err = bigReads.Read(p.rc, b)
	} else {
		n, err = readSocket(p.rc, b)
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
