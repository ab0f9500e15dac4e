package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/e2etest"
	"github.com/gonetns/gonetns/internal/fdbudget"
)

const netTimeout = 60 * time.Second

// hostServer is an HTTP server on the host's 127.0.0.1 serving /blob, 50 MB
// of fixed pseudo-random bytes.
type hostServer struct {
	port int
	sum  string
}

var (
	blobOnce sync.Once
	blob     []byte
	blobSum  string
)

func startHostHTTP(t *testing.T) hostServer {
	t.Helper()
	blobOnce.Do(func() {
		blob = make([]byte, 50<<20)
		r := rand.NewChaCha8([32]byte{'g', 'o', 'n', 'e', 't', 'n', 's'})
		r.Read(blob)
		s := sha256.Sum256(blob)
		blobSum = hex.EncodeToString(s[:])
	})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/blob" {
			w.Header().Set("Content-Length", strconv.Itoa(len(blob)))
			w.Write(blob)
			return
		}
		fmt.Fprintln(w, "hello from the host")
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return hostServer{port: l.Addr().(*net.TCPAddr).Port, sum: blobSum}
}

// startUpstreamDNS is the DNS server the sandbox's resolver forwards to in
// tests (never a real one): gonetns-e2e.test. has an A record.
func startUpstreamDNS(t *testing.T) string {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	mux := mdns.NewServeMux()
	mux.HandleFunc(".", func(w mdns.ResponseWriter, q *mdns.Msg) {
		m := new(mdns.Msg)
		m.SetReply(q)
		name := strings.ToLower(q.Question[0].Name)
		switch {
		case name == "gonetns-e2e.test." && q.Question[0].Qtype == mdns.TypeA:
			rr, _ := mdns.NewRR("gonetns-e2e.test. 300 IN A 192.0.2.55")
			m.Answer = append(m.Answer, rr)
		case name == "gonetns-e2e.test.":
			// NODATA
		default:
			m.Rcode = mdns.RcodeNameError
		}
		w.WriteMsg(m)
	})
	srv := &mdns.Server{PacketConn: pc, Handler: mux}
	go srv.ActivateAndServe()
	t.Cleanup(func() { srv.Shutdown() })
	return pc.LocalAddr().String()
}

func TestNetCurlLargeFileBothMTUs(t *testing.T) {
	e2etest.RequireTun(t)
	srv := startHostHTTP(t)
	for _, r := range e2etest.Both(t) {
		for _, mtu := range []int{1500, 65520} {
			if r.Name == "root" && mtu == 1500 {
				continue
			}
			t.Run(fmt.Sprintf("%s/mtu=%d", r.Name, mtu), func(t *testing.T) {
				script := fmt.Sprintf("cat /sys/class/net/tap0/mtu; curl -sS --fail http://10.0.2.2:%d/blob | sha256sum", srv.port)
				res := r.MustRun(t, netTimeout, fmt.Sprintf("--mtu=%d", mtu), "sh", "-c", script)
				f := strings.Fields(res.Stdout)
				if len(f) < 2 || f[0] != strconv.Itoa(mtu) || f[1] != srv.sum {
					t.Errorf("mtu / sha256 inside = %v, want %d and %s\n%s", f, mtu, srv.sum, res)
				}
			})
		}
	}
}

// TestNetNestedNamespaceSmallerLink: a namespace inside the sandbox (a
// container's, routed and masqueraded through the sandbox as rootless
// Docker's are) behind a link of smaller MTU downloads the 50 MB blob
// whole. With a veth of MTU 1500 on its side and 1280 on the sandbox's, its
// SYN asks for segments the sandbox cannot forward, and the sandbox's
// kernel answers ours with ICMP "fragmentation needed": the fast path
// ignored them and resent the same segments (the download stalled, "curl:
// (28) Operation timed out"). With MTU 552 both sides, the namespace asks
// for an MSS of 512, below the fast path's floor then (536).
func TestNetNestedNamespaceSmallerLink(t *testing.T) {
	e2etest.RequireTun(t)
	if _, err := os.Stat("/usr/sbin/iptables"); err != nil {
		t.Fatalf("this test masquerades a nested namespace with iptables inside the sandbox: install Debian's iptables (scripts/test-setup.sh does): %v", err)
	}
	srv := startHostHTTP(t)
	r := e2etest.Unprivileged(t)
	for _, link := range []struct{ name, inner, outer string }{
		{"pmtu", "1500", "1280"},
		{"mss 512", "552", "552"},
	} {
		t.Run(link.name, func(t *testing.T) {
			script := fmt.Sprintf(`set -e
echo 1 > /proc/sys/net/ipv4/ip_forward
iptables -t nat -A POSTROUTING -s 192.168.77.0/24 -o tap0 -j MASQUERADE
unshare -n sleep 100 & ns=$!
while [ "$(readlink /proc/$ns/ns/net)" = "$(readlink /proc/self/ns/net)" ]; do sleep 0.05; done
ip link add vo type veth peer name vi netns $ns
ip addr add 192.168.77.1/24 dev vo
ip link set vo mtu %s up
nsenter -t $ns -n sh -c 'ip addr add 192.168.77.2/24 dev vi && ip link set vi mtu %s up && ip route add default via 192.168.77.1 &&
	curl -sS --fail --max-time 30 http://10.0.2.2:%d/blob | sha256sum'
kill $ns`, link.outer, link.inner, srv.port)
			res := r.MustRun(t, netTimeout, "--mtu=65520", "sh", "-c", script)
			if f := strings.Fields(res.Stdout); len(f) == 0 || f[0] != srv.sum {
				t.Errorf("the nested namespace's download: sha256 %v, want %s\n%s", f, srv.sum, res)
			}
		})
	}
}

// startHalfCloseServer answers each connection, once the client has
// half-closed it, with how many bytes it read, until the test ends.
func startHalfCloseServer(t *testing.T) int {
	return startTCPServer(t, func(c net.Conn) {
		n, _ := io.Copy(io.Discard, c) // to the sandbox's FIN
		fmt.Fprintf(c, "host read %d bytes", n)
	})
}

// startTCPEcho starts a TCP server on the host's 127.0.0.1 that echoes
// what each connection sends, until the test ends; it returns its port.
func startTCPEcho(t *testing.T) int {
	return startTCPServer(t, func(c net.Conn) { io.Copy(c, c) })
}

// startTCPServer serves each connection to a new port of the host's
// 127.0.0.1 with serve, then closes it, until the test ends; it returns
// the port.
func startTCPServer(t *testing.T, serve func(net.Conn)) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	serveTCP(t, l, serve)
	return l.Addr().(*net.TCPAddr).Port
}

// serveTCP serves each connection l accepts with serve, then closes it,
// until the test ends.
func serveTCP(t *testing.T, l net.Listener, serve func(net.Conn)) {
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				serve(c)
			}()
		}
	}()
}

// TestNetReplyBeforeReset: a host server that answers and closes with
// the request unread (an HTTP server refusing an upload: its kernel sends
// the answer, then a reset) reaches the sandbox as it would a local
// client: the answer, then ECONNRESET. Before, when the answer and the
// reset came to the fast path in one poll, the reset went out alone.
func TestNetReplyBeforeReset(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	const reply = "HTTP/1.1 413 Payload Too Large\r\n\r\n"
	port := startTCPServer(t, func(c net.Conn) {
		io.ReadFull(c, make([]byte, 10))
		time.Sleep(100 * time.Millisecond) // the rest of the request arrives, unread
		c.Write([]byte(reply))
	}) // Close with bytes unread: the kernel resets the connection
	for _, flag := range []string{"--tcp-fast-path=true", "--event-loop=false", "--tcp-fast-path=false"} {
		t.Run(strings.TrimPrefix(flag, "--"), func(t *testing.T) {
			res := r.MustRun(t, netTimeout, flag, "sh", "-c", e2etest.HelperCmd(t, "tcp-reply-reset", fmt.Sprintf("10.0.2.2:%d", port), "10"))
			if !strings.Contains(res.Stdout, "the answer, then the reset: 10 of 10") {
				t.Errorf("the host's answer did not come before its reset\n%s", res)
			}
			if !strings.Contains(res.Stdout, fmt.Sprintf(": %d bytes, then", len(reply))) {
				t.Errorf("no connection read the %d-byte answer\n%s", len(reply), res)
			}
		})
	}
	// An answer larger than the sandbox's first window, which the host
	// socket has taken whole before the reset, read late: the rest goes
	// as the sandbox reads, then the reset, as a local client, reading as
	// late, gets it all (checked first). Before, what the window had not
	// taken when the reset came was lost (some 64 KiB of 100,000 bytes).
	const large = 100_000
	port = startTCPServer(t, func(c net.Conn) {
		io.ReadFull(c, make([]byte, 10))
		time.Sleep(100 * time.Millisecond)
		c.Write(make([]byte, large))
	})
	t.Run("larger than the window", func(t *testing.T) {
		want := fmt.Sprintf(": %d bytes, then", large)
		local, err := exec.Command("sh", "-c", e2etest.HelperCmd(t, "tcp-reply-reset", fmt.Sprintf("127.0.0.1:%d", port), "3", "500ms")).Output()
		if strings.Count(string(local), want) != 3 {
			t.Fatalf("a local client reading 500 ms late did not get all %d bytes before the reset either (%v): this kernel's buffers differ from what the test assumes\n%s", large, err, local)
		}
		res := r.MustRun(t, netTimeout, "sh", "-c", e2etest.HelperCmd(t, "tcp-reply-reset", fmt.Sprintf("10.0.2.2:%d", port), "3", "500ms"))
		if strings.Count(res.Stdout, want) != 3 || !strings.Contains(res.Stdout, "the answer, then the reset: 3 of 3") {
			t.Errorf("want all %d bytes of each answer, then the reset, as a local client gets them\n%s", large, res)
		}
	})
}

