// Package portfwdtest is a conformance suite for portfwd.Manager, in the
// manner of RootlessKit's pkg/port/testsuite: one set of tests that every
// way of reaching the child must pass. portfwd's tests run it over the
// real dial protocol (WireChild: ServeChild and a Dialer on a socket pair
// in this process) and over a plain in-process dialer (InProcessChild).
// Env and its helpers are what the suites build on; package api's tests
// run the REST API's conformance subtests over them. All traffic stays on
// loopback.
package portfwdtest

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gonetns/gonetns/internal/e2etest"
	"github.com/gonetns/gonetns/port"
	"github.com/gonetns/gonetns/portfwd"
)

// Child is the namespace side of one conformance test.
type Child struct {
	// Dialer connects inside the child's network namespace; the suite gives
	// it to the Manager under test.
	Dialer portfwd.ChildDialer
	// Listen and ListenPacket open sockets in the child's network
	// namespace, for the suite's servers (net.Listen and net.ListenPacket
	// when the child shares the test's namespace; the real child can pass
	// listening sockets up the way it passes connected ones).
	Listen       func(network, address string) (net.Listener, error)
	ListenPacket func(network, address string) (net.PacketConn, error)
}

// Factory makes a fresh Child for one test and registers its teardown with
// t.Cleanup. The suite closes its Manager before that teardown runs.
type Factory func(t *testing.T) Child

// Timeouts of the suite. They bound hangs; nothing asserts on speed except
// "promptly", which is PromptBound.
const (
	PromptBound = 2 * time.Second
	IOTimeout   = 60 * time.Second
	udpIdle     = 2 * time.Second
	bigTransfer = 50 << 20
)

var (
	loop4 = netip.MustParseAddr("127.0.0.1")
	loop6 = netip.IPv6Loopback()
)

// Run runs the whole suite.
func Run(t *testing.T, newChild Factory) {
	t.Run("TCPEcho", func(t *testing.T) { testTCPEcho(t, newChild) })
	t.Run("TCPHalfClose", func(t *testing.T) { testHalfClose(t, newChild) })
	t.Run("TCPHalfCloseFromServer", func(t *testing.T) { testHalfCloseFromServer(t, newChild) })
	t.Run("TCPTransfer50MB", func(t *testing.T) { testTransfer(t, newChild) })
	t.Run("TCPResetFromServer", func(t *testing.T) { testResetFromServer(t, newChild) })
	t.Run("TCPResetFromClient", func(t *testing.T) { testResetFromClient(t, newChild) })
	t.Run("TCPInnerRefused", func(t *testing.T) { testInnerRefused(t, newChild) })
	t.Run("UDPTwoClients", func(t *testing.T) { testUDPTwoClients(t, newChild) })
	t.Run("UDPLargeDatagram", func(t *testing.T) { testUDPLarge(t, newChild) })
	t.Run("HostPortInUse", func(t *testing.T) { testHostPortInUse(t, newChild) })
	t.Run("Conflicts", func(t *testing.T) { testConflicts(t, newChild) })
	t.Run("CloseEndsEverything", func(t *testing.T) { testClose(t, newChild) })
}

// Logger returns a logger that writes to t.Log, at Debug level.
func Logger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

// Env is one test's Manager and child.
type Env struct {
	T     *testing.T
	Child Child
	M     *portfwd.Manager
}

// NewEnv makes a Child and a Manager over it. The cleanup closes the
// Manager and fails t if a goroutine of it is left behind.
func NewEnv(t *testing.T, newChild Factory) *Env {
	t.Helper()
	child := newChild(t)
	m := portfwd.NewManager(portfwd.Config{
		Dialer:         child.Dialer,
		Logger:         Logger(t),
		UDPIdleTimeout: udpIdle,
	})
	t.Cleanup(func() {
		if err := m.Close(); err != nil {
			t.Errorf("Manager.Close: %v", err)
		}
		CheckNoGoroutines(t, ManagerGoroutine)
	})
	return &Env{T: t, Child: child, M: m}
}

// ManagerGoroutine matches the stack of a goroutine that belongs to a
// portfwd.Manager (a port's loop, a relay, a UDP flow).
func ManagerGoroutine(stack string) bool {
	for _, f := range []string{"portfwd.(*Manager)", "portfwd.(*tcpPort)", "portfwd.(*tcpRelay)", "portfwd.(*udpPort)", "portfwd.(*udpFlow)"} {
		if strings.Contains(stack, "gonetns/"+f) {
			return true
		}
	}
	return false
}

