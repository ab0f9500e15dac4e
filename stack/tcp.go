package stack

import (
	"bytes"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// TCPRequest is a connection the sandbox is opening (its SYN). The
// handshake with the sandbox is held until Accept or Refuse: dial the real
// destination first, then Accept, so that a refused destination can be
// refused to the sandbox too.
type TCPRequest struct {
	// Src is the sandbox's end; Dst is the address it connects to.
	Src, Dst netip.AddrPort

	st   *Stack
	r    *tcp.ForwarderRequest
	once sync.Once
}

func newTCPRequest(st *Stack, r *tcp.ForwarderRequest) *TCPRequest {
	id := r.ID()
	return &TCPRequest{
		Src: toAddrPort(id.RemoteAddress, id.RemotePort),
		Dst: toAddrPort(id.LocalAddress, id.LocalPort),
		st:  st,
		r:   r,
	}
}

// Accept completes the handshake with the sandbox and returns the
// connection. It blocks until the sandbox acknowledges (or gives up).
func (r *TCPRequest) Accept() (*TCPConn, error) {
	var (
		c   *TCPConn
		err error = errors.New("stack: request already answered")
	)
	r.once.Do(func() {
		wq := new(waiter.Queue)
		ep, terr := r.r.CreateEndpoint(wq)
		r.r.Complete(false)
		if terr != nil {
			err = Err(terr)
			return
		}
		c, err = newTCPConn(ep, wq, r.Dst, r.Src), nil
	})
	return c, err
}

// Refuse answers the SYN with a reset: the sandbox sees ECONNREFUSED.
func (r *TCPRequest) Refuse() {
	r.once.Do(func() { r.r.Complete(true) })
}

// errClosed is returned by operations on a TCPConn closed on this side.
var errClosed = net.ErrClosed

// relayBufSize is the chunk TCPConn's WriteTo and ReadFrom move per
// system call on the host side.
const relayBufSize = 256 << 10

var relayBufs = sync.Pool{New: func() any { b := make([]byte, relayBufSize); return &b }}

// TCPConn is a TCP connection of the netstack, with the operations a relay
// to a host socket needs: blocking Read and Write, CloseWrite (FIN) and
// Abort (RST), and WriteTo/ReadFrom that move data in large chunks.
// Read returns io.EOF after the peer's FIN and an error matching
// syscall.ECONNRESET after its RST. Safe for one reader and one writer at a
// time; Close and Abort may be called from anywhere.
type TCPConn struct {
	ep            tcpip.Endpoint
	wq            *waiter.Queue
	local, remote netip.AddrPort

	readEntry, writeEntry waiter.Entry
	readCh, writeCh       chan struct{}
	closed                chan struct{} // closed by the first Close or Abort

	// mu orders closing against a batch of writeToSocket, which writes
	// the endpoint's own receive buffers: the endpoint must not free them
	// (Close, Abort) while a writev may still read them.
	mu       sync.Mutex
	batching bool // a writev batch holds views of the endpoint
	closing  bool
	abortReq bool
	aborted  bool
	epClosed bool
}

func newTCPConn(ep tcpip.Endpoint, wq *waiter.Queue, local, remote netip.AddrPort) *TCPConn {
	c := &TCPConn{ep: ep, wq: wq, local: local, remote: remote, closed: make(chan struct{})}
	c.readEntry, c.readCh = waiter.NewChannelEntry(waiter.ReadableEvents | waiter.EventHUp | waiter.EventErr)
	c.writeEntry, c.writeCh = waiter.NewChannelEntry(waiter.WritableEvents | waiter.EventHUp | waiter.EventErr)
	wq.EventRegister(&c.readEntry)
	wq.EventRegister(&c.writeEntry)
	return c
}

// LocalAddr is the stack's end: the address the sandbox connected to.
func (c *TCPConn) LocalAddr() netip.AddrPort { return c.local }

// RemoteAddr is the sandbox's end.
func (c *TCPConn) RemoteAddr() netip.AddrPort { return c.remote }

// Read reads what the sandbox sent, blocking until data, EOF or an error.
func (c *TCPConn) Read(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	for {
		w := tcpip.SliceWriter(b)
		res, err := c.ep.Read(&w, tcpip.ReadOptions{})
		if err == nil {
			c.ep.ModerateRecvBuf(res.Count)
			return res.Count, nil
		}
		if _, ok := err.(*tcpip.ErrWouldBlock); !ok {
			return 0, Err(err)
		}
		select {
		case <-c.readCh:
		case <-c.closed:
			return 0, errClosed
		}
	}
}

// Write sends b to the sandbox, blocking until the stack has taken all of
// it (into its send buffer) or an error.
func (c *TCPConn) Write(b []byte) (int, error) {
	n, err := c.writeAll(bytes.NewReader(b))
	return int(n), err
}

// writeAll gives all of p to the endpoint, waiting for room in its send
// buffer as needed.
func (c *TCPConn) writeAll(p tcpip.Payloader) (int64, error) {
	var total int64
	for p.Len() > 0 {
		n, terr := c.ep.Write(p, tcpip.WriteOptions{})
		total += n
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
	return total, nil
}

// WriteTo copies what the sandbox sends to w until EOF (returning nil) or
// an error. When w is a *net.TCPConn, the stack's buffers are written to
// it directly with writev; otherwise in chunks through a relay buffer,
// held only while data flows.
func (c *TCPConn) WriteTo(w io.Writer) (int64, error) {
	if tc, ok := w.(*net.TCPConn); ok {
		if rc, err := tc.SyscallConn(); err == nil {
			return c.writeToSocket(rc)
		}
	}
	var bp *[]byte
	defer func() {
		if bp != nil {
			relayBufs.Put(bp)
		}
	}()
	var total int64
	for {
		if bp == nil {
			if err := c.waitReadable(); err != nil {
				return total, err
			}
			bp = relayBufs.Get().(*[]byte)
		}
		buf := *bp
		n, err := c.Read(buf)
		if n > 0 {
			m, werr := w.Write(buf[:n])
			total += int64(m)
			if werr != nil {
				return total, werr
			}
		}
		if errors.Is(err, io.EOF) {
			return total, nil
		}
		if err != nil {
			return total, err
		}
		if n < len(buf) {
			// Drained: give the buffer back while waiting for more.
			relayBufs.Put(bp)
			bp = nil
		}
	}
}

// waitReadable blocks until data, EOF or an error is pending.
func (c *TCPConn) waitReadable() error {
	for {
		if c.ep.Readiness(waiter.ReadableEvents|waiter.EventHUp|waiter.EventErr) != 0 {
			return nil
		}
		select {
		case <-c.readCh:
		case <-c.closed:
			return errClosed
		}
	}
}

// ReadFrom copies r to the sandbox until r's EOF (returning nil) or an
// error. When r is a *net.TCPConn, the stack reads it straight into its
// own buffers; otherwise through a relay buffer.
func (c *TCPConn) ReadFrom(r io.Reader) (int64, error) {
	if tc, ok := r.(*net.TCPConn); ok {
		if rc, err := tc.SyscallConn(); err == nil {
			return c.readFromSocket(rc)
		}
	}
	bp := relayBufs.Get().(*[]byte)
	defer relayBufs.Put(bp)
	return io.CopyBuffer(writerOnly{c}, r, *bp)
}

// writerOnly hides TCPConn's ReadFrom from io.CopyBuffer.
type writerOnly struct{ io.Writer }

// CloseWrite sends FIN after the data already written; reading goes on.
func (c *TCPConn) CloseWrite() error {
	return Err(c.ep.Shutdown(tcpip.ShutdownWrite))
}

// Close closes the connection gracefully (data already written is still
// delivered) and wakes blocked Read and Write calls. If WriteTo is in the
// middle of writing a batch to a socket, the endpoint is closed when that
// write returns.
func (c *TCPConn) Close() error {
	c.shutdown(false)
	return nil
}

// Abort resets the connection: the sandbox sees ECONNRESET. Like Close,
// it waits for a batch in flight to a socket.
func (c *TCPConn) Abort() {
	c.shutdown(true)
}

func (c *TCPConn) shutdown(abort bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.abortReq = c.abortReq || abort
	if !c.closing {
		c.closing = true
		close(c.closed)
	}
	if !c.batching {
		c.finishLocked()
	}
}

// finishLocked does what Close and Abort asked for, once no batch holds
// the endpoint's buffers.
func (c *TCPConn) finishLocked() {
	if c.abortReq && !c.aborted {
		c.aborted = true
		c.ep.Abort()
	}
	if !c.epClosed {
		c.epClosed = true
		c.wq.EventUnregister(&c.readEntry)
		c.wq.EventUnregister(&c.writeEntry)
		c.ep.Close()
	}
}

// beginBatch marks a batch that will read the endpoint's buffers; false
// if the connection is closing.
func (c *TCPConn) beginBatch() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closing {
		return false
	}
	c.batching = true
	return true
}

// endBatch ends a batch and completes a Close or Abort that waited for it.
func (c *TCPConn) endBatch() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.batching = false
	if c.closing {
		c.finishLocked()
	}
}
