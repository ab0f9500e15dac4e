package relay

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// pair is a relayed connection in a test: the relay between the accepted
// ends A and B, and the peers that see it (peerA is A's client, peerB is
// B's client).
type pair struct {
	peerA, peerB *net.TCPConn
	r            *Relay
	res          chan Result
}

// tcpPair returns a connected pair of sockets on 127.0.0.1: the client
// end and the accepted end.
func tcpPair(t testing.TB) (client, accepted *net.TCPConn) {
	t.Helper()
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.DialTCP("tcp4", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c, s
}

// startSockets relays two fresh socket pairs with pool.
func startSockets(t testing.TB, pool *PipePool) *pair {
	t.Helper()
	peerA, a := tcpPair(t)
	peerB, b := tcpPair(t)
	p := &pair{peerA: peerA, peerB: peerB, r: Sockets(a, b, pool), res: make(chan Result, 1)}
	go func() { p.res <- p.r.Run() }()
	t.Cleanup(p.r.Close)
	return p
}

func (p *pair) result(t testing.TB) Result {
	t.Helper()
	select {
	case res := <-p.res:
		return res
	case <-time.After(20 * time.Second):
		t.Fatal("the relay did not end")
		return Result{}
	}
}

func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + i>>11)
	}
	return b
}

// readAll reads c to EOF with a deadline.
func readAll(t testing.TB, c net.Conn) ([]byte, error) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(20 * time.Second))
	return io.ReadAll(c)
}

// TestSocketsHalfClose: EOF from one side is a FIN on the other while the
// other direction keeps flowing; the counts are per direction.
func TestSocketsHalfClose(t *testing.T) {
	for _, tc := range []struct {
		name string
		pool *PipePool
	}{
		{"splice", NewPipePool(4, 2)},
		{"no pipes (user-space copy)", NewPipePool(0, 0)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			defer tc.pool.Close()
			p := startSockets(t, tc.pool)
			up, down := pattern(3<<20+17), pattern(1<<20+5)
			go func() {
				p.peerA.Write(up)
				p.peerA.CloseWrite()
			}()
			got, err := readAll(t, p.peerB)
			if err != nil || !bytes.Equal(got, up) {
				t.Fatalf("B's peer read %d bytes (%v), want the %d sent and EOF", len(got), err, len(up))
			}
			// A's peer has half-closed; B's peer still talks to it.
			go func() {
				p.peerB.Write(down)
				p.peerB.CloseWrite()
			}()
			got, err = readAll(t, p.peerA)
			if err != nil || !bytes.Equal(got, down) {
				t.Fatalf("after the half-close, A's peer read %d bytes (%v), want %d and EOF", len(got), err, len(down))
			}
			res := p.result(t)
			if res.Err != nil || res.AToB != int64(len(up)) || res.BToA != int64(len(down)) {
				t.Fatalf("result %+v, want %d and %d bytes, no error", res, len(up), len(down))
			}
			if open, idle := tc.pool.Stats(); open != idle {
				t.Fatalf("after the relay, %d pipes open but %d idle: a pipe was not given back", open, idle)
			}
		})
	}
}

// isReset reports whether err is what a reset peer shows.
func isReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// TestSocketsResetPropagates: a reset on one side resets the other, and
// the relay ends with that error.
func TestSocketsResetPropagates(t *testing.T) {
	pool := NewPipePool(4, 2)
	defer pool.Close()
	p := startSockets(t, pool)
	p.peerA.Write([]byte("hello"))
	buf := make([]byte, 5)
	p.peerB.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(p.peerB, buf); err != nil {
		t.Fatal(err)
	}
	Reset(p.peerB)
	if _, err := readAll(t, p.peerA); !isReset(err) {
		t.Fatalf("A's peer read %v after B's peer reset; want ECONNRESET", err)
	}
	if res := p.result(t); !isReset(res.Err) {
		t.Fatalf("result error %v; want the reset", res.Err)
	}
}

// TestSocketsResetAfterData: a peer that sends and then resets has every
// byte it sent reach the other peer before the reset, as a direct client
// would read them; before, the reset of the other side discarded what
// the relay still had queued for it (a slow reader got part of it).
func TestSocketsResetAfterData(t *testing.T) {
	pool := NewPipePool(4, 2)
	defer pool.Close()
	p := startSockets(t, pool)
	data := pattern(4 << 20)
	go func() {
		p.peerA.Write(data)
		// Once the relay has taken every byte (acknowledged), reset.
		rc, _ := p.peerA.SyscallConn()
		for range 2000 {
			n := -1
			rc.Control(func(fd uintptr) { n, _ = unix.IoctlGetInt(int(fd), unix.SIOCOUTQ) })
			if n == 0 {
				break
			}
			time.Sleep(time.Millisecond)
		}
		Reset(p.peerA)
	}()
	time.Sleep(300 * time.Millisecond) // a reader that comes late
	got, err := readAll(t, p.peerB)
	if !bytes.Equal(got, data) || !isReset(err) {
		t.Fatalf("B's peer read %d bytes (equal: %v), then %v; want the %d sent, then the reset", len(got), bytes.Equal(got, data), err, len(data))
	}
	if res := p.result(t); !isReset(res.Err) {
		t.Fatalf("result error %v; want the reset", res.Err)
	}
}

