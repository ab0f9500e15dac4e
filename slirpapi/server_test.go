package slirpapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/e2etest"
	"github.com/gonetns/gonetns/portfwd"
)

// hostDialer stands in for the namespace: the forwards' guest addresses
// are this test's own loopback.
type hostDialer struct{}

func (hostDialer) Dial(ctx context.Context, proto string, addr, _ netip.AddrPort) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, proto, addr.String())
}

// testServer serves the API over a real port Manager whose "namespace"
// is the host; guest is the default guest address.
func testServer(t *testing.T, guest, guest6 netip.Addr) (sock string, m *portfwd.Manager) {
	t.Helper()
	dir, err := os.MkdirTemp("", "slirpapi") // short: sun_path has 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	m = portfwd.NewManager(portfwd.Config{Dialer: hostDialer{}})
	t.Cleanup(func() { m.Close() })
	sock = filepath.Join(dir, "api.sock")
	ln, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(Config{Ports: m, Guest: guest, Guest6: guest6})
	s.Serve(ln)
	t.Cleanup(func() { s.Close() })
	return sock, m
}

// call sends one request the way slirp4netns's callers do (write, shut
// down writing, read to the end) and returns the answer.
func call(t *testing.T, sock, req string) string {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatal(err)
	}
	c.(*net.UnixConn).CloseWrite()
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("%s: %v", req, err)
	}
	return string(b)
}

// echoServer answers each TCP connection with "hello from guest" and
// returns its port on 127.0.0.1.
func echoServer(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			io.WriteString(c, "hello from guest")
			c.Close()
		}
	}()
	return ln.Addr().(*net.TCPAddr).Port
}

func fetch(addr string) (string, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c)
	return string(b), err
}

func TestServerForwards(t *testing.T) {
	guest := echoServer(t)
	sock, _ := testServer(t, netip.MustParseAddr("127.0.0.1"), netip.Addr{})
	host := e2etest.FreePort(t)
	add := fmt.Sprintf(`{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"127.0.0.1","host_port":%d,"guest_addr":"","guest_port":%d}}`+"\n", host, guest)
	if got := call(t, sock, add); got != `{"return":{"id":1}}` {
		t.Fatalf("add_hostfwd: %s", got)
	}
	if got, err := fetch(fmt.Sprintf("127.0.0.1:%d", host)); got != "hello from guest" {
		t.Errorf("through the forward: %q, %v", got, err)
	}
	// The same host port again: slirp4netns's failure, with the reason.
	if got := call(t, sock, add); !strings.HasPrefix(got, `{"error":{"desc":"bad request: add_hostfwd: slirp_add_hostfwd failed: tcp port `) {
		t.Errorf("add_hostfwd twice: %s", got)
	}
	list := call(t, sock, `{"execute": "list_hostfwd"}`)
	var l struct {
		Entries []listEntry
		Return  struct{ Entries []listEntry }
	}
	if err := json.Unmarshal([]byte(list), &l); err != nil {
		t.Fatalf("list_hostfwd: %s: %v", list, err)
	}
	want := listEntry{ID: 1, Proto: "tcp", HostAddr: "127.0.0.1", HostPort: host, GuestAddr: "127.0.0.1", GuestPort: guest}
	if len(l.Entries) != 1 || l.Entries[0] != want || len(l.Return.Entries) != 1 || l.Return.Entries[0] != want {
		t.Errorf("list_hostfwd: %s; want entries (and return.entries) [%+v]", list, want)
	}
	if got := call(t, sock, `{"execute": "remove_hostfwd", "arguments": {"id": 1}}`); got != `{"return":{}}` {
		t.Errorf("remove_hostfwd: %s", got)
	}
	if _, err := fetch(fmt.Sprintf("127.0.0.1:%d", host)); err == nil {
		t.Errorf("the removed forward still answers")
	}
	if got := call(t, sock, `{"execute": "remove_hostfwd", "arguments": {"id": 1}}`); got != `{"error":{"desc":"bad request: remove_hostfwd: bad arguments.id"}}` {
		t.Errorf("remove_hostfwd of a removed id: %s", got)
	}
	if got := call(t, sock, `{"execute": "list_hostfwd"}`); got != `{"entries":[],"return":{"entries":[]}}` {
		t.Errorf("list_hostfwd, none left: %s", got)
	}
	// IDs go on counting, as slirp4netns's do.
	if got := call(t, sock, add); got != `{"return":{"id":2}}` {
		t.Errorf("add_hostfwd after a removal: %s", got)
	}
}

