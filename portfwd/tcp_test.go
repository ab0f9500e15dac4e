package portfwd

import (
	"bufio"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gonetns/gonetns/port"
)

// dialFunc is an in-process ChildDialer.
var ip4 = netip.MustParseAddr("127.0.0.1")

type dialFunc func(ctx context.Context, proto string, addr netip.AddrPort) (net.Conn, error)

func (f dialFunc) Dial(ctx context.Context, proto string, addr, _ netip.AddrPort) (net.Conn, error) {
	return f(ctx, proto, addr)
}

func netDial(ctx context.Context, proto string, addr netip.AddrPort) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, proto, addr.String())
}

// newTestManager returns a Manager closed at cleanup.
func newTestManager(t testing.TB, cfg Config) *Manager {
	t.Helper()
	if cfg.Dialer == nil {
		cfg.Dialer = dialFunc(netDial)
	}
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	m := NewManager(cfg)
	t.Cleanup(func() { m.Close() })
	return m
}

// publishLoop publishes proto from 127.0.0.1:free to child, retrying if
// the free port gets taken.
func publishLoop(t testing.TB, m *Manager, proto string, child netip.AddrPort) port.Status {
	t.Helper()
	for attempt := 0; ; attempt++ {
		var pn int
		if strings.HasPrefix(proto, "tcp") {
			ln, err := net.Listen("tcp4", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			pn = ln.Addr().(*net.TCPAddr).Port
			ln.Close()
		} else {
			pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			pn = pc.LocalAddr().(*net.UDPAddr).Port
			pc.Close()
		}
		st, err := m.AddPort(context.Background(), port.Spec{Proto: proto, ParentIP: ip4, ParentPort: pn, ChildIP: child.Addr(), ChildPort: int(child.Port())})
		if err == nil {
			return st
		}
		if !errors.Is(err, syscall.EADDRINUSE) || attempt == 10 {
			t.Fatal(err)
		}
	}
}

func hostAddr(st port.Status) string {
	return netip.AddrPortFrom(st.Spec.ParentIP, uint16(st.Spec.ParentPort)).String()
}

// echoServer is a TCP echo server on 127.0.0.1.
func echoServer(t testing.TB) netip.AddrPort {
	t.Helper()
	ln := listenTCP(t)
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				io.Copy(c, c)
				c.CloseWrite()
			})
		}
	})
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	return addrOf(ln.Addr())
}

