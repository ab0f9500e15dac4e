package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/e2etest"
)

// clientNetns is e2etest's client namespace (a veth pair to the host on
// 198.18.0.0/15 and 2001:db8::/32) with a thread inside it, so that the
// test's own sockets can be made there.
type clientNetns struct {
	*e2etest.ClientNetns
	fns  chan func()
	done chan struct{}
}

func newClientNetns(t *testing.T) *clientNetns {
	t.Helper()
	c := &clientNetns{ClientNetns: e2etest.NewClientNetns(t), fns: make(chan func()), done: make(chan struct{})}
	errc := make(chan error, 1)
	go func() {
		defer close(c.done)
		// The thread goes back to the test's namespace before it is
		// unlocked. Left locked, it would end with the goroutine, unless
		// it is the main thread, which Go keeps: /proc/self/ns/net would
		// then name the client's namespace for the tests that follow.
		runtime.LockOSThread()
		home, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			errc <- err
			return
		}
		defer unix.Close(home)
		fd, err := unix.Open("/run/netns/"+c.Name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err == nil {
			err = unix.Setns(fd, unix.CLONE_NEWNET)
			unix.Close(fd)
		}
		errc <- err
		if err != nil {
			return
		}
		for fn := range c.fns {
			fn()
		}
		if unix.Setns(home, unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
	}()
	if err := <-errc; err != nil {
		t.Fatalf("enter the client namespace: %v", err)
	}
	t.Cleanup(func() { close(c.fns); <-c.done })
	// The client's IPv6 address becomes usable from a kernel work queue.
	deadline := time.Now().Add(10 * time.Second)
	for c.do(func() error {
		l, err := net.ListenPacket("udp6", netip.AddrPortFrom(c.ClientIP6, 0).String())
		if err == nil {
			l.Close()
		}
		return err
	}) != nil {
		if time.Now().After(deadline) {
			t.Fatalf("%s never became usable", c.ClientIP6)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return c
}

// do runs fn on a thread in the client namespace (sockets made there stay
// there).
func (c *clientNetns) do(fn func() error) error {
	errc := make(chan error, 1)
	c.fns <- func() { errc <- fn() }
	return <-errc
}

// host is the host's address of the client's family.
func (c *clientNetns) host(v6 bool) netip.Addr {
	if v6 {
		return c.HostIP6
	}
	return c.HostIP4
}

// dial connects from the client namespace.
func (c *clientNetns) dial(t testing.TB, network string, to netip.AddrPort) net.Conn {
	t.Helper()
	var conn net.Conn
	if err := c.do(func() error {
		var err error
		conn, err = net.DialTimeout(network, to.String(), 10*time.Second)
		return err
	}); err != nil {
		t.Fatalf("dial %s %s from the client namespace: %v", network, to, err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// askTCPPeer connects and returns what the server inside saw and the
// client's own address.
func askTCPPeer(t testing.TB, conn net.Conn) (seen, self string) {
	t.Helper()
	conn.SetDeadline(time.Now().Add(netTimeout))
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		t.Fatalf("%s -> %s: %v", conn.LocalAddr(), conn.RemoteAddr(), err)
	}
	return strings.TrimPrefix(strings.TrimSpace(line), "peer="), conn.LocalAddr().String()
}

// askUDPPeer sends datagrams until one is answered and returns what the
// server inside saw.
func askUDPPeer(t testing.TB, conn net.Conn) string {
	t.Helper()
	b := make([]byte, 2048)
	for range 50 {
		conn.Write([]byte("who am I?"))
		conn.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		n, err := conn.Read(b)
		if err == nil {
			return strings.TrimPrefix(string(b[:n]), "peer=")
		}
		if !errors.Is(err, os.ErrDeadlineExceeded) && !errors.Is(err, unix.ECONNREFUSED) {
			t.Fatalf("%s -> %s: %v", conn.LocalAddr(), conn.RemoteAddr(), err)
		}
	}
	t.Fatalf("%s -> %s: no answer to 50 datagrams", conn.LocalAddr(), conn.RemoteAddr())
	return ""
}

// srcipSandbox runs gonetns with args and a command that serves the peer
// servers; it returns when they listen, and ends at cleanup. With
// --detach-netns in args the servers run in the detached namespace.
func srcipSandbox(t *testing.T, r e2etest.Runner, args []string, servers []string) string {
	t.Helper()
	state := r.TempDir(t) + "/state"
	serve := e2etest.HelperCmd(t, "peer-serve", servers...)
	if slices.Contains(args, "--detach-netns") {
		serve = `nsenter -n"$ROOTLESSKIT_STATE_DIR/netns" ` + serve
	}
	script := fmt.Sprintf(`%s & s=$!
for i in $(seq 200); do [ -S "$GONETNS_STATE_DIR/api.sock" ] && break; sleep 0.05; done
echo ready
read line
kill $s`, serve)
	// --debug: a failure's log says why a dial went without the client's
	// address.
	cmd := r.Command(context.Background(), append(append([]string{"--state-dir=" + state, "--ipv6", "--debug"}, args...), "sh", "-c", script)...)
	sess := e2etest.Interact(t, cmd)
	stdin, stderr := sess.Stdin, sess.Stderr
	t.Cleanup(func() {
		fmt.Fprintln(stdin, "done")
		waited := make(chan error, 1)
		go func() { waited <- cmd.Wait() }()
		select {
		case err := <-waited:
			if err != nil {
				t.Errorf("gonetns: %v\n%s", err, stderr.String())
			} else if t.Failed() {
				t.Logf("gonetns's log:\n%s", stderr.String())
			}
		case <-time.After(netTimeout):
			cmd.Process.Kill()
			<-waited
			t.Errorf("gonetns did not end\n%s", stderr.String())
		}
	})
	lines := sess.Lines()
	want := map[string]bool{"listening": true, "ready": true}
	for len(want) > 0 {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("the sandbox ended before it was ready\n%s", stderr.String())
			}
			if strings.HasPrefix(l, "error") {
				t.Fatalf("peer servers: %s", l)
			}
			delete(want, l)
		case <-time.After(netTimeout):
			t.Fatalf("the sandbox is not ready after %v\n%s", netTimeout, stderr.String())
		}
	}
	go func() {
		for range lines { // keep draining
		}
	}()
	return state + "/api.sock"
}

// TestPortsKeepSourceIP: servers inside see the real address and port of
// clients in another network namespace, through ports published with -p
// and with RootlessKit's rootlessctl add-ports, TCP and UDP, IPv4 and IPv6,
// servers bound to the wildcard address (UDP from an unconnected socket:
// RootlessKit#592), to loopback and to the TAP's address; 20 UDP clients at
// once each get their own answers; a loopback client gets a loopback
// address as before.
func TestPortsKeepSourceIP(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	cn := newClientNetns(t)
	type target struct {
		name, proto string
		v6          bool
		spec        string // -p / add-ports spec with %d for the host port
		server      string // peer-serve NETWORK,ADDR
		port        int
		viaAPI      bool
	}
	targets := []target{
		{name: "tcp4 to a wildcard server", proto: "tcp", spec: "0.0.0.0:%d:8090/tcp", server: "tcp,[::]:8090"},
		{name: "tcp6 to a wildcard server", proto: "tcp", v6: true, spec: "[::]:%d:[::1]:8090/tcp6"},
		{name: "tcp4 to a loopback server", proto: "tcp", spec: "0.0.0.0:%d:127.0.0.1:8091/tcp", server: "tcp4,127.0.0.1:8091"},
		{name: "tcp4 to the TAP address", proto: "tcp", spec: "0.0.0.0:%d:10.0.2.100:8092/tcp", server: "tcp4,10.0.2.100:8092"},
		{name: "tcp6 to the TAP address", proto: "tcp", v6: true, spec: "[::]:%d:[fd00::100]:8093/tcp6", server: "tcp6,[fd00::100]:8093"},
		{name: "tcp6 to a loopback server", proto: "tcp", v6: true, spec: "[::]:%d:[::1]:8094/tcp6", server: "tcp6,[::1]:8094"},
		{name: "udp4 to a wildcard server", proto: "udp", spec: "0.0.0.0:%d:8095/udp", server: "udp4,0.0.0.0:8095"},
		{name: "udp6 to a wildcard server", proto: "udp", v6: true, spec: "[::]:%d:[::1]:8096/udp6", server: "udp6,[::]:8096"},
		{name: "udp4 to a loopback server", proto: "udp", spec: "0.0.0.0:%d:127.0.0.1:8097/udp", server: "udp4,127.0.0.1:8097"},
		{name: "udp4 to the TAP address", proto: "udp", spec: "0.0.0.0:%d:10.0.2.100:8098/udp", server: "udp4,10.0.2.100:8098"},
		{name: "udp6 to the TAP address", proto: "udp", v6: true, spec: "[::]:%d:[fd00::100]:8099/udp6", server: "udp6,[fd00::100]:8099"},
		{name: "udp6 to a loopback server", proto: "udp", v6: true, spec: "[::]:%d:[::1]:8100/udp6", server: "udp6,[::1]:8100"},
		// Added at run time by rootlessctl, to the same servers.
		{name: "tcp4 added by rootlessctl", proto: "tcp", spec: "HOST4:%d:8090/tcp", viaAPI: true},
		{name: "udp4 added by rootlessctl", proto: "udp", spec: "HOST4:%d:8095/udp", viaAPI: true},
		{name: "tcp6 added by rootlessctl", proto: "tcp", v6: true, spec: "[HOST6]:%d:8090/tcp6", viaAPI: true},
		{name: "udp6 added by rootlessctl", proto: "udp", v6: true, spec: "[HOST6]:%d:8096/udp6", viaAPI: true},
	}
	var args, servers []string
	for i := range targets {
		tg := &targets[i]
		tg.port = freePort(t, tg.proto)
		tg.spec = strings.NewReplacer("HOST4", cn.HostIP4.String(), "HOST6", cn.HostIP6.String()).Replace(fmt.Sprintf(tg.spec, tg.port))
		if !tg.viaAPI {
			args = append(args, "-p", tg.spec)
		}
		if tg.server != "" {
			servers = append(servers, tg.server)
		}
	}
	sock := srcipSandbox(t, r, args, servers)
	for _, tg := range targets {
		if !tg.viaAPI {
			continue
		}
		c := r.Command(context.Background())
		c.Path, c.Args = "/usr/bin/rootlessctl", []string{"rootlessctl", "--socket", sock, "add-ports", tg.spec}
		if out, err := c.CombinedOutput(); err != nil {
			t.Fatalf("rootlessctl add-ports %s: %v\n%s", tg.spec, err, out)
		}
	}

	for _, tg := range targets {
		t.Run(tg.name, func(t *testing.T) {
			to := netip.AddrPortFrom(cn.host(tg.v6), uint16(tg.port))
			for range 3 {
				conn := cn.dial(t, tg.proto, to)
				var seen, self string
				if tg.proto == "tcp" {
					seen, self = askTCPPeer(t, conn)
				} else {
					seen, self = askUDPPeer(t, conn), conn.LocalAddr().String()
				}
				t.Logf("client %s -> %s: the server saw %s", self, to, seen)
				if seen != self {
					t.Errorf("client %s -> %s: the server saw %s", self, to, seen)
				}
			}
		})
	}

	t.Run("20 UDP clients at once", func(t *testing.T) {
		for _, tg := range []target{targets[6], targets[7]} {
			to := netip.AddrPortFrom(cn.host(tg.v6), uint16(tg.port))
			var wg sync.WaitGroup
			var mu sync.Mutex
			seenBy := map[string]string{}
			for range 20 {
				conn := cn.dial(t, "udp", to)
				wg.Go(func() {
					for range 5 {
						seen := askUDPPeer(t, conn)
						if seen != conn.LocalAddr().String() {
							t.Errorf("client %s -> %s: the server saw %s", conn.LocalAddr(), to, seen)
						}
						mu.Lock()
						seenBy[conn.LocalAddr().String()] = seen
						mu.Unlock()
					}
				})
			}
			wg.Wait()
			t.Logf("%s: 20 clients, 5 datagrams each, %d distinct clients seen by the server", tg.name, len(seenBy))
		}
	})

	t.Run("one UDP socket to two ports", func(t *testing.T) {
		// A client talking to two published ports from one socket (one
		// address and port): both flows keep it, side by side.
		var pc *net.UDPConn
		if err := cn.do(func() error {
			var err error
			pc, err = net.ListenUDP("udp4", nil)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer pc.Close()
		b := make([]byte, 2048)
		var two []target
		for _, tg := range targets {
			if tg.name == "udp4 to a wildcard server" || tg.name == "udp4 to a loopback server" {
				two = append(two, tg)
			}
		}
		for round := range 2 {
			for _, tg := range two {
				to := net.UDPAddrFromAddrPort(netip.AddrPortFrom(cn.HostIP4, uint16(tg.port)))
				var seen string
				for range 50 {
					pc.WriteToUDP([]byte("who am I?"), to)
					pc.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
					n, from, err := pc.ReadFromUDP(b)
					if err == nil && from.Port == tg.port {
						seen = strings.TrimPrefix(string(b[:n]), "peer=")
						break
					}
				}
				self := netip.AddrPortFrom(cn.ClientIP4, uint16(pc.LocalAddr().(*net.UDPAddr).Port)).String()
				t.Logf("round %d: client %s -> %s (%s): the server saw %s", round, self, to, tg.name, seen)
				if seen != self {
					t.Errorf("client %s -> %s: the server saw %q", self, to, seen)
				}
			}
		}
	})

	t.Run("loopback client", func(t *testing.T) {
		// From the host's own loopback: the server sees an address of the
		// namespace (loopback), as without --source-ip-transparent.
		conn, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", targets[0].port), 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		seen, self := askTCPPeer(t, conn)
		t.Logf("client %s: the server saw %s", self, seen)
		if !strings.HasPrefix(seen, "127.0.0.1:") {
			t.Errorf("a loopback client: the server saw %s", seen)
		}
		uc, err := net.Dial("udp", fmt.Sprintf("127.0.0.1:%d", targets[6].port))
		if err != nil {
			t.Fatal(err)
		}
		defer uc.Close()
		if seen := askUDPPeer(t, uc); !strings.HasPrefix(seen, "127.0.0.1:") {
			t.Errorf("a loopback UDP client: the server saw %s", seen)
		}
	})

	t.Run("info", func(t *testing.T) {
		res := r.MustRun(t, quick, "ctl", "--socket", sock, "info", "--json")
		if !strings.Contains(compactJSON(res.Stdout), `"sourceIPTransparent":true`) {
			t.Errorf("gonetns ctl info --json: %s", res.Stdout)
		}
	})
}

// TestPortsSourceIPTransparentOff: --source-ip-transparent=false is the
// behaviour before: the server sees an address of the namespace.
func TestPortsSourceIPTransparentOff(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	cn := newClientNetns(t)
	tcpPort, udpPort := freePort(t, "tcp"), freePort(t, "udp")
	sock := srcipSandbox(t, r, []string{"--source-ip-transparent=false",
		"-p", fmt.Sprintf("0.0.0.0:%d:8090/tcp", tcpPort), "-p", fmt.Sprintf("0.0.0.0:%d:8095/udp", udpPort)},
		[]string{"tcp,[::]:8090", "udp4,0.0.0.0:8095"})
	seen, self := askTCPPeer(t, cn.dial(t, "tcp", netip.AddrPortFrom(cn.HostIP4, uint16(tcpPort))))
	t.Logf("TCP client %s: the server saw %s", self, seen)
	if !strings.HasPrefix(seen, "127.0.0.1:") {
		t.Errorf("TCP: the server saw %s", seen)
	}
	seen = askUDPPeer(t, cn.dial(t, "udp", netip.AddrPortFrom(cn.HostIP4, uint16(udpPort))))
	if !strings.HasPrefix(seen, "127.0.0.1:") {
		t.Errorf("UDP: the server saw %s", seen)
	}
	res := r.MustRun(t, quick, "ctl", "--socket", sock, "info", "--json")
	if !strings.Contains(compactJSON(res.Stdout), `"sourceIPTransparent":false`) {
		t.Errorf("gonetns ctl info --json: %s", res.Stdout)
	}
}

// TestPortsKeepSourceIPDetachNetNS: the same with --detach-netns, where the
// child lives in the host's network namespace and makes its sockets, rules
// and routes in the detached one through its InNetNS hook.
func TestPortsKeepSourceIPDetachNetNS(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	cn := newClientNetns(t)
	tcp4, tcp6, udp4, udp6 := freePort(t, "tcp"), freePort(t, "tcp"), freePort(t, "udp"), freePort(t, "udp")
	srcipSandbox(t, r, []string{"--detach-netns",
		"-p", fmt.Sprintf("0.0.0.0:%d:8090/tcp", tcp4),
		"-p", fmt.Sprintf("[::]:%d:[fd00::100]:8091/tcp6", tcp6),
		"-p", fmt.Sprintf("0.0.0.0:%d:8095/udp", udp4),
		"-p", fmt.Sprintf("[::]:%d:[::1]:8096/udp6", udp6)},
		[]string{"tcp,[::]:8090", "tcp6,[fd00::100]:8091", "udp4,0.0.0.0:8095", "udp6,[::]:8096"})
	for _, c := range []struct {
		proto string
		to    netip.AddrPort
	}{
		{"tcp", netip.AddrPortFrom(cn.HostIP4, uint16(tcp4))},
		{"tcp", netip.AddrPortFrom(cn.HostIP6, uint16(tcp6))},
		{"udp", netip.AddrPortFrom(cn.HostIP4, uint16(udp4))},
		{"udp", netip.AddrPortFrom(cn.HostIP6, uint16(udp6))},
	} {
		conn := cn.dial(t, c.proto, c.to)
		var seen, self string
		if c.proto == "tcp" {
			seen, self = askTCPPeer(t, conn)
		} else {
			seen, self = askUDPPeer(t, conn), conn.LocalAddr().String()
		}
		t.Logf("%s client %s -> %s: the server in the detached namespace saw %s", c.proto, self, c.to, seen)
		if seen != self {
			t.Errorf("%s client %s -> %s: the server saw %s", c.proto, self, c.to, seen)
		}
	}
}