// TestNetFINThenReset: a host server that answers, shuts its side and then
// resets (SO_LINGER 0) reaches a sandbox reader that reads late as it
// reaches a local one: the answer, then the end of the stream. Before, when
// the FIN and the reset came to the fast path in one poll, the FIN was not
// passed on and the reader got ECONNRESET (8 of this test's 20
// connections, with and without the event loop).
func TestNetFINThenReset(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	port := startTCPServer(t, func(c net.Conn) {
		tc := c.(*net.TCPConn)
		time.Sleep(10 * time.Millisecond) // the client's connect has returned (else Go's dialer reads EPIPE)
		tc.Write([]byte("bye"))
		tc.CloseWrite()
		tc.SetLinger(0)
	}) // Close with linger 0: the reset behind the FIN
	const n = 20
	want := fmt.Sprintf("the answer, then the end of the stream: %d; then a reset: 0", n)
	local, err := exec.Command("sh", "-c", e2etest.HelperCmd(t, "tcp-read-end", fmt.Sprintf("127.0.0.1:%d", port), strconv.Itoa(n), "50ms")).Output()
	if strings.TrimSpace(string(local)) != want {
		t.Fatalf("a local client reading 50 ms late did not get the answer and the end of the stream every time (%v): this kernel differs from what the test assumes\n%s", err, local)
	}
	for _, flag := range []string{"--tcp-fast-path=true", "--event-loop=false", "--tcp-fast-path=false"} {
		t.Run(strings.TrimPrefix(flag, "--"), func(t *testing.T) {
			res := r.MustRun(t, netTimeout, flag, "sh", "-c", e2etest.HelperCmd(t, "tcp-read-end", fmt.Sprintf("10.0.2.2:%d", port), strconv.Itoa(n), "50ms"))
			if strings.TrimSpace(res.Stdout) != want {
				t.Errorf("want %q, as a local client gets\n%s", want, res)
			}
		})
	}
}

// TestNetUploadToPausedReader: an upload to a host server that stops
// reading for longer than the sandbox's kernel retransmits before giving
// up (tcp_retries2 set to 5 inside: some 15 s) completes once the server
// reads again. Before, the bytes the host socket refused were held
// unacknowledged under an open window: the sandbox resent them as lost
// and ended the connection with ETIMEDOUT (at the default tcp_retries2,
// after some 15 minutes); now the window closes and the sandbox probes
// it, as with a local peer that stops reading.
func TestNetUploadToPausedReader(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	const pause, size = 30 * time.Second, 20_000_000
	port := startTCPServer(t, func(c net.Conn) {
		time.Sleep(pause)
		n, _ := io.Copy(io.Discard, c)
		fmt.Fprintf(c, "host read %d bytes", n)
	})
	script := "echo 5 > /proc/sys/net/ipv4/tcp_retries2 && " +
		e2etest.HelperCmd(t, "tcp-halfclose", fmt.Sprintf("10.0.2.2:%d", port), strconv.Itoa(size))
	res := r.MustRun(t, netTimeout+pause, "sh", "-c", script)
	if want := fmt.Sprintf("host read %d bytes", size); strings.TrimSpace(res.Stdout) != want {
		t.Errorf("the upload to a server that paused for %v: want %q\n%s", pause, want, res)
	}
}

// TestNetUrgentFromHost: urgent data (MSG_OOB) from a host server stays
// in the stream, in its place, on the fast path: before, the peek skipped
// the urgent byte while its offset lagged one behind, the last byte went
// to the sandbox twice and the connection could end in a reset.
func TestNetUrgentFromHost(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	var want []byte
	for k := range 3 {
		want = append(append(want, bytes.Repeat([]byte{'A' + byte(k)}, 50000)...), '!')
	}
	port := startTCPServer(t, func(c net.Conn) {
		rc, err := c.(*net.TCPConn).SyscallConn()
		if err != nil {
			return
		}
		for k := range 3 {
			c.Write(bytes.Repeat([]byte{'A' + byte(k)}, 50000))
			rc.Control(func(fd uintptr) { unix.Send(int(fd), []byte("!"), unix.MSG_OOB) })
		}
	})
	for _, mtu := range []string{"--mtu=65520", "--mtu=1500"} {
		res := r.MustRun(t, netTimeout, mtu, "sh", "-c", e2etest.HelperCmd(t, "tcp-sum", fmt.Sprintf("10.0.2.2:%d", port)))
		if w := fmt.Sprintf("%d bytes, sha256 %x", len(want), sha256.Sum256(want)); strings.TrimSpace(res.Stdout) != w {
			t.Errorf("%s: the host's stream with urgent bytes: want %q (each urgent byte in its place)\n%s", mtu, w, res)
		}
	}
}

// TestNetUDPPortUnreachable: a datagram to a host port where nothing
// listens makes the sandbox's connected UDP socket fail with
// ECONNREFUSED, over IPv4 and IPv6, as on the host: the flow's socket
// reports the host's ICMP port unreachable and the NAT passes it on.
// Before, the program waited for an answer that could not come.
func TestNetUDPPortUnreachable(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	port := freePort(t, "udp")
	script := fmt.Sprintf("%s && %s", e2etest.HelperCmd(t, "udp-refused", fmt.Sprintf("10.0.2.2:%d", port)),
		e2etest.HelperCmd(t, "udp-refused", fmt.Sprintf("[fd00::2]:%d", port)))
	for _, flag := range []string{"--event-loop=true", "--event-loop=false"} {
		res := r.MustRun(t, netTimeout, flag, "--ipv6", "sh", "-c", script)
		if got := strings.Fields(res.Stdout); len(got) != 2 || got[0] != "refused" || got[1] != "refused" {
			t.Errorf("%s: want the IPv4 and the IPv6 datagram refused\n%s", flag, res)
		}
	}
}

// TestNetSandboxResets: a connection the sandbox ends with a reset ends
// with a reset on the host, not a FIN, on the fast path and on the
// netstack's TCP, over IPv4 and IPv6: 300 connections, each 100 bytes
// and SO_LINGER 0. Before, on the netstack's TCP a connection the sandbox
// reset before the stack had taken it was closed on the host with a FIN:
// the host read EOF (237 of 300 over IPv6 in this test's first run).
func TestNetSandboxResets(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	const n = 300
	var mu sync.Mutex
	ends := map[string]int{}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l6, err := net.Listen("tcp", fmt.Sprintf("[::1]:%d", port))
	if err != nil {
		t.Fatalf("listen on ::1 at the IPv4 listener's port: %v", err)
	}
	for _, l := range []net.Listener{l, l6} {
		serveTCP(t, l, func(c net.Conn) {
			c.SetDeadline(time.Now().Add(20 * time.Second))
			_, err := io.Copy(io.Discard, c)
			end := "EOF"
			if errors.Is(err, syscall.ECONNRESET) {
				end = "reset"
			} else if err != nil {
				end = err.Error()
			}
			mu.Lock()
			ends[end]++
			mu.Unlock()
		})
	}
	for _, flag := range []string{"--tcp-fast-path=true", "--tcp-fast-path=false"} {
		for _, addr := range []string{fmt.Sprintf("10.0.2.2:%d", port), fmt.Sprintf("[fd00::2]:%d", port)} {
			mu.Lock()
			clear(ends)
			mu.Unlock()
			r.MustRun(t, netTimeout, flag, "--ipv6", "sh", "-c", e2etest.HelperCmd(t, "tcp-send-reset", addr, strconv.Itoa(n)))
			var got map[string]int
			waitFor := time.Now().Add(10 * time.Second)
			for {
				mu.Lock()
				got = maps.Clone(ends)
				mu.Unlock()
				total := 0
				for _, v := range got {
					total += v
				}
				if total >= n || time.Now().After(waitFor) {
					break
				}
				time.Sleep(50 * time.Millisecond)
			}
			if got["reset"] != n {
				t.Errorf("%s to %s: the host saw %v, want %d resets", flag, addr, got, n)
			}
		}
	}
}