func TestServerUDP(t *testing.T) {
	guest, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer guest.Close()
	go func() {
		b := make([]byte, 1500)
		for {
			n, from, err := guest.ReadFrom(b)
			if err != nil {
				return
			}
			guest.WriteTo(append([]byte("echo "), b[:n]...), from)
		}
	}()
	sock, _ := testServer(t, netip.MustParseAddr("127.0.0.1"), netip.Addr{})
	host := e2etest.FreePort(t)
	add := fmt.Sprintf(`{"execute":"add_hostfwd","arguments":{"proto":"udp","host_addr":"127.0.0.1","host_port":%d,"guest_port":%d}}`, host, guest.LocalAddr().(*net.UDPAddr).Port)
	if got := call(t, sock, add); got != `{"return":{"id":1}}` {
		t.Fatalf("add_hostfwd: %s", got)
	}
	c, err := net.Dial("udp4", fmt.Sprintf("127.0.0.1:%d", host))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	c.Write([]byte("ping"))
	b := make([]byte, 100)
	n, err := c.Read(b)
	if string(b[:n]) != "echo ping" {
		t.Errorf("UDP through the forward: %q, %v", b[:n], err)
	}
}

// dualEcho listens on the same port of 127.0.0.1 and ::1, answering
// "hello from guest" and "hello from guest6".
func dualEcho(t *testing.T) int {
	t.Helper()
	serve := func(ln net.Listener, msg string) {
		t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				io.WriteString(c, msg)
				c.Close()
			}
		}()
	}
	for attempt := 0; attempt < 20; attempt++ {
		ln6, err := net.Listen("tcp6", "[::1]:0")
		if err != nil {
			t.Fatal(err)
		}
		p := ln6.Addr().(*net.TCPAddr).Port
		ln4, err := net.Listen("tcp4", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			ln6.Close()
			continue
		}
		serve(ln4, "hello from guest")
		serve(ln6, "hello from guest6")
		return p
	}
	t.Fatal("found no port free on both 127.0.0.1 and ::1 in 20 tries")
	return 0
}

// With IPv6 (Guest6), a forward on every address listens on both
// families, and IPv6 clients go to the guest's IPv6 address.
func TestServerIPv6(t *testing.T) {
	guest := dualEcho(t)
	sock, _ := testServer(t, netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("::1"))
	host := e2etest.FreePort(t)
	add := fmt.Sprintf(`{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"0.0.0.0","host_port":%d,"guest_port":%d}}`, host, guest)
	if got := call(t, sock, add); got != `{"return":{"id":1}}` {
		t.Fatalf("add_hostfwd: %s", got)
	}
	if got, err := fetch(fmt.Sprintf("127.0.0.1:%d", host)); got != "hello from guest" {
		t.Errorf("IPv4 client: %q, %v", got, err)
	}
	if got, err := fetch(fmt.Sprintf("[::1]:%d", host)); got != "hello from guest6" {
		t.Errorf("IPv6 client: %q, %v", got, err)
	}
	list := call(t, sock, `{"execute": "list_hostfwd"}`)
	if !strings.Contains(list, `"host_addr":"0.0.0.0","host_addr6":"::"`) || !strings.Contains(list, `"guest_addr":"127.0.0.1","guest_addr6":"::1"`) {
		t.Errorf("list_hostfwd: %s", list)
	}
}