// CheckNoGoroutines fails t if a goroutine whose stack matches is still
// there after PromptBound (goroutines that have signalled their end may take
// a moment to exit).
func CheckNoGoroutines(t testing.TB, match func(stack string) bool) {
	t.Helper()
	var left []string
	for deadline := time.Now().Add(PromptBound); ; {
		left = left[:0]
		buf := make([]byte, 4<<20)
		buf = buf[:runtime.Stack(buf, true)]
		for g := range strings.SplitSeq(string(buf), "\n\n") {
			if match(g) {
				left = append(left, g)
			}
		}
		if len(left) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if len(left) > 0 {
		t.Errorf("%d goroutines left behind:\n\n%s", len(left), strings.Join(left, "\n\n"))
	}
}

// Publish adds spec with a free parent port (spec.ParentPort is chosen
// here), retrying if another program takes the port in between.
func (e *Env) Publish(spec port.Spec) port.Status {
	e.T.Helper()
	for attempt := 0; ; attempt++ {
		spec.ParentPort = e2etest.FreePort(e.T)
		st, err := e.M.AddPort(context.Background(), spec)
		if err == nil {
			return st
		}
		if !errors.Is(err, syscall.EADDRINUSE) || attempt == 10 {
			e.T.Fatalf("AddPort(%s): %v", spec, err)
		}
	}
}

// parentIPOf is where a client of spec connects.
func parentIPOf(spec port.Spec) netip.Addr {
	switch {
	case spec.ParentIP.IsValid():
		return spec.ParentIP
	case strings.HasSuffix(spec.Proto, "6"):
		return loop6
	}
	return loop4
}

// ParentAddr is where a client on this host reaches st.
func ParentAddr(st port.Status) netip.AddrPort {
	return netip.AddrPortFrom(parentIPOf(st.Spec), uint16(st.Spec.ParentPort))
}

// TCPServer listens in the child on ip and runs handle for each
// connection; the cleanup closes the listener and the connections and
// waits for the handlers.
func (e *Env) TCPServer(ip netip.Addr, handle func(c *net.TCPConn)) netip.AddrPort {
	e.T.Helper()
	ln, err := e.Child.Listen("tcp", netip.AddrPortFrom(ip, 0).String())
	if err != nil {
		e.T.Fatalf("listen in the child on %s: %v", ip, err)
	}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		conns = map[net.Conn]bool{}
	)
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns[c] = true
			mu.Unlock()
			wg.Go(func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(IOTimeout))
				handle(c.(*net.TCPConn))
			})
		}
	})
	e.T.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return netip.MustParseAddrPort(ln.Addr().String())
}

// Echo copies a connection back to itself, then passes the EOF on.
func Echo(c *net.TCPConn) {
	io.Copy(c, c)
	c.CloseWrite()
}

// udpServer runs in the child on ip: "whoami" is answered with the
// sender's address as the server sees it, anything else is echoed.
func (e *Env) udpServer(ip netip.Addr) netip.AddrPort {
	e.T.Helper()
	pc, err := e.Child.ListenPacket("udp", netip.AddrPortFrom(ip, 0).String())
	if err != nil {
		e.T.Fatalf("listen for UDP in the child on %s: %v", ip, err)
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		buf := make([]byte, 65536)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				continue
			}
			reply := buf[:n]
			if string(reply) == "whoami" {
				reply = []byte(from.String())
			}
			pc.WriteTo(reply, from)
		}
	})
	e.T.Cleanup(func() {
		pc.Close()
		wg.Wait()
	})
	return netip.MustParseAddrPort(pc.LocalAddr().String())
}

// DialTCP connects to addr with IOTimeout as the deadline of everything;
// the cleanup closes the connection.
func DialTCP(t testing.TB, addr netip.AddrPort) *net.TCPConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr.String(), IOTimeout)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	c.SetDeadline(time.Now().Add(IOTimeout))
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// RoundTrip writes msg and reads as many bytes back.
func RoundTrip(t testing.TB, c net.Conn, msg string) {
	t.Helper()
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatalf("write: %v", err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("read the Echo of %q: %v", msg, err)
	}
	if string(got) != msg {
		t.Fatalf("echo: got %q, want %q", got, msg)
	}
}

