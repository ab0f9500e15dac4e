package implicit

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
	"testing"
	"time"

	"github.com/gonetns/gonetns/internal/wire"
	"github.com/gonetns/gonetns/portfwd"
)

// The driver is tested over a real portfwd.Manager whose "namespace" is
// this process's: its dialer connects on 127.0.0.1.

var ip4 = netip.MustParseAddr("127.0.0.1")

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

// here runs fn in this process's namespace (WatchConfig.InNetNS).
func here(fn func() error) error { return fn() }

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

// dialFunc is a portfwd.ChildDialer that ignores the client's address.
type dialFunc func(ctx context.Context, proto string, addr netip.AddrPort) (net.Conn, error)

func (f dialFunc) Dial(ctx context.Context, proto string, addr, _ netip.AddrPort) (net.Conn, error) {
	return f(ctx, proto, addr)
}

func netDial(ctx context.Context, proto string, addr netip.AddrPort) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, proto, addr.String())
}

// newTestManager returns a Manager closed at cleanup.
func newTestManager(t testing.TB, cfg portfwd.Config) *portfwd.Manager {
	t.Helper()
	m := portfwd.NewManager(cfg)
	t.Cleanup(func() { m.Close() })
	return m
}

func addrOf(a net.Addr) netip.AddrPort { return netip.MustParseAddrPort(a.String()) }

func listenTCP(t testing.TB) *net.TCPListener {
	t.Helper()
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// echoServer echoes every TCP connection on 127.0.0.1 until cleanup.
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

func listenUDP(t testing.TB, addr string) *net.UDPConn {
	t.Helper()
	pc, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.MustParseAddrPort(addr)))
	if err != nil {
		t.Fatal(err)
	}
	return pc
}

// udpWhoami echoes datagrams on pc, and answers "whoami" with the
// sender's address, until cleanup.
func udpWhoami(t testing.TB, pc *net.UDPConn) netip.AddrPort {
	t.Helper()
	var wg sync.WaitGroup
	wg.Go(func() {
		buf := make([]byte, 65536)
		for {
			n, from, err := pc.ReadFromUDPAddrPort(buf)
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
			pc.WriteToUDPAddrPort(reply, from)
		}
	})
	t.Cleanup(func() { pc.Close(); wg.Wait() })
	return addrOf(pc.LocalAddr())
}

// udpClient is a UDP socket connected to a published port's host side.
func udpClient(t testing.TB, parent netip.AddrPort) *net.UDPConn {
	t.Helper()
	c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(parent))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// ask sends msg and waits up to wait for an answer; "" if none came.
func ask(t testing.TB, c *net.UDPConn, msg string, wait time.Duration) string {
	t.Helper()
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 65536)
	c.SetReadDeadline(time.Now().Add(wait))
	n, err := c.Read(buf)
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return ""
		}
		t.Fatal(err)
	}
	return string(buf[:n])
}