// A host server's urgent byte (MSG_OOB) reaches the sandbox in the
// stream, where it was sent, on either TCP path: the netstack path's
// relay read past it ("abcd" for "ab", urgent "U", "cd").
func TestNetUrgentByteInline(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	l := hostListener(t)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("ab"))
			time.Sleep(50 * time.Millisecond)
			if rc, err := c.(*net.TCPConn).SyscallConn(); err == nil {
				rc.Control(func(fd uintptr) { unix.Sendto(int(fd), []byte("U"), unix.MSG_OOB, nil) })
			}
			time.Sleep(50 * time.Millisecond)
			c.Write([]byte("cd"))
			c.Close()
		}
	}()
	for _, flag := range []string{"--tcp-fast-path=true", "--tcp-fast-path=false"} {
		res := r.MustRun(t, netTimeout, flag, "bash", "-c", fmt.Sprintf("exec 3<>/dev/tcp/10.0.2.2/%d; cat <&3", l.Addr().(*net.TCPAddr).Port))
		if res.Stdout != "abUcd" {
			t.Errorf("%s: the sandbox read %q; want \"abUcd\"", flag, res.Stdout)
		}
	}
}

func TestNetHalfClose(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	port := startHalfCloseServer(t)
	res := r.MustRun(t, netTimeout, "sh", "-c", e2etest.HelperCmd(t, "tcp-halfclose", fmt.Sprintf("10.0.2.2:%d", port), "1000000"))
	if strings.TrimSpace(res.Stdout) != "host read 1000000 bytes" {
		t.Errorf("half-close through the sandbox: %s", res)
	}
}

// busybox tftp fetches a file from a TFTP server on the host: the server
// answers a read request from a port of its own and takes the client's
// ACKs only from the client's port (its "transfer ID", RFC 1350). Before,
// each destination was a host socket connected to it, and the client
// timed out ("tftp: timeout", an empty file).
func TestNetTFTPFromHost(t *testing.T) {
	e2etest.RequireTun(t)
	if _, err := exec.LookPath("busybox"); err != nil {
		t.Fatalf("busybox (busybox-static) is not installed: it is the TFTP client here (scripts/test-setup.sh installs it)")
	}
	r := e2etest.Unprivileged(t)
	file := make([]byte, 100_000)
	rand.NewChaCha8([32]byte{'t', 'f', 't', 'p'}).Read(file)
	sum := sha256.Sum256(file)
	port := startTFTP(t, file)
	res := r.MustRun(t, netTimeout, "sh", "-c", fmt.Sprintf("busybox tftp -g -r blob -l - 10.0.2.2 %d | sha256sum", port))
	if f := strings.Fields(res.Stdout); len(f) == 0 || f[0] != hex.EncodeToString(sum[:]) {
		t.Errorf("busybox tftp of 100,000 bytes from the host: sha256 %v, want %x\n%s", f, sum, res)
	}
}

// startTFTP serves file to read requests on the host's 127.0.0.1, as a TFTP
// server does (RFC 1350, no options): each transfer from a socket of its
// own, in 512-byte blocks, each sent until the client's ACK comes from the
// port the request came from. It returns the server's port.
func startTFTP(t *testing.T, file []byte) int {
	t.Helper()
	ln, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		buf := make([]byte, 1500)
		for {
			n, client, err := ln.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			if n < 2 || binary.BigEndian.Uint16(buf) != 1 { // RRQ
				continue
			}
			go func() {
				c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
				if err != nil {
					return
				}
				defer c.Close()
				ack := make([]byte, 1500)
				for block := 1; (block-1)*512 <= len(file); block++ {
					data := binary.BigEndian.AppendUint16(binary.BigEndian.AppendUint16(nil, 3), uint16(block))
					data = append(data, file[(block-1)*512:min(block*512, len(file))]...)
					acked := false
					for try := 0; try < 5 && !acked; try++ {
						c.WriteToUDPAddrPort(data, client)
						c.SetReadDeadline(time.Now().Add(time.Second))
						for !acked {
							n, from, err := c.ReadFromUDPAddrPort(ack)
							if err != nil {
								break
							}
							acked = from == client && n >= 4 && binary.BigEndian.Uint16(ack) == 4 && binary.BigEndian.Uint16(ack[2:]) == uint16(block)
						}
					}
					if !acked {
						return
					}
				}
			}()
		}
	}()
	return ln.LocalAddr().(*net.UDPAddr).Port
}

func TestNetUDPEcho(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	port := startUDPEcho(t, "127.0.0.1:0", "host:")
	res := r.MustRun(t, netTimeout, "sh", "-c", e2etest.HelperCmd(t, "udp-echo", fmt.Sprintf("10.0.2.2:%d", port), "datagram-1"))
	if strings.TrimSpace(res.Stdout) != "host:datagram-1" {
		t.Errorf("UDP echo: %s", res)
	}
}

// A UDP send the kernel splits (UDP_SEGMENT, as QUIC clients send)
// reaches the host as its datagrams: 4,000 bytes in segments of 1,000
// are 4 datagrams of 1,000. On the packet link they came as one of 4,000
// (the veth passed the send whole).
func TestNetUDPSegmentation(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	port := pc.LocalAddr().(*net.UDPAddr).Port
	r.MustRun(t, netTimeout, "sh", "-c", e2etest.HelperCmd(t, "udp-gso-send", fmt.Sprintf("10.0.2.2:%d", port), "4000", "1000"))
	var sizes []int
	b := make([]byte, 65536)
	for {
		pc.SetReadDeadline(time.Now().Add(2 * time.Second))
		n, _, err := pc.ReadFrom(b)
		if err != nil {
			break
		}
		sizes = append(sizes, n)
	}
	if !slices.Equal(sizes, []int{1000, 1000, 1000, 1000}) {
		t.Errorf("the host received datagrams of %v bytes; want 4 of 1000", sizes)
	}
}

// The command may change the MTU of its interface: raised to 9,000 from
// gonetns's 1,500, a datagram of 4,000 bytes goes out and its echo comes
// back. On the packet link the veth's far end kept the MTU it was made
// with and dropped the larger frames.
func TestNetMTURaisedInside(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	port := startUDPEcho(t, "127.0.0.1:0", "host:")
	msg := strings.Repeat("m", 4000)
	res := r.MustRun(t, netTimeout, "--mtu=1500", "sh", "-c", "ip link set tap0 mtu 9000 && "+
		e2etest.HelperCmd(t, "udp-echo", fmt.Sprintf("10.0.2.2:%d", port), msg))
	if strings.TrimSpace(res.Stdout) != "host:"+msg {
		t.Errorf("a 4,000-byte datagram with tap0's MTU raised to 9000: %.200s", res)
	}
}

// A burst of 5,000 new source ports gets all its answers: the TAP's queue
// holds the burst while the flows are set up (the kernel's default of
// 1000 frames answered 1,225 of them).
func TestNetUDPBurst(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	const ports = 5000
	// Several servers: one socket's receive buffer holds a few hundred
	// datagrams, fewer than the burst.
	args := []string{strconv.Itoa(ports)}
	for range 25 {
		args = append(args, fmt.Sprintf("10.0.2.2:%d", startUDPEcho(t, "127.0.0.1:0", "host:")))
	}
	// The sandbox waits after the burst, so that the parent's peak memory
	// can be read: with 2 x 64 KiB of buffers a flow, 5,000 flows take a
	// parent past 600 MB.
	ctx, cancel := context.WithTimeout(context.Background(), netTimeout)
	defer cancel()
	cmd := r.Command(ctx, "sh", "-c", e2etest.HelperCmd(t, "udp-burst", args...)+"; read line")
	sess := e2etest.Interact(t, cmd)
	defer func() { sess.Stdin.Close(); cmd.Wait() }()
	line, err := sess.Stdout.ReadString('\n')
	if want := fmt.Sprintf("answered %d of %d", ports, ports); strings.TrimSpace(line) != want {
		t.Errorf("burst of %d source ports: %q %v\n%s", ports, line, err, sess.Stderr)
	}
	peak := procStatusKB(t, cmd.Process.Pid, "VmHWM") << 10
	t.Logf("%s; the parent's peak RSS: %d MB, now %d MB", strings.TrimSpace(line), peak>>20, vmRSS(t, cmd.Process.Pid)>>20)
	if peak > 200<<20 {
		t.Errorf("the parent's peak RSS is %d MB after a burst of %d UDP source ports, want under 200 MB", peak>>20, ports)
	}
}