func testTCPEcho(t *testing.T, newChild Factory) {
	cases := []struct {
		name     string
		proto    string
		parentIP netip.Addr // zero: all addresses (dual-stack); clients still use loopback
		childIP  netip.Addr
		clients  []netip.Addr
	}{
		{"tcp4", "tcp4", loop4, netip.Addr{}, []netip.Addr{loop4}},
		{"tcp6", "tcp6", loop6, netip.Addr{}, []netip.Addr{loop6}},
		{"tcp-explicit-child", "tcp", loop4, loop4, []netip.Addr{loop4}},
		{"tcp-v6-parent-v4-child", "tcp", loop6, loop4, []netip.Addr{loop6}},
		{"tcp-dual-stack", "tcp", netip.Addr{}, netip.Addr{}, []netip.Addr{loop4, loop6}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := NewEnv(t, newChild)
			serverIP := tc.childIP
			if !serverIP.IsValid() {
				serverIP = loop4
				if strings.HasSuffix(tc.proto, "6") {
					serverIP = loop6
				}
			}
			srv := e.TCPServer(serverIP, Echo)
			st := e.Publish(port.Spec{Proto: tc.proto, ParentIP: tc.parentIP, ChildIP: tc.childIP, ChildPort: int(srv.Port())})
			for _, ip := range tc.clients {
				c := DialTCP(t, netip.AddrPortFrom(ip, uint16(st.Spec.ParentPort)))
				RoundTrip(t, c, "hello through "+st.Spec.String())
				RoundTrip(t, c, "and again")
				c.CloseWrite()
				if rest, err := io.ReadAll(c); err != nil || len(rest) != 0 {
					t.Fatalf("after CloseWrite: read %q, %v; want EOF", rest, err)
				}
			}
		})
	}
}

// testHalfClose: the client sends, shuts its side down, and still gets the
// answer the server writes only after seeing that EOF.
func testHalfClose(t *testing.T, newChild Factory) {
	e := NewEnv(t, newChild)
	srv := e.TCPServer(loop4, func(c *net.TCPConn) {
		req, err := io.ReadAll(c) // until the client's FIN
		if err != nil {
			return
		}
		fmt.Fprintf(c, "after your EOF: %s", req)
	})
	st := e.Publish(port.Spec{Proto: "tcp4", ParentIP: loop4, ChildPort: int(srv.Port())})
	c := DialTCP(t, ParentAddr(st))
	io.WriteString(c, "ping")
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read the reply after CloseWrite: %v", err)
	}
	if want := "after your EOF: ping"; string(got) != want {
		t.Fatalf("got %q, want %q", got, want)
	}
}

// testHalfCloseFromServer: the server shuts its side down first; the
// client still sends, and the server still receives.
func testHalfCloseFromServer(t *testing.T, newChild Factory) {
	e := NewEnv(t, newChild)
	received := make(chan string, 1)
	srv := e.TCPServer(loop4, func(c *net.TCPConn) {
		io.WriteString(c, "banner")
		c.CloseWrite()
		b, _ := io.ReadAll(c)
		received <- string(b)
	})
	st := e.Publish(port.Spec{Proto: "tcp4", ParentIP: loop4, ChildPort: int(srv.Port())})
	c := DialTCP(t, ParentAddr(st))
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "banner" {
		t.Fatalf("read until the server's EOF: %q, %v; want \"banner\"", got, err)
	}
	io.WriteString(c, "still talking")
	c.CloseWrite()
	select {
	case s := <-received:
		if s != "still talking" {
			t.Fatalf("server received %q after its CloseWrite, want \"still talking\"", s)
		}
	case <-time.After(IOTimeout):
		t.Fatal("the server never got the client's data and EOF")
	}
}

// Pattern returns n pseudo-random bytes, the same for the same seed.
func Pattern(seed uint64, n int64) io.Reader {
	var s [32]byte
	binary.LittleEndian.PutUint64(s[:], seed)
	return io.LimitReader(rand.NewChaCha8(s), n)
}

// SumOf is the SHA-256 of what r reads.
func SumOf(r io.Reader) [32]byte {
	h := sha256.New()
	io.Copy(h, r)
	return [32]byte(h.Sum(nil))
}

