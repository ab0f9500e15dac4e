// Package relay joins two TCP connections into one, and owns the rules
// every relay of gonetns follows:
//
//   - EOF on one side becomes a half-close (FIN, CloseWrite) on the other,
//     while the other direction keeps flowing; a kernel socket whose EOF
//     was read is watched for an error until then (its peer's reset after
//     its FIN), which resets both as below;
//   - an error on either side (a reset, a broken pipe) resets both (RST to
//     both peers), each socket once what it had already taken for its
//     peer has gone out (drainSendQueue), as the peer's own kernel would deliver
//     those bytes before the reset;
//   - Abort or Close from outside (a manager shutting down) resets both,
//     and Close waits for the relay to end;
//   - a kernel socket whose stream the relay has not ended yet is reset,
//     not ended with a FIN, if the process dies (SO_LINGER 0 from Run
//     until its half-close): a peer cut off by a killed gonetns reads
//     ECONNRESET, never a clean end of a stream cut short;
//   - the bytes moved in each direction and the first error are counted
//     for the caller's debug line.
//
// It also picks, explicitly, the fastest copy for each pair of connection
// kinds, instead of leaving it to io.Copy's method lookup (which, between
// a *net.TCPConn and a user-space connection, silently takes a slow path
// in one of the two directions): splice(2) through a pipe from a bounded
// PipePool between two kernel sockets (Sockets), and a Stream's own
// zero-copy WriteTo/ReadFrom between a user-space connection and a kernel
// socket (StreamSocket).
package relay

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// ErrAborted is the Result's error when Abort or Close ended the relay.
var ErrAborted = errors.New("relay: aborted")

// Stream is a TCP connection in user space, such as *stack.TCPConn. Its
// copy methods are given the *net.TCPConn itself, so an implementation can
// move the data between the socket and its own buffers.
type Stream interface {
	// WriteTo copies what the stream receives to w until the stream's EOF
	// (returning nil) or an error.
	WriteTo(w io.Writer) (int64, error)
	// ReadFrom copies r into the stream until r's EOF (returning nil) or
	// an error.
	ReadFrom(r io.Reader) (int64, error)
	// CloseWrite sends FIN after what was written; reading goes on.
	CloseWrite() error
	// Close closes gracefully; Abort resets (RST). Both may be called
	// while WriteTo and ReadFrom run, and make them return.
	Close() error
	Abort()
}

// Result is what a relay did: bytes copied each way and why it ended.
type Result struct {
	// AToB is the bytes read from A and written to B; BToA the reverse.
	AToB, BToA int64
	// Err is nil when both directions ended with EOF; else the first
	// error (which reset both sides), or ErrAborted.
	Err error
}

// end is one side: what the rules need to do to it.
type end struct {
	// armReset makes the side reset, not end cleanly, if the process
	// dies before closeWrite (nil: nothing to arm).
	armReset   func()
	closeWrite func() error
	drain      func(stop <-chan struct{}) // wait until what was written has gone out; nil: nothing to wait for
	reset      func()                     // RST, and make its copies return
	close      func() error
	// watch waits, once this side's stream has ended (EOF), for an error
	// it reports (its peer's reset) or for stop; nil: nothing to watch.
	watch func(stop <-chan struct{}) error
}

func socketEnd(c *net.TCPConn) end {
	// reset, once set, keeps closeWrite from turning the linger off
	// that the reset is about to use.
	var mu sync.Mutex
	reset := false
	return end{
		armReset: func() { c.SetLinger(0) },
		// The FIN passes the other side's end of stream on: from here
		// the kernel may close the socket cleanly, as it would for a
		// process of its own.
		closeWrite: func() error {
			mu.Lock()
			defer mu.Unlock()
			if !reset {
				c.SetLinger(-1)
			}
			return c.CloseWrite()
		},
		drain: func(stop <-chan struct{}) { drainSendQueue(c, stop) },
		reset: func() {
			mu.Lock()
			reset = true
			mu.Unlock()
			Reset(c)
		},
		close: c.Close,
		watch: func(stop <-chan struct{}) error { return watchError(c, stop) },
	}
}

