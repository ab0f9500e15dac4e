package api

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"testing"

	"github.com/gonetns/gonetns/internal/e2etest"
	"github.com/gonetns/gonetns/port"
	"github.com/gonetns/gonetns/portfwd"
)

// The API is tested over a real portfwd.Manager whose "namespace" is this
// test's own: the child side dials with a plain net.Dialer.
type netDialer struct{}

func (netDialer) Dial(ctx context.Context, proto string, addr, _ netip.AddrPort) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, proto, addr.String())
}

var ip4 = netip.MustParseAddr("127.0.0.1")

// newTestManager returns a Manager closed at cleanup.
func newTestManager(t testing.TB) *portfwd.Manager {
	t.Helper()
	m := portfwd.NewManager(portfwd.Config{Dialer: netDialer{}, Logger: slog.New(slog.DiscardHandler)})
	t.Cleanup(func() { m.Close() })
	return m
}

// shortDir is a temporary directory with a path short enough for a unix
// socket (sun_path has 108 bytes; t.TempDir can be longer).
func shortDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "api")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// publishLoop publishes proto from 127.0.0.1:free to child, retrying if
// the free port gets taken.
func publishLoop(t testing.TB, m *portfwd.Manager, proto string, child netip.AddrPort) port.Status {
	t.Helper()
	for attempt := 0; ; attempt++ {
		st, err := m.AddPort(context.Background(), port.Spec{Proto: proto, ParentIP: ip4, ParentPort: e2etest.FreePort(t), ChildIP: child.Addr(), ChildPort: int(child.Port())})
		if err == nil {
			return st
		}
		if !errors.Is(err, syscall.EADDRINUSE) || attempt == 10 {
			t.Fatal(err)
		}
	}
}

// echoServer is a TCP echo server on 127.0.0.1.
func echoServer(t testing.TB) netip.AddrPort {
	t.Helper()
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
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
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// builtinInfo is what the sandbox reports for the builtin port driver.
func builtinInfo() *PortDriverInfo {
	return &PortDriverInfo{Driver: "builtin", Protos: []string{"tcp", "tcp4", "tcp6", "udp", "udp4", "udp6"}}
}