// startUDPEcho answers every datagram on addr with prefix+datagram, until
// the test ends, and returns the port.
func startUDPEcho(t *testing.T, addr, prefix string) int {
	t.Helper()
	return startUDPServer(t, addr, func(_ *net.UDPAddr, b []byte) []byte {
		return append([]byte(prefix), b...)
	})
}

// startUDPServer answers every datagram on addr with what reply makes of
// it, until the test ends, and returns the port.
func startUDPServer(t *testing.T, addr string, reply func(from *net.UDPAddr, b []byte) []byte) int {
	t.Helper()
	pc, err := net.ListenPacket("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		b := make([]byte, 65536)
		for {
			n, from, err := pc.ReadFrom(b)
			if err != nil {
				return
			}
			pc.WriteTo(reply(from.(*net.UDPAddr), b[:n]), from)
		}
	}()
	return pc.LocalAddr().(*net.UDPAddr).Port
}

// A refused connection is refused inside at once, with an RST: the
// helper's dial gives up after 5 s, half of the NAT's own dial timeout (after
// which an unreachable destination is reset too), so "connection refused"
// within it can only be the host's refusal passed on. How long it took is
// printed for the record, not judged.
func TestNetRefusedIsFast(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	port := freePort(t, "tcp") // nothing listens there, and no listener on port 0 can land there
	res := r.Run(t, netTimeout, "sh", "-c", e2etest.HelperCmd(t, "tcp-dial", fmt.Sprintf("10.0.2.2:%d", port), "5s")+
		fmt.Sprintf("; curl -sS http://10.0.2.2:%d/ 2>&1; echo curl=$?", port))
	var ms int
	if _, err := fmt.Sscanf(res.Stdout, "error after %dms:", &ms); err != nil || !strings.Contains(res.Stdout, "connection refused") {
		t.Fatalf("dial to a closed host port: want connection refused within the dial's 5 s: %s", res)
	}
	t.Logf("refused after %d ms", ms)
	if !strings.Contains(res.Stdout, "curl=7") {
		t.Errorf("curl to a closed port did not fail to connect: %s", res)
	}
}

func TestNetPing(t *testing.T) {
	e2etest.RequireTun(t)
	for _, r := range e2etest.Both(t) {
		t.Run(r.Name, func(t *testing.T) {
			res := r.MustRun(t, netTimeout, "--debug", "ping", "-c", "2", "-W", "3", "10.0.2.2")
			if !strings.Contains(res.Stdout, "2 received") {
				t.Errorf("ping 10.0.2.2: %s", res)
			}
			if r.PingAllowed(t) {
				if !strings.Contains(res.Stderr, "icmp echo flow") {
					t.Errorf("ping sockets are allowed for %s, yet the echo was not forwarded to the host:\n%s", r.Name, res.Stderr)
				}
			} else if !strings.Contains(res.Stderr, "ping_group_range") {
				t.Errorf("ping sockets are not allowed for %s, and no notice says so:\n%s", r.Name, res.Stderr)
			}
		})
	}
}

// A ping to an address the host has no way to reach (its route says
// unreachable) is answered at once with "Destination Host Unreachable", as
// the host's own ping fails at once ("connect: No route to host");
// slirp4netns answers so too. The echo was dropped with a debug line, and
// ping waited and counted it lost.
func TestNetPingUnreachable(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	if !r.PingAllowed(t) {
		t.Fatalf("ping sockets are not allowed for %s (net.ipv4.ping_group_range): run scripts/test-setup.sh", r.User.Username)
	}
	c := e2etest.NewClientNetns(t)
	b := c.ClientIP4.As4()
	prefix := fmt.Sprintf("%d.%d.%d.128/25", b[0], b[1], b[2]) // of the test's own /24
	if out, err := exec.Command("ip", "route", "add", "unreachable", prefix).CombinedOutput(); err != nil {
		t.Fatalf("ip route add unreachable %s: %v\n%s", prefix, err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "route", "del", "unreachable", prefix).Run() })
	to := fmt.Sprintf("%d.%d.%d.130", b[0], b[1], b[2])
	res := r.Run(t, netTimeout, "ping", "-c", "1", "-W", "5", to)
	if !strings.Contains(res.Stdout, "Destination Host Unreachable") {
		t.Errorf("ping %s, which the host cannot route:\n%s", to, res)
	}
}

func TestNetDNS(t *testing.T) {
	e2etest.RequireTun(t)
	upstream := startUpstreamDNS(t)
	for _, r := range e2etest.Both(t) {
		t.Run(r.Name, func(t *testing.T) {
			res := r.Run(t, netTimeout, "--dns-upstream="+upstream, "sh", "-c",
				"grep ^nameserver /etc/resolv.conf; getent hosts gonetns-e2e.test; getent hosts no-such-name.test; echo nx=$?")
			lines := strings.Split(strings.TrimSpace(res.Stdout), "\n")
			if len(lines) != 3 || lines[0] != "nameserver 10.0.2.3" || !strings.HasPrefix(lines[1], "192.0.2.55") || lines[2] != "nx=2" {
				t.Errorf("resolv.conf and lookups inside: %q\n%s", lines, res)
			}
		})
	}
	// With /etc copied up, resolv.conf is a real file in the copy.
	r := e2etest.Unprivileged(t)
	res := r.MustRun(t, netTimeout, "--copy-up=/etc", "--dns-upstream="+upstream, "sh", "-c", "test -L /etc/resolv.conf && echo link; grep ^nameserver /etc/resolv.conf; getent hosts gonetns-e2e.test")
	if strings.Contains(res.Stdout, "link") || !strings.Contains(res.Stdout, "nameserver 10.0.2.3") || !strings.Contains(res.Stdout, "192.0.2.55") {
		t.Errorf("with --copy-up=/etc: %s", res)
	}
}

func TestNetDisableHostLoopback(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	srv := startHostHTTP(t)
	res := r.Run(t, netTimeout, "--disable-host-loopback", "sh", "-c", e2etest.HelperCmd(t, "tcp-dial", fmt.Sprintf("10.0.2.2:%d", srv.port)))
	if res.Code == 0 || !strings.Contains(res.Stdout, "connection refused") {
		t.Errorf("--disable-host-loopback let the sandbox reach the host's loopback: %s", res)
	}
	res = r.MustRun(t, netTimeout, "curl", "-sS", fmt.Sprintf("http://10.0.2.2:%d/", srv.port))
	if !strings.Contains(res.Stdout, "hello from the host") {
		t.Errorf("without the flag the host is not reachable: %s", res)
	}
}

// When gonetns exits, the host sockets of its flows close, even when a
// process left behind in the sandbox still holds its end.
func TestNetHostSocketsCloseOnExit(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	l := hostListener(t)
	ended := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			ended <- err
			return
		}
		_, err = io.Copy(io.Discard, c)
		ended <- err
	}()
	port := l.Addr().(*net.TCPAddr).Port
	marker := strconv.Itoa(800000 + int(time.Now().UnixNano()%100000))
	r.MustRun(t, netTimeout, "bash", "-c", fmt.Sprintf("exec 3<>/dev/tcp/10.0.2.2/%d; echo hi >&3; (exec sleep %s <&3 >&3 2>/dev/null &); exit 0", port, marker))
	select {
	case <-ended:
	case <-time.After(10 * time.Second):
		t.Error("the host side of the connection stayed open after gonetns exited")
	}
	killSleep(marker)
}

