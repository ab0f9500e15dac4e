package portfwd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/gonetns/gonetns/internal/wire"
	"github.com/gonetns/gonetns/port"
)

// ChildDialer connects to addr inside the sandbox's network namespace. proto
// is tcp, tcp4, tcp6, udp, udp4 or udp6. source, when valid, is the
// client's address on the host, which the connection should come from
// inside when the namespace can arrange it (it is a wish, not a
// requirement: a dialer may ignore it, and the Manager sends it only with
// Config.SourceIPTransparent). For TCP the connection is a *net.TCPConn
// (the Manager relays TCP with splice(2) only between two *net.TCPConn);
// for UDP a *net.UDPConn, or a net.Conn that also implements syscall.Conn
// and whose Close releases what the namespace keeps for the flow. A
// refused connection is an error that matches syscall.ECONNREFUSED with
// errors.Is. Dial must be safe for concurrent use.
type ChildDialer interface {
	Dial(ctx context.Context, proto string, addr, source netip.AddrPort) (net.Conn, error)
}

var _ ChildDialer = (*Dialer)(nil)

// source is what the Manager passes to Dial as the source for a client:
// its address (IPv4 unmapped) with SourceIPTransparent, nothing without.
func (m *Manager) source(client netip.AddrPort) netip.AddrPort {
	if !m.cfg.SourceIPTransparent {
		return netip.AddrPort{}
	}
	return netip.AddrPortFrom(client.Addr().Unmap(), client.Port())
}

// Dialer is the parent's side of the dial protocol: it sends each Dial to
// ServeChild over a wire.Conn and turns the descriptor that comes back into
// a net.Conn. It implements ChildDialer.
type Dialer struct {
	c      *wire.Conn
	nextID atomic.Uint64
	done   chan struct{} // closed when the reply loop has ended

	// slots bounds the requests the child is working on to its own limit
	// (maxChildDials): beyond it the child stops reading, and a Send would
	// block with no regard for the Dial's context. A slot is taken before
	// sending and given back when the reply comes, whether or not its Dial
	// still waits.
	slots chan struct{}

	mu       sync.Mutex
	started  bool
	err      error // why the reply loop ended; Dials fail with it
	pending  map[uint64]chan dialResult
	releases []uint64 // flows ended, to tell the child (releaseLoop)

	releaseReady chan struct{} // a release is queued (capacity 1)
	releaseDone  chan struct{} // closed when releaseLoop has returned
	closed       chan struct{} // closed by Close
	closeOnce    sync.Once
}

type dialResult struct {
	rep   dialReply
	files []*os.File
	err   error // the Dialer failed before a reply came
}

// NewDialer returns a Dialer over c, which it owns from now on. It starts
// nothing: call Start.
func NewDialer(c *wire.Conn) *Dialer {
	return &Dialer{
		c:            c,
		done:         make(chan struct{}),
		slots:        make(chan struct{}, maxChildDials),
		pending:      make(map[uint64]chan dialResult),
		releaseReady: make(chan struct{}, 1),
		releaseDone:  make(chan struct{}),
		closed:       make(chan struct{}),
	}
}

// Start starts the goroutine that reads replies and hands them to the
// waiting Dials. It runs until Close, or until the child closes its end
// (then every Dial fails with an error that wraps io.EOF). Calling Start
// again does nothing.
func (d *Dialer) Start() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.started {
		return
	}
	d.started = true
	go d.readReplies()
	go d.releaseLoop()
}

// Dial asks the child to connect to addr over proto inside the namespace,
// from source if valid and possible, and waits for the answer or for ctx
// to end. A refusal in the namespace comes back as an error matching
// syscall.ECONNREFUSED. A UDP connection that kept source is a *HeldConn.
func (d *Dialer) Dial(ctx context.Context, proto string, addr, source netip.AddrPort) (net.Conn, error) {
	if !slices.Contains(port.Protos, proto) {
		return nil, fmt.Errorf("dial %s %s in the namespace: unknown protocol", proto, addr)
	}
	ch := make(chan dialResult, 1)
	id := d.nextID.Add(1)
	d.mu.Lock()
	switch {
	case d.err != nil:
		err := d.err
		d.mu.Unlock()
		return nil, fmt.Errorf("dial %s %s in the namespace: %w", proto, addr, err)
	case !d.started:
		d.mu.Unlock()
		return nil, fmt.Errorf("dial %s %s in the namespace: portfwd.Dialer.Start was not called", proto, addr)
	}
	d.mu.Unlock()

	select {
	case d.slots <- struct{}{}:
	case <-ctx.Done():
		return nil, fmt.Errorf("dial %s %s in the namespace: %d dials already in progress: %w", proto, addr, maxChildDials, ctx.Err())
	case <-d.done:
		return nil, fmt.Errorf("dial %s %s in the namespace: %w", proto, addr, d.failure())
	}
	d.mu.Lock()
	if d.err != nil { // failed while this Dial waited for a slot
		err := d.err
		d.mu.Unlock()
		<-d.slots
		return nil, fmt.Errorf("dial %s %s in the namespace: %w", proto, addr, err)
	}
	d.pending[id] = ch
	d.mu.Unlock()
	if err := d.c.Send(dialRequest{ID: id, Proto: proto, Addr: addr, Source: source}); err != nil {
		d.forget(id)
		<-d.slots
		return nil, fmt.Errorf("dial %s %s in the namespace: ask the child: %w", proto, addr, err)
	}
	select {
	case res := <-ch:
		return d.connFromReply(proto, addr, res)
	case <-ctx.Done():
		if !d.forget(id) {
			// The reply is being delivered; drop it.
			d.drop(<-ch)
		}
		return nil, fmt.Errorf("dial %s %s in the namespace: %w", proto, addr, ctx.Err())
	}
}