// With -6, a forward of 0.0.0.0 whose port another program holds on
// [::] is published on IPv4 alone, as slirp4netns publishes it; before,
// the whole add_hostfwd failed ("host address [::]:P is already in use")
// and Podman's `-p P:80` with it.
func TestServerIPv6HalfTaken(t *testing.T) {
	guest := dualEcho(t)
	sock, _ := testServer(t, netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("::1"))
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var err error
		c.Control(func(fd uintptr) { err = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 1) })
		return err
	}}
	other, err := lc.Listen(context.Background(), "tcp6", "[::]:0")
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	host := other.Addr().(*net.TCPAddr).Port
	add := fmt.Sprintf(`{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"0.0.0.0","host_port":%d,"guest_port":%d}}`, host, guest)
	if got := call(t, sock, add); got != `{"return":{"id":1}}` {
		t.Fatalf("add_hostfwd with [::]:%d taken: %s", host, got)
	}
	if got, err := fetch(fmt.Sprintf("127.0.0.1:%d", host)); got != "hello from guest" {
		t.Errorf("IPv4 client: %q, %v", got, err)
	}
	if list := call(t, sock, `{"execute": "list_hostfwd"}`); strings.Contains(list, "host_addr6") {
		t.Errorf("list_hostfwd lists an IPv6 half that does not listen: %s", list)
	}
	// Asked for on IPv6 by name, the port taken there fails.
	add6 := fmt.Sprintf(`{"execute":"add_hostfwd","arguments":{"proto":"tcp6","host_port":%d,"guest_port":%d}}`, host, guest)
	if got := call(t, sock, add6); !strings.Contains(got, "already in use") {
		t.Errorf("tcp6 add_hostfwd with [::]:%d taken: %s", host, got)
	}
}

// A forward's guest_addr is an address of the namespace's network, not
// gonetns's own there (its connections are dialled inside the namespace:
// the gateway would lead to the host's loopback) nor one outside it.
func TestGuestAddr(t *testing.T) {
	s := NewServer(Config{Guest: netip.MustParseAddr("10.0.2.100"),
		Subnets: []netip.Prefix{netip.MustParsePrefix("10.0.2.0/24"), netip.MustParsePrefix("fd00::/64")},
		Own:     []netip.Addr{netip.MustParseAddr("10.0.2.2"), netip.MustParseAddr("10.0.2.3"), netip.MustParseAddr("fd00::2"), netip.MustParseAddr("fd00::3")}})
	for _, tc := range []struct {
		addr string // "" for none given
		err  string // "" for accepted
	}{
		{"", ""},
		{"10.0.2.100", ""},
		{"10.0.2.5", ""},
		{"::ffff:10.0.2.100", ""},
		{"fd00::100", ""},
		{"10.0.2.2", "guest_addr 10.0.2.2 is gonetns's own"},
		{"10.0.2.3", "is gonetns's own"},
		{"fd00::2", "is gonetns's own"},
		{"127.0.0.1", "guest_addr 127.0.0.1 is not in the namespace's network (10.0.2.0/24, fd00::/64): leave guest_addr out for 10.0.2.100"},
		{"::1", "is not in the namespace's network"},
		{"192.0.2.1", "is not in the namespace's network"},
	} {
		var a netip.Addr
		if tc.addr != "" {
			a = netip.MustParseAddr(tc.addr)
		}
		err := s.guestAddr(a)
		if tc.err == "" && err != nil || tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)) {
			t.Errorf("guest_addr %q: %v; want %q", tc.addr, err, tc.err)
		}
	}
}

func TestServerRequests(t *testing.T) {
	sock, _ := testServer(t, netip.MustParseAddr("127.0.0.1"), netip.Addr{})
	// slirp4netns's test: a stream of zeros is too large a message.
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	go c.Write(make([]byte, 64<<10))
	b, err := io.ReadAll(c)
	if string(b) != `{"error":{"desc":"bad request: too large message"}}` {
		t.Errorf("64 KiB of zeros: %q, %v", b, err)
	}
	// A client that waits for the answer without shutting down.
	c2, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	c2.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(c2, `{"execute": "bad"}`)
	b, err = io.ReadAll(c2)
	if string(b) != `{"error":{"desc":"bad request: unknown execute"}}` {
		t.Errorf("without shutdown: %q, %v", b, err)
	}
}

func TestListen(t *testing.T) {
	if _, err := Listen("/tmp/" + strings.Repeat("x", 110)); err == nil || err.Error() != "the specified API socket path is too long (>= 108)" {
		t.Errorf("Listen(a long path): %v", err)
	}
	dir := t.TempDir()
	sock := filepath.Join(dir, "s")
	// A file left by a killed run is replaced.
	if err := os.WriteFile(sock, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	ln, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(Config{Ports: portfwd.NewManager(portfwd.Config{Dialer: hostDialer{}})})
	s.Serve(ln)
	s.Close()
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("after Close the socket file is still there: %v", err)
	}
}