// TestSocketsResetAfterFIN: a peer that closes and then resets (its
// kernel resets bytes that come after its close) resets the other peer
// too, after the FIN, while the other peer still has its side open; the
// relay used to leave it a clean close.
func TestSocketsResetAfterFIN(t *testing.T) {
	pool := NewPipePool(4, 2)
	defer pool.Close()
	p := startSockets(t, pool)
	p.peerB.Write([]byte("bye"))
	p.peerB.CloseWrite()
	if got, err := readAll(t, p.peerA); string(got) != "bye" || err != nil {
		t.Fatalf("A's peer read %q, %v; want bye, then EOF", got, err)
	}
	Reset(p.peerB)
	rc, _ := p.peerA.SyscallConn()
	var soErr int
	for range 500 {
		rc.Control(func(fd uintptr) { soErr, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ERROR) })
		if soErr != 0 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !isReset(syscall.Errno(soErr)) {
		t.Errorf("A's peer's socket error %v after B's peer's FIN and reset; want the reset", syscall.Errno(soErr))
	}
	if res := p.result(t); !isReset(res.Err) {
		t.Errorf("result error %v; want the reset", res.Err)
	}
}

// TestSocketsCloseResetsBoth: Close from outside resets both peers and
// waits for the relay.
func TestSocketsCloseResetsBoth(t *testing.T) {
	pool := NewPipePool(4, 2)
	defer pool.Close()
	p := startSockets(t, pool)
	p.peerA.Write([]byte("x"))
	p.peerB.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(p.peerB, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	p.r.Close()
	// Run has returned once Close does (its result reaches p.res a moment
	// later, from the goroutine that called it).
	select {
	case <-p.r.done:
	default:
		t.Fatal("Close returned before Run")
	}
	if res := p.result(t); !errors.Is(res.Err, ErrAborted) || res.AToB != 1 {
		t.Fatalf("result %+v; want 1 byte and ErrAborted", res)
	}
	for name, c := range map[string]*net.TCPConn{"A": p.peerA, "B": p.peerB} {
		if _, err := readAll(t, c); !isReset(err) {
			t.Errorf("%s's peer read %v after Close; want ECONNRESET", name, err)
		}
	}
}

// TestCloseBeforeRun: a relay closed before it runs resets both at once,
// and Run returns at once.
func TestCloseBeforeRun(t *testing.T) {
	pool := NewPipePool(4, 2)
	defer pool.Close()
	peerA, a := tcpPair(t)
	peerB, b := tcpPair(t)
	r := Sockets(a, b, pool)
	r.Close()
	if res := r.Run(); !errors.Is(res.Err, ErrAborted) {
		t.Fatalf("Run after Close: %+v", res)
	}
	for _, c := range []*net.TCPConn{peerA, peerB} {
		if _, err := readAll(t, c); !isReset(err) {
			t.Errorf("peer read %v; want ECONNRESET", err)
		}
	}
}

// openFDs counts this process's descriptors.
func openFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// eventually polls cond for up to 10 s.
func eventually(cond func() bool) bool {
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
	}
}