// A program inside that writes to a server reading late, closes and exits
// at once leaves the rest of its bytes, and its FIN, to its kernel, as it
// would on the host: the server gets them all, then the end of the
// stream, and gonetns returns once they are through. The server got part
// of them and a reset, or (the command's kernel still holding bytes) part
// of them and a clean end of stream.
func TestNetBytesLeftAtExitDelivered(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	l := hostListener(t)
	const size = 8 << 20
	for i := range 3 {
		got := readOne(l, 1500*time.Millisecond, 0, new(atomic.Int64))
		start := time.Now()
		r.MustRun(t, netTimeout, "bash", "-c", fmt.Sprintf("exec 3<>/dev/tcp/10.0.2.2/%d; head -c %d /dev/zero >&3; exec 3>&-; exit 0", l.Addr().(*net.TCPAddr).Port, size))
		took := time.Since(start)
		select {
		case res := <-got:
			if res.n != size || res.err != nil {
				t.Errorf("run %d: the host read %d of %d bytes, then %v; want all, then the end of the stream", i, res.n, size, res.err)
			}
		case <-time.After(15 * time.Second):
			t.Fatalf("run %d: the host's reading did not end", i)
		}
		t.Logf("run %d: gonetns returned after %v", i, took.Round(time.Millisecond))
	}
}

func killSleep(marker string) {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		b, _ := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if strings.ReplaceAll(strings.TrimRight(string(b), "\x00"), "\x00", " ") == "sleep "+marker {
			if pid, err := strconv.Atoi(e.Name()); err == nil {
				p, _ := os.FindProcess(pid)
				p.Kill()
			}
		}
	}
}

// The wait at exit for bytes the sandbox's kernel still holds (above)
// ends at a Ctrl-C: gonetns returns at once, and the host's unfinished
// stream ends with a reset, not the FIN that the signal's default action
// (the network process killed, its kernel closing every socket) gave it.
func TestNetSettleEndsOnInterrupt(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGINT, syscall.SIGQUIT} {
		t.Run(sig.String(), func(t *testing.T) { testSettleEndsOn(t, sig) })
	}
}

// testSettleEndsOn: a SIGQUIT ended gonetns with a dump of its
// goroutines and status 2.
func testSettleEndsOn(t *testing.T, sig syscall.Signal) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	l := hostListener(t)
	accepted := make(chan net.Conn, 1)
	go func() {
		if c, err := l.Accept(); err == nil {
			accepted <- c
		}
	}()
	// The server reads nothing: the command's 32 MiB cannot all leave its
	// kernel, and gonetns waits for them when the command has exited.
	cmd := r.Command(context.Background(), "bash", "-c", fmt.Sprintf("exec 3<>/dev/tcp/10.0.2.2/%d; (head -c %d /dev/zero >&3 &); sleep 1; echo exiting", l.Addr().(*net.TCPAddr).Port, 32<<20))
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	var c net.Conn
	select {
	case c = <-accepted:
	case <-time.After(netTimeout):
		t.Fatal("the sandbox's connection never came")
	}
	defer c.Close()
	if line, _ := bufio.NewReader(out).ReadString('\n'); line != "exiting\n" {
		t.Fatalf("the command said %q", line)
	}
	time.Sleep(500 * time.Millisecond) // the command has exited; gonetns waits
	signaled := time.Now()
	cmd.Process.Signal(sig)
	werr := cmd.Wait()
	if took := time.Since(signaled); took > 3*time.Second {
		t.Errorf("gonetns returned %v after the Ctrl-C; want at once (the wait alone lasts up to %v)", took.Round(time.Millisecond), 10*time.Second)
	}
	if werr != nil {
		t.Errorf("gonetns: %v; want the command's status, 0", werr)
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.Copy(io.Discard, c); !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("the host's reading of the unfinished stream ended with %v; want ECONNRESET", err)
	}
}

// gonetns killed (SIGKILL) while the sandbox sends, on either TCP path:
// the host's stream, unfinished, ends with a reset, not the FIN that the
// kernel's close of a dead process's sockets gave it.
func TestNetKilledMidStreamResets(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	for _, tc := range []struct {
		name  string
		flags []string
	}{
		{"fast path", nil},
		// The netstack's host sockets: their relay's rule (relay.Run).
		{"netstack", []string{"--tcp-fast-path=false"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := hostListener(t)
			var read atomic.Int64
			got := readOne(l, 0, time.Millisecond, &read) // a reader slower than the sender
			args := append(tc.flags, "bash", "-c", fmt.Sprintf("exec 3<>/dev/tcp/10.0.2.2/%d; head -c %d /dev/zero >&3", l.Addr().(*net.TCPAddr).Port, 256<<20))
			killMidStream(t, r.Command(context.Background(), args...), &read, got)
		})
	}
}

// A published port's client, reading a stream from a server inside when
// gonetns is killed, reads ECONNRESET, not a clean end of the stream cut
// short (its relay's socket closed with a FIN before relay.Run armed the
// reset).
func TestPortsKilledMidStreamResets(t *testing.T) {
	e2etest.RequireTun(t)
	cmd, c := publishedSender(t, e2etest.Unprivileged(t), 256<<20)
	var read atomic.Int64
	killMidStream(t, cmd, &read, readSlowly(c, 0, time.Millisecond, &read))
}

// publishedSender starts gonetns with a server inside, published on the
// host's 127.0.0.1, that sends size zero bytes to its first client,
// closes and exits, and returns gonetns (killed at the test's end) and
// that client's connection.
func publishedSender(t *testing.T, r e2etest.Runner, size int) (*exec.Cmd, net.Conn) {
	t.Helper()
	hostPort := freePort(t, "tcp")
	cmd := r.Command(context.Background(), "-p", fmt.Sprintf("127.0.0.1:%d:8000/tcp", hostPort),
		"sh", "-c", e2etest.HelperCmd(t, "tcp-send-once", "127.0.0.1:8000", strconv.Itoa(size)))
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	if line, _ := bufio.NewReader(out).ReadString('\n'); line != "listening\n" {
		t.Fatalf("the server inside said %q", line)
	}
	c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", hostPort), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return cmd, c
}

// killMidStream starts cmd (gonetns) unless it has started, kills it with
// SIGKILL once the host has read 1 MiB of what comes through it, and
// wants the host's reading (got) to end with ECONNRESET.
func killMidStream(t *testing.T, cmd *exec.Cmd, read *atomic.Int64, got <-chan readEnd) {
	t.Helper()
	if cmd.Process == nil {
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
	}
	for deadline := time.Now().Add(netTimeout); read.Load() < 1<<20; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatal("the bytes never came")
		}
	}
	cmd.Process.Kill()
	cmd.Wait()
	select {
	case res := <-got:
		if !errors.Is(res.err, syscall.ECONNRESET) {
			t.Errorf("the host read %d bytes, then %v; want ECONNRESET for a stream cut short", res.n, res.err)
		}
	case <-time.After(netTimeout):
		t.Fatal("the host's reading did not end")
	}
}

// Without access to /dev/net/tun (a node of mode 0600, as many
// distributions ship it, in a mount namespace of the run's own: the
// machine's node stays as it is), gonetns takes the packet link and says
// so in one line; told to use the TAP, it says what to do.
func TestNetTunNotAccessible(t *testing.T) {
	e2etest.WithoutTun(t)
	r := e2etest.Unprivileged(t)
	srv := startHostHTTP(t)
	res := r.MustRun(t, netTimeout, "curl", "-sS", fmt.Sprintf("http://10.0.2.2:%d/", srv.port))
	if res.Stdout != "hello from the host\n" || !strings.Contains(res.Stderr, "/dev/net/tun cannot be opened (permission denied, mode 0600)") ||
		strings.Count(strings.TrimSpace(res.Stderr), "\n") != 0 {
		t.Errorf("without /dev/net/tun access, no flag: want the page and one line saying the packet link is used:\n%s", res)
	}
	res = r.Run(t, netTimeout, "--link=tap", "true")
	if res.Code != exitSetup || !strings.Contains(res.Stderr, "sudo chmod 0666 /dev/net/tun") || !strings.Contains(res.Stderr, "--link=packet") ||
		!strings.Contains(res.Stderr, "--net=none") {
		t.Errorf("without /dev/net/tun access, --link=tap: %s", res)
	}
	if st, err := os.Stat("/dev/net/tun"); err != nil || st.Mode().Perm()&0o006 != 0o006 {
		t.Errorf("the machine's /dev/net/tun changed: %v %v", st.Mode(), err)
	}
}