// testTransfer sends 50 MB each way at once and compares digests.
func testTransfer(t *testing.T, newChild Factory) {
	e := NewEnv(t, newChild)
	type result struct {
		sum [32]byte
		n   int64
		err error
	}
	serverGot := make(chan result, 1)
	srv := e.TCPServer(loop4, func(c *net.TCPConn) {
		var wg sync.WaitGroup
		wg.Go(func() {
			io.Copy(c, Pattern(2, bigTransfer))
			c.CloseWrite()
		})
		h := sha256.New()
		n, err := io.Copy(h, c)
		wg.Wait()
		serverGot <- result{[32]byte(h.Sum(nil)), n, err}
	})
	st := e.Publish(port.Spec{Proto: "tcp4", ParentIP: loop4, ChildPort: int(srv.Port())})
	c := DialTCP(t, ParentAddr(st))
	var wg sync.WaitGroup
	var werr error
	wg.Go(func() {
		if _, werr = io.Copy(c, Pattern(1, bigTransfer)); werr == nil {
			werr = c.CloseWrite()
		}
	})
	h := sha256.New()
	n, err := io.Copy(h, c)
	wg.Wait()
	if werr != nil {
		t.Fatalf("client write: %v", werr)
	}
	if err != nil || n != bigTransfer {
		t.Fatalf("client read %d bytes, %v; want %d", n, err, bigTransfer)
	}
	if got, want := [32]byte(h.Sum(nil)), SumOf(Pattern(2, bigTransfer)); got != want {
		t.Fatalf("server -> client: sha256 %x, want %x", got, want)
	}
	r := <-serverGot
	if r.err != nil || r.n != bigTransfer {
		t.Fatalf("server read %d bytes, %v; want %d", r.n, r.err, bigTransfer)
	}
	if want := SumOf(Pattern(1, bigTransfer)); r.sum != want {
		t.Fatalf("client -> server: sha256 %x, want %x", r.sum, want)
	}
}

// isReset reports a connection reset as seen by a reader.
func isReset(err error) bool { return errors.Is(err, syscall.ECONNRESET) }

func testResetFromServer(t *testing.T, newChild Factory) {
	e := NewEnv(t, newChild)
	srv := e.TCPServer(loop4, func(c *net.TCPConn) {
		b := make([]byte, 1)
		io.ReadFull(c, b)
		c.SetLinger(0)
		c.Close()
	})
	st := e.Publish(port.Spec{Proto: "tcp4", ParentIP: loop4, ChildPort: int(srv.Port())})
	c := DialTCP(t, ParentAddr(st))
	c.SetDeadline(time.Now().Add(IOTimeout))
	io.WriteString(c, "x")
	_, err := c.Read(make([]byte, 1))
	if !isReset(err) {
		t.Fatalf("after the server's reset, the client read: %v; want ECONNRESET", err)
	}
}

func testResetFromClient(t *testing.T, newChild Factory) {
	e := NewEnv(t, newChild)
	serverErr := make(chan error, 1)
	gotByte := make(chan struct{})
	srv := e.TCPServer(loop4, func(c *net.TCPConn) {
		b := make([]byte, 1)
		if _, err := io.ReadFull(c, b); err != nil {
			serverErr <- err
			return
		}
		close(gotByte)
		_, err := c.Read(b)
		serverErr <- err
	})
	st := e.Publish(port.Spec{Proto: "tcp4", ParentIP: loop4, ChildPort: int(srv.Port())})
	c := DialTCP(t, ParentAddr(st))
	io.WriteString(c, "x")
	select {
	case <-gotByte:
	case err := <-serverErr:
		t.Fatalf("server read: %v", err)
	}
	c.SetLinger(0)
	c.Close()
	if err := <-serverErr; !isReset(err) {
		t.Fatalf("after the client's reset, the server read: %v; want ECONNRESET", err)
	}
}