// TestTCPConnLimit: beyond MaxTCPConns, counted over all published ports,
// a new connection is reset at once; when a relay ends, its slot is free
// again.
func TestTCPConnLimit(t *testing.T) {
	m := newTestManager(t, Config{MaxTCPConns: 2})
	srv := echoServer(t)
	st, st2 := publishLoop(t, m, "tcp4", srv), publishLoop(t, m, "tcp4", srv)
	var held []net.Conn
	for _, pn := range []port.Status{st, st2} {
		c, err := net.Dial("tcp", hostAddr(pn))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write([]byte("x"))
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
			t.Fatalf("a connection within the limit: %v", err)
		}
		held = append(held, c)
	}
	if c, err := net.Dial("tcp", hostAddr(st)); err == nil {
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		_, err = c.Read(make([]byte, 1))
		c.Close()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatal("a connection beyond MaxTCPConns was left open; want a prompt reset")
		}
	}
	held[0].Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		c, err := net.Dial("tcp", hostAddr(st))
		if err == nil {
			c.Write([]byte("y"))
			c.SetReadDeadline(time.Now().Add(time.Second))
			_, err = io.ReadFull(c, make([]byte, 1))
			c.Close()
			if err == nil {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no slot came free after a relay ended: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestRemovePortKeepsRelays: RemovePort refuses new connections at once,
// and an established relay goes on.
func TestRemovePortKeepsRelays(t *testing.T) {
	m := newTestManager(t, Config{})
	st := publishLoop(t, m, "tcp4", echoServer(t))
	c, err := net.Dial("tcp", hostAddr(st))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	c.Write([]byte("a"))
	io.ReadFull(c, make([]byte, 1))
	if err := m.RemovePort(st.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := net.Dial("tcp", hostAddr(st)); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("dial after RemovePort: %v; want ECONNREFUSED", err)
	}
	c.Write([]byte("b"))
	if b := make([]byte, 1); func() error { _, err := io.ReadFull(c, b); return err }() != nil || b[0] != 'b' {
		t.Fatal("the relay stopped with its port")
	}
	if err := m.RemovePort(st.ID); !errors.Is(err, port.ErrUnknownPort) {
		t.Fatalf("second RemovePort: %v; want ErrUnknownPort", err)
	}
}

func TestListPortsSorted(t *testing.T) {
	m := newTestManager(t, Config{})
	srv := echoServer(t)
	var ids []int
	for range 4 {
		ids = append(ids, publishLoop(t, m, "tcp4", srv).ID)
	}
	m.RemovePort(ids[1])
	ids = append(ids[:1], ids[2:]...)
	var got []int
	for _, st := range m.ListPorts() {
		got = append(got, st.ID)
	}
	if !slices.Equal(got, ids) {
		t.Fatalf("ListPorts IDs %v, want %v", got, ids)
	}
	if ids[0] != 1 {
		t.Fatalf("the first ID is %d, want 1", ids[0])
	}
}

// spliceHelperEnv makes TestSpliceHelper do its transfer; it is set only
// when TestRelayUsesSplice runs this test binary under strace.
const spliceHelperEnv = "PORTFWD_SPLICE_HELPER"

const spliceBytes = 8 << 20

// TestSpliceHelper is TestRelayUsesSplice's traced process: it relays
// spliceBytes through a published port, client to server. Run alone, it
// does nothing.
func TestSpliceHelper(t *testing.T) {
	if os.Getenv(spliceHelperEnv) != "1" {
		return
	}
	m := newTestManager(t, Config{})
	ln := listenTCP(t)
	done := make(chan [32]byte, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		h := sha256.New()
		io.Copy(h, c) // a hash is no socket: no splice here
		done <- [32]byte(h.Sum(nil))
	}()
	st := publishLoop(t, m, "tcp4", addrOf(ln.Addr()))
	c, err := net.Dial("tcp", hostAddr(st))
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, spliceBytes)
	for i := range data {
		data[i] = byte(i * 7)
	}
	if _, err := c.Write(data); err != nil { // a []byte is no socket either
		t.Fatal(err)
	}
	c.(*net.TCPConn).CloseWrite()
	if got := <-done; got != sha256.Sum256(data) {
		t.Fatal("the data changed on the way")
	}
	c.Close()
}

// TestRelayUsesSplice runs TestSpliceHelper under strace and checks that
// the relay moved the data with splice(2): every byte goes through two
// splices (socket to pipe, pipe to socket), and nothing else in the helper
// splices.
func TestRelayUsesSplice(t *testing.T) {
	strace, err := exec.LookPath("strace")
	if err != nil {
		t.Fatalf("strace is needed to check that relays use splice(2), and it is not installed: apt-get install strace (%v)", err)
	}
	out := filepath.Join(t.TempDir(), "strace.txt")
	cmd := exec.Command(strace, "--seccomp-bpf", "-f", "-qq", "-e", "trace=splice", "-o", out,
		os.Args[0], "-test.run=^TestSpliceHelper$", "-test.count=1")
	cmd.Env = append(os.Environ(), spliceHelperEnv+"=1")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("strace %s: %v\n%s", os.Args[0], err, b)
	}
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// 1234  splice(7, NULL, 9, NULL, 1048576, SPLICE_F_NONBLOCK) = 65536
	// or, when threads interleave, "splice(... <unfinished ...>" and later
	// 1234  <... splice resumed>) = 65536
	re := regexp.MustCompile(`splice.*\)\s+=\s+(\d+)$`)
	var calls, moved int64
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if m := re.FindStringSubmatch(sc.Text()); m != nil {
			n, _ := strconv.ParseInt(m[1], 10, 64)
			calls++
			moved += n
		}
	}
	t.Logf("%d splice calls moved %d bytes for a %d-byte transfer", calls, moved, spliceBytes)
	if moved < 2*spliceBytes {
		t.Fatalf("splice(2) moved %d bytes, want at least %d: the relay copies through user space", moved, 2*spliceBytes)
	}
}