// A server inside, published with -p, that sends its answer, closes and
// exits while its client reads late: the client gets all of it, then the
// end of the stream, as from a server on its own machine. The port's
// relay was reset at exit (of 1 MiB the client read 128,000 bytes, then
// ECONNRESET).
func TestPortsBytesLeftAtExitDelivered(t *testing.T) {
	e2etest.RequireTun(t)
	const size = 1 << 20
	_, c := publishedSender(t, e2etest.Unprivileged(t), size)
	time.Sleep(time.Second) // the server has sent, closed and exited
	c.SetReadDeadline(time.Now().Add(netTimeout))
	n, err := io.Copy(io.Discard, c)
	if n != size || err != nil {
		t.Errorf("the client read %d of %d bytes, then %v; want all, then the end of the stream", n, size, err)
	}
}

// Published ports: -p at start, then the API through rootlessctl and
// gonetns ctl, from the host and from inside.
func TestPortsPublishAndAPI(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	hostPort, hostPort2, udpPort := freePort(t, "tcp"), freePort(t, "tcp"), freePort(t, "udp")
	state := r.TempDir(t) + "/state"
	sock := state + "/api.sock"
	script := fmt.Sprintf(`%s 127.0.0.1:8000 & a=$!; %s 127.0.0.1:5300 & b=$!
for i in $(seq 100); do [ -S "$GONETNS_STATE_DIR/api.sock" ] && break; sleep 0.05; done
echo ready
read line
%s ctl list-ports
kill $a $b`, e2etest.HelperCmd(t, "http-serve"), e2etest.HelperCmd(t, "udp-serve"), r.Bin)
	cmd := r.Command(context.Background(), "--state-dir="+state,
		"-p", fmt.Sprintf("127.0.0.1:%d:8000/tcp", hostPort),
		"-p", fmt.Sprintf("127.0.0.1:%d:5300/udp", udpPort),
		"sh", "-c", script)
	sess := e2etest.Interact(t, cmd)
	stdin, stderr, br := sess.Stdin, sess.Stderr, sess.Stdout
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	waitLine(t, br, "ready")

	// A new connection each time: a removed port keeps relaying the
	// connections it has, so keep-alive would hide the removal.
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	get := func(port int) string {
		for i := 0; i < 100; i++ {
			resp, err := client.Get(fmt.Sprintf("http://127.0.0.1:%d/", port))
			if err == nil {
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				return string(b)
			}
			time.Sleep(50 * time.Millisecond)
		}
		return "unreachable"
	}
	if got := get(hostPort); got != "hello from inside\n" {
		t.Fatalf("-p 127.0.0.1:%d:8000/tcp: %q\n%s", hostPort, got, stderr.String())
	}
	if got := udpRoundTrip(t, udpPort, "to-inside"); got != "inside:to-inside" {
		t.Errorf("-p .../udp: %q", got)
	}

	ctl := func(prog string, args ...string) e2etest.Result {
		t.Helper()
		c := r.Command(context.Background())
		c.Path, c.Args = prog, append([]string{prog}, args...)
		out, err := c.Output()
		res := e2etest.Result{Stdout: string(out)}
		if ee, ok := err.(*execExitError); ok {
			res.Code, res.Stderr = ee.ExitCode(), string(ee.Stderr)
		}
		return res
	}
	rootlessctl := "/usr/bin/rootlessctl"
	if _, err := os.Stat(rootlessctl); err != nil {
		t.Fatalf("rootlessctl is missing (apt-get install rootlesskit): %v", err)
	}
	res := ctl(rootlessctl, "--socket", sock, "add-ports", fmt.Sprintf("127.0.0.1:%d:8000/tcp", hostPort2))
	if strings.TrimSpace(res.Stdout) != "3" {
		t.Errorf("rootlessctl add-ports: %s", res)
	}
	if got := get(hostPort2); got != "hello from inside\n" {
		t.Errorf("port added by rootlessctl: %q", got)
	}
	res = ctl(rootlessctl, "--socket", sock, "list-ports", "--json")
	if !strings.Contains(res.Stdout, fmt.Sprintf(`"parentPort":%d`, hostPort2)) || strings.Count(res.Stdout, `"id"`) != 3 {
		t.Errorf("rootlessctl list-ports --json: %s", res)
	}
	res = ctl(rootlessctl, "--socket", sock, "info", "--json")
	res.Stdout = compactJSON(res.Stdout)
	for _, want := range []string{`"apiVersion":"1.1.1"`, `"childIP":"10.0.2.100"`, `"dns":["10.0.2.3"]`, `"driver":"builtin"`, `"stateDir":"` + state + `"`} {
		if !strings.Contains(res.Stdout, want) {
			t.Errorf("rootlessctl info --json lacks %s: %s", want, res)
		}
	}
	res = ctl(rootlessctl, "--socket", sock, "add-ports", fmt.Sprintf("127.0.0.1:%d:8000/tcp", hostPort2))
	if res.Code == 0 {
		t.Errorf("a duplicate publish was accepted: %s", res)
	}
	res = ctl(rootlessctl, "--socket", sock, "remove-ports", "3")
	if res.Code != 0 {
		t.Errorf("rootlessctl remove-ports: %s", res)
	}
	if got := get(hostPort2); got != "unreachable" {
		t.Errorf("removed port still answers: %q", got)
	}
	// gonetns ctl from the host, then from inside the sandbox.
	res = ctl(r.Bin, "ctl", "--socket", sock, "add-ports", fmt.Sprintf("127.0.0.1:%d:8000/tcp", hostPort2))
	if strings.TrimSpace(res.Stdout) != "4" {
		t.Errorf("gonetns ctl add-ports: %s", res)
	}
	res = ctl(r.Bin, "ctl", "--socket", sock, "info", "--json")
	if !strings.Contains(compactJSON(res.Stdout), `"childIP":"10.0.2.100"`) {
		t.Errorf("gonetns ctl info --json: %s", res)
	}
	fmt.Fprintln(stdin, "go")
	var inside []string
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			break
		}
		inside = append(inside, line)
	}
	all := strings.Join(inside, "")
	if !strings.Contains(all, strconv.Itoa(hostPort)) || !strings.Contains(all, strconv.Itoa(hostPort2)) || strings.Contains(all, "error") {
		t.Errorf("gonetns ctl list-ports inside the sandbox:\n%s\n%s", all, stderr.String())
	}
}

type execExitError = exec.ExitError

func waitLine(t *testing.T, br *bufio.Reader, want string) {
	t.Helper()
	done := make(chan string, 1)
	go func() {
		for {
			line, err := br.ReadString('\n')
			if err != nil || strings.TrimSpace(line) == want {
				done <- line
				return
			}
		}
	}()
	select {
	case line := <-done:
		if strings.TrimSpace(line) != want {
			t.Fatalf("sandbox output ended before %q", want)
		}
	case <-time.After(netTimeout):
		t.Fatalf("no %q from the sandbox", want)
	}
}

// waitPrefix returns the first line of the sandbox's output that starts
// with prefix, waiting at most d.
func waitPrefix(t *testing.T, br *bufio.Reader, prefix string, d time.Duration) string {
	t.Helper()
	done := make(chan string, 1)
	go func() {
		for {
			line, err := br.ReadString('\n')
			if err != nil || strings.HasPrefix(line, prefix) {
				done <- line
				return
			}
		}
	}()
	select {
	case line := <-done:
		if !strings.HasPrefix(line, prefix) {
			t.Fatalf("sandbox output ended before a line %q...", prefix)
		}
		return strings.TrimSpace(line)
	case <-time.After(d):
		t.Fatalf("no line %q... from the sandbox", prefix)
	}
	return ""
}

// waitUntil polls cond until it holds or d passes.
func waitUntil(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
	return true
}

// freePort: a port free for TCP and UDP, outside the ephemeral range.
func freePort(t *testing.T, _ string) int { return e2etest.FreePort(t) }

func udpRoundTrip(t *testing.T, port int, msg string) string {
	t.Helper()
	c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(port))))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	b := make([]byte, 65536)
	for i := 0; i < 20; i++ { // the server inside may still be starting
		c.Write([]byte(msg))
		c.SetReadDeadline(time.Now().Add(250 * time.Millisecond))
		n, err := c.Read(b)
		if err == nil {
			return string(b[:n])
		}
	}
	return "no reply"
}

func compactJSON(s string) string {
	var b bytes.Buffer
	if err := json.Compact(&b, []byte(s)); err != nil {
		return s
	}
	return b.String()
}