// testInnerRefused: nothing listens at CHILDPORT, so the client's
// connection is reset at once (a FIN would look like a server that
// accepted and hung up).
func testInnerRefused(t *testing.T, newChild Factory) {
	e := NewEnv(t, newChild)
	ln, err := e.Child.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closedPort := netip.MustParseAddrPort(ln.Addr().String()).Port()
	ln.Close()
	st := e.Publish(port.Spec{Proto: "tcp4", ParentIP: loop4, ChildPort: int(closedPort)})
	for i := range 3 {
		start := time.Now()
		conn, err := net.DialTimeout("tcp", ParentAddr(st).String(), IOTimeout)
		if isReset(err) {
			// On loopback the reset can beat the dial's own check of the
			// handshake: refused as promptly as it gets.
			continue
		}
		if err != nil {
			t.Fatalf("connection %d: dial: %v", i, err)
		}
		c := conn.(*net.TCPConn)
		defer c.Close()
		c.SetReadDeadline(start.Add(PromptBound))
		n, err := c.Read(make([]byte, 1))
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			t.Fatalf("connection %d: still open %v after the inner refusal; want a prompt reset", i, PromptBound)
		case !isReset(err):
			t.Fatalf("connection %d: read %d bytes, %v; want ECONNRESET (a refusal is a reset, not a FIN)", i, n, err)
		}
	}
}

func testUDPTwoClients(t *testing.T, newChild Factory) {
	for _, tc := range []struct {
		name     string
		proto    string
		parentIP netip.Addr // zero: all addresses (dual-stack); clients still use loopback
		childIP  netip.Addr
		clients  [2]netip.Addr
	}{
		{"udp4", "udp4", loop4, loop4, [2]netip.Addr{loop4, loop4}},
		{"udp6", "udp6", loop6, loop6, [2]netip.Addr{loop6, loop6}},
		{"udp", "udp", loop4, loop4, [2]netip.Addr{loop4, loop4}},
		{"udp-dual-stack", "udp", netip.Addr{}, loop4, [2]netip.Addr{loop4, loop6}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := NewEnv(t, newChild)
			srv := e.udpServer(tc.childIP)
			st := e.Publish(port.Spec{Proto: tc.proto, ParentIP: tc.parentIP, ChildIP: tc.childIP, ChildPort: int(srv.Port())})
			seen := map[string]bool{}
			for i, ip := range tc.clients {
				c := dialUDP(t, netip.AddrPortFrom(ip, uint16(st.Spec.ParentPort)))
				for j := range 3 {
					msg := fmt.Sprintf("client %d datagram %d", i, j)
					if got := udpAsk(t, c, msg); got != msg {
						t.Fatalf("client %d got %q, want its own %q", i, got, msg)
					}
				}
				seen[udpAsk(t, c, "whoami")] = true
			}
			if len(seen) != 2 {
				t.Fatalf("the server saw the two clients as %v; want two flows with their own sockets", seen)
			}
		})
	}
}

func dialUDP(t testing.TB, addr netip.AddrPort) *net.UDPConn {
	t.Helper()
	c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(addr))
	if err != nil {
		t.Fatalf("dial udp %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// udpAsk sends msg and returns the answer, resending a few times: UDP may
// drop a datagram, even on loopback, when a buffer is full.
func udpAsk(t testing.TB, c *net.UDPConn, msg string) string {
	t.Helper()
	buf := make([]byte, 65536)
	for range 10 {
		if _, err := c.Write([]byte(msg)); err != nil {
			t.Fatalf("udp write: %v", err)
		}
		c.SetReadDeadline(time.Now().Add(PromptBound))
		n, err := c.Read(buf)
		if err == nil {
			return string(buf[:n])
		}
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("udp read: %v", err)
		}
	}
	t.Fatalf("no answer to %q after 10 tries", msg)
	return ""
}

func testUDPLarge(t *testing.T, newChild Factory) {
	e := NewEnv(t, newChild)
	srv := e.udpServer(loop4)
	st := e.Publish(port.Spec{Proto: "udp4", ParentIP: loop4, ChildPort: int(srv.Port())})
	c := dialUDP(t, ParentAddr(st))
	msg := make([]byte, 65507) // the largest UDP payload over IPv4
	io.ReadFull(Pattern(3, int64(len(msg))), msg)
	if got := udpAsk(t, c, string(msg)); got != string(msg) {
		t.Fatalf("a %d-byte datagram came back as %d bytes (or changed)", len(msg), len(got))
	}
}

func testHostPortInUse(t *testing.T, newChild Factory) {
	e := NewEnv(t, newChild)
	srv := e.TCPServer(loop4, Echo)
	good := e.Publish(port.Spec{Proto: "tcp4", ParentIP: loop4, ChildPort: int(srv.Port())})

	other, err := net.Listen("tcp4", "127.0.0.1:0") // "another program"
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	busy := netip.MustParseAddrPort(other.Addr().String())
	spec := port.Spec{Proto: "tcp4", ParentIP: loop4, ParentPort: int(busy.Port()), ChildPort: int(srv.Port())}
	_, err = e.M.AddPort(context.Background(), spec)
	if !errors.Is(err, syscall.EADDRINUSE) || !strings.Contains(err.Error(), busy.String()) || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("AddPort on a busy host port: %v; want EADDRINUSE naming %s", err, busy)
	}
	if ports := e.M.ListPorts(); len(ports) != 1 {
		t.Fatalf("ports: %v; want only %v", ports, good)
	}
	RoundTrip(t, DialTCP(t, ParentAddr(good)), "the earlier port still works")
}