// forget removes a pending dial; false if the reply loop took it already.
func (d *Dialer) forget(id uint64) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	_, ok := d.pending[id]
	delete(d.pending, id)
	return ok
}

func (d *Dialer) readReplies() {
	defer close(d.done)
	for {
		var rep dialReply
		files, err := d.c.Recv(&rep)
		if err != nil && !isBadMessage(err) {
			if errors.Is(err, io.EOF) {
				err = fmt.Errorf("the child closed the port-forwarding channel (has it exited?): %w", err)
			}
			d.fail(err)
			return
		}
		// Every message from the child answers one request, readable or
		// not: the child is done with it, so its slot is free again.
		select {
		case <-d.slots:
		default:
		}
		if err != nil {
			// One lost reply: its Dial ends with its context.
			continue
		}
		d.mu.Lock()
		ch, ok := d.pending[rep.ID]
		delete(d.pending, rep.ID)
		d.mu.Unlock()
		if !ok {
			d.drop(dialResult{rep: rep, files: files}) // its Dial gave up
			continue
		}
		ch <- dialResult{rep: rep, files: files}
	}
}

// drop discards a reply nobody waits for, releasing what the child holds
// for it.
func (d *Dialer) drop(res dialResult) {
	wire.CloseFiles(res.files)
	if res.rep.Held {
		d.release(res.rep.ID)
	}
}

// release tells the child that the flow of dial id has ended. It never
// blocks: it runs on the reply loop and under a flow's lock, while the
// child may have stopped reading (all its dial slots busy) until its
// replies are read; releaseLoop sends, on its own.
func (d *Dialer) release(id uint64) {
	d.mu.Lock()
	d.releases = append(d.releases, id)
	d.mu.Unlock()
	select {
	case d.releaseReady <- struct{}{}:
	default:
	}
}

// releaseLoop sends the queued releases until Close. A failed Send means
// the child is gone, and its namespace with what it held.
func (d *Dialer) releaseLoop() {
	defer close(d.releaseDone)
	for {
		select {
		case <-d.releaseReady:
		case <-d.closed:
			return
		}
		d.mu.Lock()
		ids := d.releases
		d.releases = nil
		d.mu.Unlock()
		for _, id := range ids {
			if err := d.c.Send(dialRequest{ID: id, Op: opRelease}); err != nil {
				return
			}
		}
	}
}

// fail ends every pending Dial, and every later one, with err.
// failure is why the Dialer stopped.
func (d *Dialer) failure() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.err
}

func (d *Dialer) fail(err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.err == nil {
		d.err = err
	}
	for id, ch := range d.pending {
		ch <- dialResult{err: d.err}
		delete(d.pending, id)
	}
}

// Close closes the connection to the child, fails the pending Dials with an
// error wrapping net.ErrClosed, and waits for the reply and release loops. It may be
// called more than once.
func (d *Dialer) Close() error {
	var err error
	d.closeOnce.Do(func() {
		d.fail(fmt.Errorf("port-forwarding dialer: %w", net.ErrClosed))
		close(d.closed)
		err = d.c.Close()
		d.mu.Lock()
		started := d.started
		d.started = true // a later Start must not run the loops
		d.mu.Unlock()
		if !started {
			close(d.done)
			close(d.releaseDone)
		}
	})
	<-d.done
	<-d.releaseDone
	return err
}

// connFromReply turns a reply into a connection of the right kind.
func (d *Dialer) connFromReply(proto string, addr netip.AddrPort, res dialResult) (net.Conn, error) {
	fail := func(err error) (net.Conn, error) {
		d.drop(res)
		return nil, fmt.Errorf("dial %s %s in the namespace: %w", proto, addr, err)
	}
	switch {
	case res.err != nil:
		return fail(res.err)
	case res.rep.Error != "":
		return fail(&childError{msg: res.rep.Error, errno: syscall.Errno(res.rep.Errno)})
	case len(res.files) != 1:
		return fail(fmt.Errorf("protocol error: the child sent %d descriptors, want 1", len(res.files)))
	}
	conn, err := net.FileConn(res.files[0]) // duplicates the descriptor
	if err != nil {
		return fail(fmt.Errorf("use the child's socket: %w", err))
	}
	wire.CloseFiles(res.files)
	res.files = nil
	ok := false
	switch proto[:3] {
	case "tcp":
		_, ok = conn.(*net.TCPConn)
	case "udp":
		var uc *net.UDPConn
		if uc, ok = conn.(*net.UDPConn); ok && res.rep.Held {
			return &HeldConn{UDPConn: uc, release: func() { d.release(res.rep.ID) }}, nil
		}
	}
	if !ok {
		conn.Close()
		return fail(fmt.Errorf("protocol error: the child sent a %T", conn))
	}
	return conn, nil
}

// HeldConn is a UDP connection for which the child keeps routing state (a
// flow that kept the client's address); Close releases it.
type HeldConn struct {
	*net.UDPConn
	release func()
	once    sync.Once
}

// Close closes the connection and tells the child the flow has ended.
func (c *HeldConn) Close() error {
	err := c.UDPConn.Close()
	c.once.Do(c.release)
	return err
}

// childError is a dial failure reported by the child. It matches its errno
// (syscall.ECONNREFUSED, ...) with errors.Is.
type childError struct {
	msg   string
	errno syscall.Errno
}

func (e *childError) Error() string { return e.msg }

func (e *childError) Unwrap() error {
	if e.errno == 0 {
		return nil
	}
	return e.errno
}
