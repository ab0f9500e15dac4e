package portfwd

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/wire"
)

// testLogger writes to t.Log.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

// wirePair returns the two ends of a wire socket pair, closed at cleanup.
func wirePair(t testing.TB) (parent, child *wire.Conn) {
	t.Helper()
	a, b, err := wire.Socketpair()
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	defer b.Close()
	if parent, err = wire.FileConn(a); err != nil {
		t.Fatal(err)
	}
	if child, err = wire.FileConn(b); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { parent.Close(); child.Close() })
	return parent, child
}

// servedDialer runs ServeChild and a started Dialer over a wire pair.
func servedDialer(t testing.TB) *Dialer {
	t.Helper()
	p, c := wirePair(t)
	done := make(chan error, 1)
	go func() { done <- ServeChild(context.Background(), c, ChildConfig{Logger: testLogger(t)}) }()
	d := NewDialer(p)
	d.Start()
	t.Cleanup(func() {
		d.Close()
		if err := <-done; err != nil {
			t.Errorf("ServeChild: %v", err)
		}
	})
	return d
}

func listenTCP(t testing.TB) *net.TCPListener {
	t.Helper()
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// dialFile does what the child does for a TCP request, in the test's own
// namespace, for tests that play the child themselves.
func dialFile(t testing.TB, req dialRequest) *os.File {
	t.Helper()
	c, err := net.Dial(req.Proto, req.Addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	f, err := c.(*net.TCPConn).File()
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func addrOf(a net.Addr) netip.AddrPort { return netip.MustParseAddrPort(a.String()) }

func TestDialTCP(t *testing.T) {
	d := servedDialer(t)
	ln := listenTCP(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := d.Dial(ctx, "tcp", addrOf(ln.Addr()), netip.AddrPort{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	tc, ok := c.(*net.TCPConn)
	if !ok {
		t.Fatalf("Dial returned a %T, want *net.TCPConn", c)
	}
	if got := addrOf(tc.RemoteAddr()); got != addrOf(ln.Addr()) {
		t.Fatalf("connected to %s, want %s", got, ln.Addr())
	}
	s, err := ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.Write([]byte("hi"))
	buf := make([]byte, 2)
	if _, err := io.ReadFull(tc, buf); err != nil || string(buf) != "hi" {
		t.Fatalf("read %q, %v", buf, err)
	}
	// The socket is in the runtime poller: deadlines work.
	tc.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if _, err := tc.Read(buf); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read past the deadline: %v, want a timeout", err)
	}
}

func TestDialUDP(t *testing.T) {
	d := servedDialer(t)
	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	c, err := d.Dial(context.Background(), "udp", addrOf(pc.LocalAddr()), netip.AddrPort{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, ok := c.(*net.UDPConn); !ok {
		t.Fatalf("Dial returned a %T, want *net.UDPConn", c)
	}
	c.Write([]byte("ping"))
	buf := make([]byte, 16)
	pc.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, from, err := pc.ReadFromUDPAddrPort(buf)
	if err != nil || string(buf[:n]) != "ping" {
		t.Fatalf("server read %q, %v", buf[:n], err)
	}
	pc.WriteToUDPAddrPort([]byte("pong"), from)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(buf); err != nil || string(buf[:n]) != "pong" {
		t.Fatalf("client read %q, %v", buf[:n], err)
	}
}

func TestDialRefused(t *testing.T) {
	d := servedDialer(t)
	ln := listenTCP(t)
	addr := addrOf(ln.Addr())
	ln.Close()
	_, err := d.Dial(context.Background(), "tcp", addr, netip.AddrPort{})
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("dial a closed port: %v; want ECONNREFUSED", err)
	}
	if msg := err.Error(); !strings.Contains(msg, addr.String()) || !strings.Contains(msg, "in the namespace") || !strings.Contains(msg, "connection refused") {
		t.Fatalf("error %q should name the address, the namespace and the refusal", msg)
	}
}

func TestDialBadRequests(t *testing.T) {
	d := servedDialer(t)
	if _, err := d.Dial(context.Background(), "sctp", netip.MustParseAddrPort("127.0.0.1:1"), netip.AddrPort{}); err == nil || !strings.Contains(err.Error(), "unknown protocol") {
		t.Fatalf("Dial sctp: %v", err)
	}
	// Past the parent's checks, the child answers with an error too.
	if _, err := d.Dial(context.Background(), "tcp", netip.AddrPort{}, netip.AddrPort{}); err == nil || !strings.Contains(err.Error(), "no address") {
		t.Fatalf("Dial with no address: %v", err)
	}
}

// TestServeChildSurvivesJunk: a malformed request is dropped, the next one
// is served.
func TestServeChildSurvivesJunk(t *testing.T) {
	p, c := wirePair(t)
	done := make(chan error, 1)
	go func() { done <- ServeChild(context.Background(), c, ChildConfig{Logger: testLogger(t)}) }()
	if err := p.Send(map[string]any{"id": "not a number"}); err != nil {
		t.Fatal(err)
	}
	ln := listenTCP(t)
	if err := p.Send(dialRequest{ID: 7, Proto: "tcp", Addr: addrOf(ln.Addr())}); err != nil {
		t.Fatal(err)
	}
	var rep dialReply
	files, err := p.Recv(&rep)
	if err != nil || rep.ID != 7 || rep.Error != "" || len(files) != 1 {
		t.Fatalf("reply %+v with %d files, %v; want id 7, one file", rep, len(files), err)
	}
	wire.CloseFiles(files)
	p.Close()
	if err := <-done; err != nil {
		t.Fatalf("ServeChild after the parent closed: %v; want nil", err)
	}
}

// fakeChild answers requests by hand.
func fakeChild(t *testing.T) (*Dialer, *wire.Conn) {
	p, c := wirePair(t)
	d := NewDialer(p)
	d.Start()
	t.Cleanup(func() { d.Close() })
	return d, c
}

// TestDialOutOfOrder: replies coming back in reverse order reach the right
// Dials.
func TestDialOutOfOrder(t *testing.T) {
	d, child := fakeChild(t)
	const n = 5
	var targets [n]netip.AddrPort
	for i := range targets {
		targets[i] = addrOf(listenTCP(t).Addr())
	}
	type result struct {
		i    int
		conn net.Conn
		err  error
	}
	results := make(chan result, n)
	for i := range n {
		go func() {
			c, err := d.Dial(context.Background(), "tcp", targets[i], netip.AddrPort{})
			results <- result{i, c, err}
		}()
	}
	var reqs []dialRequest
	for range n {
		var req dialRequest
		if _, err := child.Recv(&req); err != nil {
			t.Fatal(err)
		}
		reqs = append(reqs, req)
	}
	for i := len(reqs) - 1; i >= 0; i-- {
		f := dialFile(t, reqs[i])
		if err := child.Send(dialReply{ID: reqs[i].ID}, f); err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	for range n {
		r := <-results
		if r.err != nil {
			t.Fatalf("Dial %d: %v", r.i, r.err)
		}
		if got := addrOf(r.conn.RemoteAddr()); got != targets[r.i] {
			t.Errorf("Dial %d of %s got a connection to %s", r.i, targets[r.i], got)
		}
		r.conn.Close()
	}
}

func TestDialContextEnds(t *testing.T) {
	d, child := fakeChild(t)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	ln := listenTCP(t)
	_, err := d.Dial(ctx, "tcp", addrOf(ln.Addr()), netip.AddrPort{})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Dial with no answer: %v; want the context's deadline", err)
	}
	// A late answer is dropped (its descriptor closed), and the Dialer
	// still works.
	var req dialRequest
	if _, err := child.Recv(&req); err != nil {
		t.Fatal(err)
	}
	f := dialFile(t, req)
	child.Send(dialReply{ID: req.ID}, f)
	f.Close()
	go func() {
		var req dialRequest
		if _, err := child.Recv(&req); err == nil {
			child.Send(dialReply{ID: req.ID, Error: "connect: connection refused", Errno: int(syscall.ECONNREFUSED)})
		}
	}()
	if _, err := d.Dial(context.Background(), "tcp", addrOf(ln.Addr()), netip.AddrPort{}); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("the next Dial: %v; want the child's ECONNREFUSED", err)
	}
}

func TestDialerCloseFailsPending(t *testing.T) {
	d, child := fakeChild(t)
	errc := make(chan error, 1)
	go func() {
		_, err := d.Dial(context.Background(), "tcp", netip.MustParseAddrPort("127.0.0.1:1"), netip.AddrPort{})
		errc <- err
	}()
	// The child has the request and never answers: the Dial is pending.
	var req dialRequest
	if _, err := child.Recv(&req); err != nil {
		t.Fatalf("the child got no request: %v", err)
	}
	select {
	case err := <-errc:
		t.Fatalf("Dial returned %v with no answer from the child", err)
	default:
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-errc:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("pending Dial after Close: %v; want net.ErrClosed", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("a pending Dial did not end with Close")
	}
	if _, err := d.Dial(context.Background(), "tcp", netip.MustParseAddrPort("127.0.0.1:1"), netip.AddrPort{}); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Dial after Close: %v", err)
	}
	d.Close() // idempotent
}

func TestDialerChildGone(t *testing.T) {
	d, child := fakeChild(t)
	errc := make(chan error, 1)
	go func() {
		_, err := d.Dial(context.Background(), "tcp", netip.MustParseAddrPort("127.0.0.1:1"), netip.AddrPort{})
		errc <- err
	}()
	var req dialRequest
	child.Recv(&req)
	child.Close()
	if err := <-errc; !errors.Is(err, io.EOF) || !strings.Contains(err.Error(), "child") {
		t.Fatalf("Dial when the child goes away: %v; want io.EOF and a word about the child", err)
	}
	if _, err := d.Dial(context.Background(), "tcp", netip.MustParseAddrPort("127.0.0.1:1"), netip.AddrPort{}); !errors.Is(err, io.EOF) {
		t.Fatalf("Dial after the child went away: %v", err)
	}
}

func TestDialerNotStarted(t *testing.T) {
	p, _ := wirePair(t)
	d := NewDialer(p)
	if _, err := d.Dial(context.Background(), "tcp", netip.MustParseAddrPort("127.0.0.1:1"), netip.AddrPort{}); err == nil || !strings.Contains(err.Error(), "Start") {
		t.Fatalf("Dial before Start: %v", err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	d.Start() // after Close: does nothing
}

func TestServeChildContextEnds(t *testing.T) {
	_, c := wirePair(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- ServeChild(ctx, c, ChildConfig{}) }()
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("ServeChild after cancel: %v", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("ServeChild did not return after its context ended")
	}
}

// TestWireSendKeepsNonblocking is the regression test for the wire fix:
// sending a net.Conn's file must not switch the connection (whose open file
// description the file shares) to blocking mode.
func TestWireSendKeepsNonblocking(t *testing.T) {
	p, c := wirePair(t)
	ln := listenTCP(t)
	conn, err := net.DialTCP("tcp4", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	f, err := conn.File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := p.Send(dialReply{ID: 1}, f); err != nil {
		t.Fatal(err)
	}
	var rep dialReply
	files, err := c.Recv(&rep)
	if err != nil {
		t.Fatal(err)
	}
	wire.CloseFiles(files)
	rc, _ := conn.SyscallConn()
	var flags int
	rc.Control(func(fd uintptr) { flags, err = unix.FcntlInt(fd, unix.F_GETFL, 0) })
	if err != nil {
		t.Fatal(err)
	}
	if flags&unix.O_NONBLOCK == 0 {
		t.Fatal("wire.Send cleared O_NONBLOCK on the connection it sent a file of")
	}
}

// TestDialerMalformedRepliesFreeSlots: a reply the Dialer cannot decode
// still answers a request, so its slot is free again: a slot lost for
// good to each would leave, after 256 malformed replies, every Dial
// waiting for its context, as the last one here would.
func TestDialerMalformedRepliesFreeSlots(t *testing.T) {
	d, child := fakeChild(t)
	target := addrOf(listenTCP(t).Addr())
	answered := make(chan struct{})
	go func() {
		for i := 0; ; i++ {
			var req dialRequest
			if _, err := child.Recv(&req); err != nil {
				return
			}
			if i < maxChildDials {
				child.Send(map[string]any{"id": "not a number"}) // a type error for the Dialer
				if i == maxChildDials-1 {
					close(answered)
				}
				continue
			}
			f := dialFile(t, req)
			child.Send(dialReply{ID: req.ID}, f)
			f.Close()
		}
	}()
	// Every slot taken by a Dial whose reply is garbage; they end with
	// their contexts once all the garbage has been sent.
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for range maxChildDials {
		wg.Go(func() {
			if _, err := d.Dial(ctx, "tcp", target, netip.AddrPort{}); !errors.Is(err, context.Canceled) {
				t.Errorf("a Dial answered with garbage: %v, want context.Canceled", err)
			}
		})
	}
	<-answered
	cancel()
	wg.Wait()
	ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := d.Dial(ctx, "tcp", target, netip.AddrPort{})
	if err != nil {
		t.Fatalf("a Dial after %d malformed replies: %v", maxChildDials, err)
	}
	c.Close()
}

// here runs fn in this test's own network namespace.
func here(fn func() error) error { return fn() }