// --ipv6: the sandbox reaches the host's ::1 through fd00::2 (TCP, UDP,
// ping) and resolves through fd00::3.
func TestNetIPv6(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	l, err := net.Listen("tcp", "[::1]:0")
	if err != nil {
		t.Fatalf("the host has no IPv6 loopback: %v", err)
	}
	defer l.Close()
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello over IPv6 from %s\n", r.RemoteAddr)
	})}
	go srv.Serve(l)
	defer srv.Close()
	udpPort := startUDPEcho(t, "[::1]:0", "v6:")
	upstream := startUpstreamDNS(t)
	tcpPort := l.Addr().(*net.TCPAddr).Port
	script := fmt.Sprintf(`set -e
grep -c '^nameserver fd00::3$' /etc/resolv.conf
curl -sS -g http://[fd00::2]:%d/
%s
ping -6 -c 1 -W 3 fd00::2 | grep -c '1 received'
%s`, tcpPort, e2etest.HelperCmd(t, "udp-echo", fmt.Sprintf("[fd00::2]:%d", udpPort), "dgram"),
		"getent hosts gonetns-e2e.test")
	res := r.MustRun(t, netTimeout, "--ipv6", "--dns-upstream="+upstream, "sh", "-c", script)
	lines := strings.Split(strings.TrimSpace(res.Stdout), "\n")
	if len(lines) != 5 || lines[0] != "1" || !strings.HasPrefix(lines[1], "hello over IPv6 from [::1]:") ||
		lines[2] != "v6:dgram" || lines[3] != "1" || !strings.HasPrefix(lines[4], "192.0.2.55") {
		t.Errorf("IPv6 inside: %q\n%s", lines, res)
	}
	// The DNS server answers on its IPv6 address too.
	res = r.MustRun(t, netTimeout, "--ipv6", "--dns-upstream="+upstream, "sh", "-c",
		e2etest.HelperCmd(t, "dns-query", "[fd00::3]:53", "gonetns-e2e.test."))
	if !strings.Contains(res.Stdout, "192.0.2.55") {
		t.Errorf("query to [fd00::3]:53: %s", res)
	}
}

// A slow reader on either side must slow the transfer down, never stall
// it (slirp4netns #284 stalled at MTU 65520): flow control has to reopen
// windows as the reader drains.
func TestNetSlowReadersDoNotStall(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	const size = 16 << 20
	l := hostListener(t)
	got := make(chan int64, 1)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func(c net.Conn) {
				defer c.Close()
				var mode [1]byte
				if _, err := io.ReadFull(c, mode[:]); err != nil {
					return
				}
				if mode[0] == 'r' { // the host reads slowly
					b := make([]byte, 16<<10)
					var total int64
					for i := 0; ; i++ {
						n, err := c.Read(b)
						total += int64(n)
						if err != nil {
							break
						}
						if i%8 == 0 {
							time.Sleep(time.Millisecond)
						}
					}
					got <- total
					return
				}
				c.Write(make([]byte, size)) // the sandbox reads slowly
			}(c)
		}
	}()
	port := l.Addr().(*net.TCPAddr).Port
	addr := fmt.Sprintf("10.0.2.2:%d", port)
	for _, mtu := range []string{"65520", "1500"} {
		// Upload to a slow host reader: the helper's first byte says which.
		res := r.MustRun(t, 2*netTimeout, "--mtu="+mtu, "sh", "-c",
			"printf r | cat - /dev/zero | head -c "+strconv.Itoa(size+1)+" | "+e2etest.HelperCmd(t, "stdin-send", addr))
		select {
		case n := <-got:
			if n != size {
				t.Errorf("mtu %s: the slow host reader got %d bytes, want %d\n%s", mtu, n, size, res)
			}
		case <-time.After(netTimeout):
			t.Fatalf("mtu %s: upload to a slow reader stalled\n%s", mtu, res)
		}
		// Download into a slow reader in the sandbox.
		res = r.MustRun(t, 2*netTimeout, "--mtu="+mtu, "sh", "-c", "printf w | "+e2etest.HelperCmd(t, "stdin-send-then-slow-read", addr))
		if strings.TrimSpace(res.Stdout) != "read "+strconv.Itoa(size) {
			t.Errorf("mtu %s: download into a slow reader: %s", mtu, res)
		}
	}
}

// gonetns ctl against a running sandbox from the host: list (table and
// JSON), add, remove.
func TestPortsCtlFromHost(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	state := r.TempDir(t) + "/state"
	hostPort := freePort(t, "tcp")
	cmd := r.Command(context.Background(), "--state-dir="+state, "sh", "-c", "echo ready; exec sleep 60")
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	waitLine(t, bufio.NewReader(out), "ready")
	sock := state + "/api.sock"
	run := func(args ...string) string {
		t.Helper()
		res := r.MustRun(t, quick, append([]string{"ctl", "--socket", sock}, args...)...)
		return res.Stdout
	}
	if got := strings.TrimSpace(run("add-ports", fmt.Sprintf("127.0.0.1:%d:80/tcp", hostPort))); got != "1" {
		t.Errorf("add-ports printed %q, want 1", got)
	}
	if got := run("list-ports"); !strings.Contains(got, "PARENTPORT") || !strings.Contains(got, strconv.Itoa(hostPort)) {
		t.Errorf("list-ports:\n%s", got)
	}
	// One JSON object per line, as rootlessctl prints them.
	var port map[string]any
	js := strings.TrimSpace(run("list-ports", "--json"))
	if err := json.Unmarshal([]byte(js), &port); err != nil || port["id"] != float64(1) || strings.Count(js, "\n") != 0 {
		t.Errorf("list-ports --json: %q (%v)", js, err)
	}
	if got := strings.TrimSpace(run("remove-ports", "1")); got != "1" {
		t.Errorf("remove-ports printed %q", got)
	}
	if got := strings.TrimSpace(run("list-ports", "--json")); got != "" {
		t.Errorf("after remove-ports: %q", got)
	}
	res := r.Run(t, quick, "ctl", "--socket", sock, "remove-ports", "1")
	if res.Code == 0 || !strings.Contains(res.Stderr, "1") {
		t.Errorf("removing an unknown port: %s", res)
	}
}

// TestNetManyConnections: the sandbox opens 10,000 TCP connections to the
// host at once and holds them, run with a login-like open-files limit
// (soft 1024, hard 20000). Up to the NAT's share of the descriptor budget
// they are made and echo a byte; beyond it they are refused at once (a
// reset), none hangs; the parent's descriptors stay within its limit, and
// return to where they were once the connections close.
func TestNetManyConnections(t *testing.T) {
	const (
		conns     = 10000
		hardLimit = 20000
	)
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	prlimit, err := exec.LookPath("prlimit")
	if err != nil {
		t.Fatalf("prlimit (util-linux) is needed to give gonetns a login-like open-files limit: %v", err)
	}
	port := startTCPEcho(t)
	script := fmt.Sprintf("echo ready; read go; %s", e2etest.HelperCmd(t, "tcp-conc", fmt.Sprintf("10.0.2.2:%d", port), strconv.Itoa(conns)))
	cmd := r.Command(context.Background(), "sh", "-c", script)
	cmd.Args = append([]string{prlimit, fmt.Sprintf("--nofile=1024:%d", hardLimit), "--", r.Bin}, cmd.Args[1:]...)
	cmd.Path = prlimit
	sess := e2etest.Interact(t, cmd)
	defer cmd.Process.Kill()
	pid := cmd.Process.Pid // prlimit execs gonetns in place
	waitLine(t, sess.Stdout, "ready")
	base := fdCount(t, pid)
	fmt.Fprintln(sess.Stdin, "go")
	line := waitPrefix(t, sess.Stdout, "held ", 2*netTimeout)
	var held, refused, failed int
	fmt.Sscanf(line, "held %d refused %d failed %d", &held, &refused, &failed)
	peak := fdCount(t, pid)
	budget := fdbudget.For(hardLimit - 1) // the soft limit gonetns raises itself to (fdbudget.Raise)
	want := min(conns, budget.NATTCPConns)
	t.Logf("%d connections: %d held, %d refused, %d failed; the parent's descriptors: %d before, %d with them open (NAT's share %d)",
		conns, held, refused, failed, base, peak, budget.NATTCPConns)
	if held != want || refused != conns-want || failed != 0 {
		t.Errorf("%d held, %d refused, %d failed: want %d held and the rest refused at once", held, refused, failed, want)
	}
	if peak > hardLimit {
		t.Errorf("the parent holds %d descriptors, beyond its limit of %d", peak, hardLimit)
	}
	fmt.Fprintln(sess.Stdin, "close")
	waitLine(t, sess.Stdout, "closed")
	var now int
	if !waitUntil(10*time.Second, func() bool { now = fdCount(t, pid); return now <= base+2 }) {
		t.Errorf("the parent still holds %d descriptors after the connections closed (%d before)", now, base)
	}
	sess.Stdin.Close()
	cmd.Wait()
}