// TestIdleRelaysHoldNoPipes: relays that wait for data hold no pipe; ones
// moving data at once share a bounded number, beyond which they copy
// through user space; and after the traffic, no more than MaxIdle pipes
// stay open, until Close closes them too.
func TestIdleRelaysHoldNoPipes(t *testing.T) {
	const relays, maxPipes, maxIdle = 40, 6, 2
	pool := NewPipePool(maxPipes, maxIdle)
	before := openFDs(t)
	var pairs []*pair
	for range relays {
		pairs = append(pairs, startSockets(t, pool))
	}
	// Each relay soon waits for data (after its first, empty, splice).
	sockets := 4 * relays
	if !eventually(func() bool { open, _ := pool.Stats(); return open <= maxIdle }) {
		open, _ := pool.Stats()
		t.Errorf("%d idle relays hold %d pipes; want at most the %d idle ones of the pool", relays, open, maxIdle)
	}
	if got := openFDs(t) - before; got > sockets+2*maxIdle {
		t.Errorf("%d idle relays hold %d descriptors; want at most %d (their sockets and %d idle pipes)", relays, got, sockets+2*maxIdle, maxIdle)
	}

	// All of them move data at once, both ways.
	var wg sync.WaitGroup
	errs := make(chan error, 2*relays)
	for i, p := range pairs {
		data := pattern(1<<20 + i)
		for _, dir := range [][2]*net.TCPConn{{p.peerA, p.peerB}, {p.peerB, p.peerA}} {
			from, to := dir[0], dir[1]
			wg.Go(func() {
				go func() { from.Write(data); from.CloseWrite() }()
				got, err := readAll(t, to)
				if err != nil || sha256.Sum256(got) != sha256.Sum256(data) {
					errs <- fmt.Errorf("relay %d: read %d bytes (%v), want %d", i, len(got), err, len(data))
				}
			})
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for _, p := range pairs {
		if res := p.result(t); res.Err != nil {
			t.Errorf("relay ended with %v", res.Err)
		}
	}
	if open, idle := pool.Stats(); open > maxIdle || open != idle {
		t.Errorf("after the traffic, %d pipes open (%d idle); want at most %d, all idle", open, idle, maxIdle)
	}
	pool.Close()
	if open, _ := pool.Stats(); open != 0 {
		t.Errorf("after Close, %d pipes open", open)
	}
	for _, p := range pairs {
		p.peerA.Close()
		p.peerB.Close()
	}
	if got := openFDs(t); got > before {
		t.Errorf("%d descriptors open after everything closed; %d before", got, before)
	}
}

// fakeStream records how the relay called it.
type fakeStream struct {
	writeToArg, readFromArg chan any
	writeTo                 func(w io.Writer) (int64, error)
	readFrom                func(r io.Reader) (int64, error)
	closedWrite, aborted    chan struct{}
	once1, once2            sync.Once
}

func newFakeStream() *fakeStream {
	return &fakeStream{writeToArg: make(chan any, 1), readFromArg: make(chan any, 1),
		closedWrite: make(chan struct{}), aborted: make(chan struct{})}
}

func (s *fakeStream) WriteTo(w io.Writer) (int64, error) {
	s.writeToArg <- w
	return s.writeTo(w)
}

func (s *fakeStream) ReadFrom(r io.Reader) (int64, error) {
	s.readFromArg <- r
	return s.readFrom(r)
}

func (s *fakeStream) CloseWrite() error { s.once1.Do(func() { close(s.closedWrite) }); return nil }
func (s *fakeStream) Close() error      { return nil }
func (s *fakeStream) Abort()            { s.once2.Do(func() { close(s.aborted) }) }

// TestStreamSocketPassesTheSocket: the stream's WriteTo and ReadFrom get
// the *net.TCPConn itself (not a wrapper that would hide it from the
// stream's zero-copy paths), and the rules apply: the stream's EOF
// half-closes the socket, the socket's EOF half-closes the stream, and a
// failing copy resets both.
func TestStreamSocketPassesTheSocket(t *testing.T) {
	peer, c := tcpPair(t)
	s := newFakeStream()
	s.writeTo = func(w io.Writer) (int64, error) { n, err := io.WriteString(w, "from the stream"); return int64(n), err }
	s.readFrom = func(r io.Reader) (int64, error) { return io.Copy(io.Discard, r) }
	res := make(chan Result, 1)
	go func() { res <- StreamSocket(s, c).Run() }()
	if w := <-s.writeToArg; w != any(c) {
		t.Errorf("WriteTo got a %T, want the *net.TCPConn", w)
	}
	if r := <-s.readFromArg; r != any(c) {
		t.Errorf("ReadFrom got a %T, want the *net.TCPConn", r)
	}
	if got, err := readAll(t, peer); err != nil || string(got) != "from the stream" {
		t.Fatalf("the socket's peer read %q (%v); want the stream's bytes and EOF", got, err)
	}
	peer.Write([]byte("abc"))
	peer.CloseWrite()
	select {
	case <-s.closedWrite:
	case <-time.After(10 * time.Second):
		t.Fatal("the socket's EOF did not half-close the stream")
	}
	if r := <-res; r.Err != nil || r.AToB != 15 || r.BToA != 3 {
		t.Fatalf("result %+v", r)
	}

	// A failing stream resets the socket, and the stream.
	peer, c = tcpPair(t)
	s = newFakeStream()
	boom := errors.New("boom")
	s.writeTo = func(io.Writer) (int64, error) { return 0, boom }
	s.readFrom = func(r io.Reader) (int64, error) { <-s.aborted; return 0, net.ErrClosed }
	go func() { res <- StreamSocket(s, c).Run() }()
	if _, err := readAll(t, peer); !isReset(err) {
		t.Fatalf("the socket's peer read %v; want ECONNRESET", err)
	}
	if r := <-res; !errors.Is(r.Err, boom) {
		t.Fatalf("result %+v; want the stream's error", r)
	}
}

// Moved counts what a Sockets relay has written, both ways, while it
// runs: through a pipe and, when the pool has none, through a buffer.
func TestSocketsMoved(t *testing.T) {
	for _, pipes := range []int{1, 0} {
		t.Run(fmt.Sprintf("pipes=%d", pipes), func(t *testing.T) {
			p := startSockets(t, NewPipePool(pipes, pipes))
			if n := p.r.Moved(); n != 0 {
				t.Fatalf("Moved = %d before any data", n)
			}
			p.peerA.Write(pattern(1000))
			if _, err := io.ReadFull(p.peerB, make([]byte, 1000)); err != nil {
				t.Fatal(err)
			}
			p.peerB.Write(pattern(24))
			if _, err := io.ReadFull(p.peerA, make([]byte, 24)); err != nil {
				t.Fatal(err)
			}
			// The count follows each write a moment later.
			if !eventually(func() bool { return p.r.Moved() == 1024 }) {
				t.Fatalf("Moved = %d after 1000 bytes one way and 24 the other", p.r.Moved())
			}
		})
	}
}