func testConflicts(t *testing.T, newChild Factory) {
	e := NewEnv(t, newChild)
	srv := e.TCPServer(loop4, Echo)
	first := e.Publish(port.Spec{Proto: "tcp4", ParentIP: loop4, ChildPort: int(srv.Port())})
	pn := first.Spec.ParentPort
	for _, spec := range []port.Spec{
		{Proto: "tcp4", ParentIP: loop4, ParentPort: pn, ChildPort: 1}, // the same
		{Proto: "tcp", ParentIP: loop4, ParentPort: pn, ChildPort: 2},  // tcp vs tcp4, same address
		{Proto: "tcp", ParentPort: pn, ChildPort: 3},                   // all addresses include 127.0.0.1
		{Proto: "tcp4", ParentPort: pn, ChildPort: 4},                  // 0.0.0.0 includes 127.0.0.1
		{Proto: "tcp4", ParentIP: netip.IPv4Unspecified(), ParentPort: pn, ChildPort: 5},
	} {
		_, err := e.M.AddPort(context.Background(), spec)
		if !errors.Is(err, port.ErrConflict) || !strings.Contains(err.Error(), "ID "+strconv.Itoa(first.ID)) {
			t.Errorf("AddPort(%s) over %s: %v; want ErrConflict naming ID %d", spec, first.Spec, err, first.ID)
		}
	}
	// UDP on the same number is another port.
	if _, err := e.M.AddPort(context.Background(), port.Spec{Proto: "udp4", ParentIP: loop4, ParentPort: pn, ChildPort: 9}); err != nil &&
		!errors.Is(err, syscall.EADDRINUSE) {
		t.Errorf("udp4 on the port number of a tcp4 port: %v", err)
	}
	RoundTrip(t, DialTCP(t, ParentAddr(first)), "unaffected")
}

// testClose: Close resets relayed connections, ends UDP flows, refuses new
// work and leaves no goroutine (the cleanup checks that).
func testClose(t *testing.T, newChild Factory) {
	e := NewEnv(t, newChild)
	tsrv := e.TCPServer(loop4, Echo)
	usrv := e.udpServer(loop4)
	tst := e.Publish(port.Spec{Proto: "tcp4", ParentIP: loop4, ChildPort: int(tsrv.Port())})
	ust := e.Publish(port.Spec{Proto: "udp4", ParentIP: loop4, ChildPort: int(usrv.Port())})
	c := DialTCP(t, ParentAddr(tst))
	RoundTrip(t, c, "before close")
	u := dialUDP(t, ParentAddr(ust))
	udpAsk(t, u, "before close")

	if err := e.M.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	c.SetReadDeadline(time.Now().Add(PromptBound))
	if _, err := c.Read(make([]byte, 1)); errors.Is(err, os.ErrDeadlineExceeded) || err == nil {
		t.Fatalf("a relayed connection after Close: read %v; want it reset", err)
	}
	if _, err := net.DialTimeout("tcp", ParentAddr(tst).String(), IOTimeout); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("dial after Close: %v; want ECONNREFUSED", err)
	}
	if _, err := e.M.AddPort(context.Background(), tst.Spec); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("AddPort after Close: %v; want net.ErrClosed", err)
	}
	if err := e.M.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if ports := e.M.ListPorts(); len(ports) != 0 {
		t.Fatalf("ports after Close: %v", ports)
	}
	CheckNoGoroutines(t, ManagerGoroutine)
}