// TestNetEventLoop runs the network with the event loop (the TAP and the
// fast path's host sockets read on one thread: the default), with
// --busy-poll=auto (the default), 0 and 50us (that thread polling between
// events): a large download, sha256-checked,
// at MTU 1500 and 65520; a 1 MB upload closed by a half-close; UDP, which
// the loop reads from the TAP and hands to the stack, and whose answers it
// reads from the host socket (the NAT's flows attached); and many short
// connections, each one round trip.
func TestNetEventLoop(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	srv := startHostHTTP(t)
	halfClose := startHalfCloseServer(t)
	udp := startUDPEcho(t, "127.0.0.1:0", "host:")
	for _, tc := range []struct {
		name, says string
		flags      []string
		mtu        int
	}{
		// --busy-poll=auto: the loop polls or not as this machine's idle
		// CPUs wait, and says why.
		{"default", `busy_poll_why="auto: `, nil, 1500},
		{"default", `busy_poll_why="auto: `, nil, 65520},
		// The same traffic, the loop never polling, and polling between
		// events whatever the machine.
		{"busy-poll=0", "busy-poll=0s", []string{"--busy-poll=0"}, 65520},
		{"busy-poll=50us", "busy-poll=50µs", []string{"--busy-poll=50us"}, 1500},
		{"busy-poll=50us", "busy-poll=50µs", []string{"--busy-poll=50us"}, 65520},
	} {
		t.Run(fmt.Sprintf("%s/mtu=%d", tc.name, tc.mtu), func(t *testing.T) {
			script := fmt.Sprintf("curl -sS --fail http://10.0.2.2:%d/blob | sha256sum; %s; %s; for i in $(seq 200); do curl -sS --fail http://10.0.2.2:%d/; done | sort | uniq -c",
				srv.port,
				e2etest.HelperCmd(t, "tcp-halfclose", fmt.Sprintf("10.0.2.2:%d", halfClose), "1000000"),
				e2etest.HelperCmd(t, "udp-echo", fmt.Sprintf("10.0.2.2:%d", udp), "datagram-1"),
				srv.port)
			args := append(append([]string{"--debug"}, tc.flags...), fmt.Sprintf("--mtu=%d", tc.mtu), "sh", "-c", script)
			res := r.MustRun(t, netTimeout, args...)
			if !strings.Contains(res.Stderr, "event loop") || !strings.Contains(res.Stderr, tc.says) || !strings.Contains(res.Stderr, "event_loop=true") {
				t.Errorf("%s: the network did not say it runs the event loop with %s\n%s", tc.name, tc.says, res)
			}
			if !strings.Contains(res.Stderr, "udp: the host's answers are read on the event loop") {
				t.Errorf("%s: the UDP flow's answers were not read on the event loop\n%s", tc.name, res)
			}
			out := res.Stdout
			for _, want := range []string{srv.sum, "host read 1000000 bytes", "host:datagram-1", "200 hello from the host"} {
				if !strings.Contains(out, want) {
					t.Errorf("output lacks %q\n%s", want, res)
				}
			}
		})
	}
}

// TestNetKeepaliveProbes: a connection whose program asks for keepalive
// probes (from 1 s idle, every second, dead after 2 unanswered) stays up
// through 5 s of idleness, on the fast path with and without the event
// loop and on the netstack's TCP. Before the fast path answered the
// sandbox's probes, its kernel ended such a connection (ETIMEDOUT); with
// Go's dialer defaults (15 s idle, 9 probes 15 s apart), after 2.5
// minutes of idleness.
func TestNetKeepaliveProbes(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	addr := fmt.Sprintf("10.0.2.2:%d", startTCPEcho(t))
	for _, flag := range []string{"--tcp-fast-path=true", "--event-loop=false", "--tcp-fast-path=false"} {
		t.Run(strings.TrimPrefix(flag, "--"), func(t *testing.T) {
			res := r.MustRun(t, netTimeout, flag, "sh", "-c", e2etest.HelperCmd(t, "tcp-keepalive", addr, "5s"))
			if !strings.Contains(res.Stdout, "alive after 5s idle") {
				t.Errorf("the idle connection did not survive its keepalive probes\n%s", res)
			}
		})
	}
}

// TestNetRoundTripsAllocateNothing: the fast path's round trips allocate
// nothing in the network process (before, about 12 objects each: the
// garbage of every frame made the process collect every few thousand
// round trips). A warm-up connection, then 10,000 one-byte round trips on
// another; the network's --debug report at each quiet spell says how many
// objects it allocated since the start: the last report before the round
// trips and the first after them are compared.
func TestNetRoundTripsAllocateNothing(t *testing.T) {
	const trips = 10000
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	addr := fmt.Sprintf("10.0.2.2:%d", startTCPEcho(t))
	for _, flag := range []string{"--tcp-fast-path=true", "--event-loop=false"} {
		t.Run(strings.TrimPrefix(flag, "--"), func(t *testing.T) {
			// Each sleep outlasts the quiet spell a report waits for (1-2
			// s without a frame); the first also the sandbox's own frames
			// of its first 2.5 s (IPv6 neighbor and router solicitations,
			// multicast listener reports), which leave no such spell.
			script := fmt.Sprintf("%s && sleep 6 && %s && sleep 4",
				e2etest.HelperCmd(t, "tcp-rr", addr, "100"), e2etest.HelperCmd(t, "tcp-rr", addr, strconv.Itoa(trips)))
			res := r.MustRun(t, netTimeout, "--debug", flag, "--mtu=65520", "sh", "-c", script)
			var from, to string
			for _, line := range strings.Split(res.Stdout, "\n") {
				fmt.Sscanf(line, fmt.Sprintf("%d round trips from %%s to %%s", trips), &from, &to)
			}
			if from == "" {
				t.Fatalf("the round trips did not complete\n%s", res)
			}
			before, after := -1, -1
			for _, line := range strings.Split(res.Stderr, "\n") {
				_, report, ok := strings.Cut(line, "the network is quiet:")
				_, v, ok2 := strings.Cut(report, " allocations=")
				if !ok || !ok2 || len(line) < len(logClock) {
					continue
				}
				n, _ := strconv.Atoi(strings.Fields(v)[0])
				switch at := line[:len(logClock)]; {
				case at < from:
					before = n
				case at > to && after < 0:
					after = n
				}
			}
			if before < 0 || after < 0 {
				t.Fatalf("want a quiet-network report before the round trips (%s) and one after them (%s)\n%s", from, to, res)
			}
			per := float64(after-before) / trips
			t.Logf("%s: %d objects allocated over %d round trips and their connection: %.3f per round trip", flag, after-before, trips, per)
			if per > 0.1 {
				t.Errorf("the network process allocated %.2f objects per round trip; want none (0.1 at most: the connection and the report)", per)
			}
		})
	}
}

// hostListener listens on the host's 127.0.0.1, on a port of the
// kernel's choice, until the test ends.
func hostListener(t *testing.T) *net.TCPListener {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l.(*net.TCPListener)
}

// readEnd is how a host server's reading of one connection ended.
type readEnd struct {
	n   int64
	err error // nil: the end of the stream
}

// readOne accepts one connection on l and reads it to its end (readSlowly).
func readOne(l net.Listener, wait, pause time.Duration, read *atomic.Int64) <-chan readEnd {
	got := make(chan readEnd, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			got <- readEnd{0, err}
			return
		}
		got <- <-readSlowly(c, wait, pause, read)
	}()
	return got
}

// readSlowly reads c to its end, from wait on, pausing pause after each
// read, and closes it; read counts the bytes as they come.
func readSlowly(c net.Conn, wait, pause time.Duration, read *atomic.Int64) <-chan readEnd {
	got := make(chan readEnd, 1)
	go func() {
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(wait + netTimeout))
		time.Sleep(wait)
		b := make([]byte, 64<<10)
		for {
			n, err := c.Read(b)
			read.Add(int64(n))
			if err != nil {
				if err == io.EOF {
					err = nil
				}
				got <- readEnd{read.Load(), err}
				return
			}
			time.Sleep(pause)
		}
	}()
	return got
}