// watchError waits until c, whose peer has sent its FIN, reports an error,
// and returns it, or until stop closes (nil). A peer that closes and then
// resets (its kernel resets bytes that come after its close) resets the
// relay's other side too; once its EOF was read nothing read c again, and
// the other side's connection ended cleanly, its last bytes lost without
// an error.
func watchError(c *net.TCPConn, stop <-chan struct{}) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil
	}
	done := make(chan struct{})
	defer close(done)
	go func() {
		select {
		case <-stop:
			c.SetReadDeadline(time.Unix(1, 0)) // wakes the wait below
		case <-done:
		}
	}()
	var sockErr error
	rc.Read(func(fd uintptr) bool {
		if v, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ERROR); err == nil && v != 0 {
			sockErr = unix.Errno(v)
			return true
		}
		select {
		case <-stop:
			return true
		default:
			return false // wait for the socket's next event
		}
	})
	return sockErr
}

func streamEnd(s Stream) end {
	return end{closeWrite: s.CloseWrite, reset: s.Abort, close: s.Close}
}

// drainStall is how long drainSendQueue waits for a peer that takes none
// of the bytes still queued for it before the reset goes anyway.
const drainStall = 5 * time.Second

// drainPoll is how often drainSendQueue looks at the send queue.
const drainPoll = 10 * time.Millisecond

// drainSendQueue waits until c's send queue is empty (its peer has
// acknowledged every byte the relay wrote), for as long as the peer keeps
// taking them, or until stop. A reset (SO_LINGER 0) discards what is
// queued: without this, when one peer reset, the bytes it had sent the
// other just before, already taken by the relay, were lost with the
// other side's reset (4 MiB and then a reset from a server inside: the
// client read 1.5-3.5 MiB, where a direct client reads all of it, then
// ECONNRESET). A socket that can no longer send (its own peer reset it:
// the kernel dropped its queue) has nothing to wait for.
func drainSendQueue(c *net.TCPConn, stop <-chan struct{}) {
	last, stalled := -1, time.Now().Add(drainStall)
	t := time.NewTimer(drainPoll)
	defer t.Stop()
	for n := Unsent(c); n > 0; n = Unsent(c) {
		if last < 0 || n < last {
			last, stalled = n, time.Now().Add(drainStall)
		} else if time.Now().After(stalled) {
			return
		}
		t.Reset(drainPoll)
		select {
		case <-t.C:
		case <-stop:
			return
		}
	}
}

// Unsent returns the bytes c's kernel holds for its peer and has not had
// acknowledged (SIOCOUTQ); 0 when it can no longer deliver them (its peer
// reset it) or c is closed.
func Unsent(c *net.TCPConn) (n int) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0
	}
	rc.Control(func(fd uintptr) {
		info, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
		if err != nil || !sending(info.State) {
			return
		}
		if q, err := unix.IoctlGetInt(int(fd), unix.SIOCOUTQ); err == nil {
			n = q
		}
	})
	return n
}

// sending reports whether a TCP socket in state (TCP_INFO's) can still
// deliver what it has queued.
func sending(state uint8) bool {
	switch state {
	case 1, 4, 8, 9, 11: // ESTABLISHED, FIN_WAIT1, CLOSE_WAIT, LAST_ACK, CLOSING
		return true
	}
	return false
}

// Reset closes c with an RST instead of a FIN: SO_LINGER with a zero
// timeout makes close(2) discard what is unsent and reset the peer. For
// connections refused before a relay starts.
func Reset(c *net.TCPConn) {
	c.SetLinger(0)
	c.Close()
}

// Relay is one relayed connection: two sides and a copy for each
// direction. Run it once; Abort and Close may be called from any
// goroutine, before, during or after Run.
type Relay struct {
	a, b       end
	aToB, bToA func() (int64, error)
	moved      moved // both directions, as they go (Sockets only)

	mu      sync.Mutex
	started bool
	reset   bool          // both sides have been reset, or are being
	aborted chan struct{} // closed by Abort: resets go at once
	err     error         // the first error
	done    chan struct{}
}

func newRelay(a, b end, aToB, bToA func() (int64, error)) *Relay {
	return &Relay{a: a, b: b, aToB: aToB, bToA: bToA, done: make(chan struct{}), aborted: make(chan struct{})}
}

// Sockets relays between two kernel TCP sockets with splice(2): each
// direction waits for data without a pipe, and takes one from pool only
// while data moves (or copies through a buffer when pool has none to
// give). The Relay owns a and b from now on.
func Sockets(a, b *net.TCPConn, pool *PipePool) *Relay {
	r := newRelay(socketEnd(a), socketEnd(b), nil, nil)
	r.aToB = func() (int64, error) { return pool.splice(b, a, &r.moved.aToB) }
	r.bToA = func() (int64, error) { return pool.splice(a, b, &r.moved.bToA) }
	return r
}

// StreamSocket relays between a user-space stream (A) and a kernel TCP
// socket (B): s.WriteTo(c) and s.ReadFrom(c), called with c itself so that
// s can use its zero-copy paths. The Relay owns s and c from now on.
func StreamSocket(s Stream, c *net.TCPConn) *Relay {
	return newRelay(streamEnd(s), socketEnd(c),
		func() (int64, error) { return s.WriteTo(c) },
		func() (int64, error) { return s.ReadFrom(c) })
}

// moved counts the bytes a Sockets relay has written so far, each
// direction on a cache line of its own: the two directions run on two
// goroutines, often on two CPUs.
type moved struct {
	aToB atomic.Int64
	_    [56]byte
	bToA atomic.Int64
}

// Moved returns the bytes a Sockets relay has relayed so far, both
// directions together: an idle connection's count stands still. A reader
// compares it with what it read before, at its own pace; the relay pays
// one atomic add per write it makes (a write moves up to a pipe's 1 MiB),
// and no clock. StreamSocket relays report 0.
func (r *Relay) Moved() int64 { return r.moved.aToB.Load() + r.moved.bToA.Load() }

// Run relays until both directions have ended, closes both sides and
// returns what happened. Call it once.
func (r *Relay) Run() Result {
	r.mu.Lock()
	if r.started {
		r.mu.Unlock()
		panic("relay: Run called twice")
	}
	r.started = true
	aborted := r.reset
	r.mu.Unlock()
	defer close(r.done)

	var res Result
	if !aborted { // else Abort has reset both already
		for _, e := range []end{r.a, r.b} {
			if e.armReset != nil {
				e.armReset()
			}
		}
		var wg sync.WaitGroup
		aDone, bDone := make(chan struct{}), make(chan struct{})
		wg.Go(func() { res.AToB = r.direction(r.a, r.b, r.aToB, aDone, bDone) })
		res.BToA = r.direction(r.b, r.a, r.bToA, bDone, aDone)
		wg.Wait()
	}
	r.a.close()
	r.b.close()
	r.mu.Lock()
	res.Err = r.err
	r.mu.Unlock()
	return res
}

// direction runs one copy from src to dst and applies the rules to its
// outcome: EOF half-closes dst, and src is watched for an error until the
// other direction ends (done is this one's end, other the other's); an
// error resets both sides.
func (r *Relay) direction(src, dst end, copy func() (int64, error), done, other chan struct{}) int64 {
	n, err := copy()
	if err == nil {
		err = dst.closeWrite()
	}
	close(done)
	if err == nil && src.watch != nil {
		err = src.watch(other)
	}
	if err != nil {
		r.fail(err)
	}
	return n
}

// fail records err if it is the first and resets both sides once, each
// once drained (unless the relay is aborted: then at once).
func (r *Relay) fail(err error) {
	r.mu.Lock()
	if r.err == nil {
		r.err = err
	}
	first := !r.reset
	r.reset = true
	if err == ErrAborted {
		select {
		case <-r.aborted:
		default:
			close(r.aborted)
		}
	}
	r.mu.Unlock()
	if first {
		for _, e := range []end{r.a, r.b} {
			if e.drain != nil {
				e.drain(r.aborted)
			}
		}
		r.a.reset()
		r.b.reset()
	}
}

// Abort resets both sides (RST to both peers); Run then returns soon with
// ErrAborted, unless it had failed or finished already. It does not wait.
func (r *Relay) Abort() { r.fail(ErrAborted) }

// Close aborts the relay and, if Run has started, waits for it to return.
func (r *Relay) Close() {
	r.Abort()
	r.mu.Lock()
	started := r.started
	r.mu.Unlock()
	if started {
		<-r.done
	}
}
