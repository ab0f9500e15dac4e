package main

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/gonetns/gonetns/internal/e2etest"
)

// peerServer is an HTTP server on the host's loopback that remembers the
// address of every client.
type peerServer struct {
	port  int
	mu    sync.Mutex
	peers []string
}

// startPeerHTTP listens on addr (e.g. "127.0.0.1:0" or "[::1]:0").
func startPeerHTTP(t *testing.T, addr string) *peerServer {
	t.Helper()
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	s := &peerServer{port: l.Addr().(*net.TCPAddr).Port}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host, _, _ := net.SplitHostPort(r.RemoteAddr)
		s.mu.Lock()
		s.peers = append(s.peers, host)
		s.mu.Unlock()
		fmt.Fprintf(w, "hello %s\n", host)
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return s
}

func (s *peerServer) clients() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.peers...)
}

// startUDPPeerEcho answers every datagram on addr with "from=<sender's
// address>", until the test ends, and returns the port.
func startUDPPeerEcho(t *testing.T, addr string) int {
	t.Helper()
	return startUDPServer(t, addr, func(from *net.UDPAddr, _ []byte) []byte {
		return []byte("from=" + from.IP.String())
	})
}

func requirePing(t *testing.T, r e2etest.Runner) {
	t.Helper()
	if !r.PingAllowed(t) {
		t.Fatalf("ping sockets are not allowed for %s (net.ipv4.ping_group_range=%q): run scripts/test-setup.sh as root",
			r.User.Username, e2etest.Sysctl(t, "net.ipv4.ping_group_range"))
	}
}

// --pcap records the sandbox's link both ways: its SYN to the gateway and
// the answer, and large segments whole (the stack's 64 KB segments to the
// sandbox at MTU 1500), readable by tcpdump -r.
func TestEgressPcap(t *testing.T) {
	e2etest.RequireTun(t)
	tcpdump, err := exec.LookPath("tcpdump")
	if err != nil {
		t.Fatal("tcpdump is not installed: run scripts/test-setup.sh as root (apt-get install tcpdump)")
	}
	r := e2etest.Unprivileged(t)
	srv := startHostHTTP(t)
	file := filepath.Join(r.TempDir(t), "link.pcap")
	res := r.MustRun(t, netTimeout, "--mtu=1500", "--pcap="+file, "sh", "-c",
		fmt.Sprintf("curl -sS --fail http://10.0.2.2:%d/blob | sha256sum", srv.port))
	if !strings.Contains(res.Stdout, srv.sum) {
		t.Fatalf("download with --pcap: %s", res)
	}
	st, err := os.Stat(file)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("the capture is mode %04o, want 0600 (it holds all the sandbox's traffic)", st.Mode().Perm())
	}
	out, err := exec.Command(tcpdump, "-nn", "-r", file, "tcp").CombinedOutput()
	if err != nil {
		t.Fatalf("tcpdump -r %s: %v\n%s", file, err, out)
	}
	dump := string(out)
	syn := regexp.MustCompile(fmt.Sprintf(`IP 10\.0\.2\.100\.\d+ > 10\.0\.2\.2\.%d: Flags \[S\],`, srv.port))
	synAck := regexp.MustCompile(fmt.Sprintf(`IP 10\.0\.2\.2\.%d > 10\.0\.2\.100\.\d+: Flags \[S\.\],`, srv.port))
	if !syn.MatchString(dump) || !synAck.MatchString(dump) {
		t.Errorf("tcpdump -r does not show the SYN to 10.0.2.2:%d and its answer:\n%.3000s", srv.port, dump)
	}
	largest := 0
	for _, m := range regexp.MustCompile(fmt.Sprintf(`IP 10\.0\.2\.2\.%d > 10\.0\.2\.100\.\d+: .*length (\d+)`, srv.port)).FindAllStringSubmatch(dump, -1) {
		n, _ := strconv.Atoi(m[1])
		largest = max(largest, n)
	}
	if largest <= 1460 {
		t.Errorf("the largest segment to the sandbox in the capture carries %d bytes; at MTU 1500 the stack sends 64 KB segments (GSO), which must be recorded whole", largest)
	}
	t.Logf("capture: %d bytes, largest segment to the sandbox %d bytes", st.Size(), largest)

	// A bound: the capture stops at --pcap-max-size, with one notice.
	small := filepath.Join(r.TempDir(t), "small.pcap")
	res = r.MustRun(t, netTimeout, "--pcap="+small, "--pcap-max-size=1MiB", "sh", "-c",
		fmt.Sprintf("curl -sS --fail http://10.0.2.2:%d/blob | sha256sum", srv.port))
	if !strings.Contains(res.Stdout, srv.sum) {
		t.Fatalf("download with a full capture: %s", res)
	}
	st, err = os.Stat(small)
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() > 1<<20 || st.Size() < 1<<19 {
		t.Errorf("capture bounded to 1 MiB is %d bytes", st.Size())
	}
	if n := strings.Count(res.Stderr, "reached its maximum size"); n != 1 {
		t.Errorf("%d notices of the full capture, want 1:\n%s", n, res.Stderr)
	}
	if out, err := exec.Command(tcpdump, "-nn", "-r", small).CombinedOutput(); err != nil {
		t.Errorf("tcpdump -r of the bounded capture: %v\n%.2000s", err, out)
	}
}

// --deny=127.0.0.1/32: the gateway, which is the host's 127.0.0.1, is
// refused at once (RST: curl exits 7, "Couldn't connect"; a dropped SYN
// would end in curl's timeout, exit 28), UDP and ping get "administratively
// prohibited"; the host's ::1 through fd00::2 still works. The rule is in
// GET /v1/info.
func TestEgressDenyLoopback(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	requirePing(t, r)
	v4 := startPeerHTTP(t, "127.0.0.1:0")
	v6 := startPeerHTTP(t, "[::1]:0")
	udp4 := startUDPPeerEcho(t, "127.0.0.1:0")
	script := strings.Join([]string{
		fmt.Sprintf("curl -sS --max-time 30 http://10.0.2.2:%d/ 2>&1; echo curl4=$?", v4.port),
		e2etest.HelperCmd(t, "tcp-dial", fmt.Sprintf("10.0.2.2:%d", v4.port)),
		fmt.Sprintf("curl -sS --max-time 30 http://[fd00::2]:%d/; echo curl6=$?", v6.port),
		e2etest.HelperCmd(t, "udp-echo", fmt.Sprintf("10.0.2.2:%d", udp4), "x"),
		"ping -c 1 -W 5 10.0.2.2",
		"echo ping6=$(ping -6 -c 1 -W 5 fd00::2 | grep -c '1 received')",
		`curl -sS --unix-socket "$ROOTLESSKIT_STATE_DIR/api.sock" http://api/v1/info`,
		r.Bin + " ctl info",
	}, "; ")
	res := r.Run(t, netTimeout, "--debug", "--ipv6", "--deny=127.0.0.1/32", "sh", "-c", script)
	out := res.Stdout
	for _, want := range []string{
		"curl4=7",            // refused: not a timeout (28)
		"Couldn't connect",   // curl's words for ECONNREFUSED
		"connection refused", // the helper's dial
		"hello ::1\ncurl6=0", // the host's ::1 is not denied
		"no route to host",   // UDP: EHOSTUNREACH, from ICMP code 13
		"Packet filtered",    // ping's words for code 13
		"ping6=1",            // ping -6 fd00::2 answered
		`"egress":{"default":"allow","rules":[{"prefix":"127.0.0.1/32","action":"deny","origin":"--deny=127.0.0.1/32"}]}`,
		"  - Egress: deny 127.0.0.1/32; otherwise allow\n", // gonetns ctl info
	} {
		if !strings.Contains(out, want) {
			t.Errorf("inside, with --deny=127.0.0.1/32: no %q in\n%s", want, res)
		}
	}
	if c := v4.clients(); len(c) != 0 {
		t.Errorf("the host's 127.0.0.1 server was reached by %v despite the rule", c)
	}
	// One debug line per refused destination and protocol, however many
	// times it is refused (curl and the helper both tried TCP).
	if n := strings.Count(res.Stderr, "refused by the egress policy"); n != 3 {
		t.Errorf("%d debug lines about refusals, want 3 (tcp, udp, icmp to 10.0.2.2):\n%s", n, res.Stderr)
	}
}

// --allow alone makes an allow-list: --allow=127.0.0.1/32 keeps the
// gateway and refuses the host's ::1 through fd00::2 (TCP reset, UDP and
// ping6 "administratively prohibited").
func TestEgressAllowAlone(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	requirePing(t, r)
	v4 := startPeerHTTP(t, "127.0.0.1:0")
	v6 := startPeerHTTP(t, "[::1]:0")
	udp4 := startUDPPeerEcho(t, "127.0.0.1:0")
	udp6 := startUDPPeerEcho(t, "[::1]:0")
	script := strings.Join([]string{
		fmt.Sprintf("curl -sS --max-time 30 http://10.0.2.2:%d/; echo curl4=$?", v4.port),
		fmt.Sprintf("curl -sS --max-time 30 http://[fd00::2]:%d/ 2>&1; echo curl6=$?", v6.port),
		e2etest.HelperCmd(t, "udp-echo", fmt.Sprintf("10.0.2.2:%d", udp4), "x"),
		e2etest.HelperCmd(t, "udp-echo", fmt.Sprintf("[fd00::2]:%d", udp6), "x"),
		"echo ping4=$(ping -c 1 -W 5 10.0.2.2 | grep -c '1 received')",
		"ping -6 -c 1 -W 5 fd00::2",
		`curl -sS --unix-socket "$ROOTLESSKIT_STATE_DIR/api.sock" http://api/v1/info`,
	}, "; ")
	res := r.Run(t, netTimeout, "--ipv6", "--allow=127.0.0.1", "sh", "-c", script)
	for _, want := range []string{
		"hello 127.0.0.1\ncurl4=0",
		"curl6=7",
		"from=127.0.0.1",              // UDP to the allowed gateway
		"permission denied",           // UDP to fd00::2: EACCES, from ICMPv6 code 1
		"ping4=1",                     // ping 10.0.2.2 answered
		"Administratively prohibited", // ping6's words for code 1
		`"egress":{"default":"deny","rules":[{"prefix":"127.0.0.1/32","action":"allow","origin":"--allow=127.0.0.1/32"}]}`,
	} {
		if !strings.Contains(res.Stdout, want) {
			t.Errorf("inside, with --allow=127.0.0.1 alone: no %q in\n%s", want, res)
		}
	}
	if c := v6.clients(); len(c) != 0 {
		t.Errorf("the host's ::1 server was reached by %v although only 127.0.0.1 is allowed", c)
	}
}

// --deny-private and --deny-metadata leave the sandbox's own services
// alone: the gateway (the host's loopback) and DNS.
func TestEgressDenyPrivateKeepsOwnServices(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	srv := startPeerHTTP(t, "127.0.0.1:0")
	upstream := startUpstreamDNS(t)
	res := r.Run(t, netTimeout, "--deny-private", "--deny-metadata", "--dns-upstream="+upstream, "sh", "-c",
		fmt.Sprintf("curl -sS --max-time 30 http://10.0.2.2:%d/; getent hosts gonetns-e2e.test; ", srv.port)+
			`curl -sS --unix-socket "$ROOTLESSKIT_STATE_DIR/api.sock" http://api/v1/info`)
	for _, want := range []string{"hello 127.0.0.1", "192.0.2.55",
		`{"prefix":"169.254.169.254/32","action":"deny","origin":"--deny-metadata"}`,
		`{"prefix":"fc00::/7","action":"deny","origin":"--deny-private"}`,
	} {
		if !strings.Contains(res.Stdout, want) {
			t.Errorf("with --deny-private --deny-metadata: no %q in\n%s", want, res)
		}
	}
}

// --outbound-addr=127.0.0.2: the host's server sees the sandbox's
// connections and datagrams through the gateway come from 127.0.0.2.
func TestEgressOutboundAddr(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	srv := startPeerHTTP(t, "127.0.0.1:0")
	udp := startUDPPeerEcho(t, "127.0.0.1:0")
	res := r.MustRun(t, netTimeout, "--outbound-addr=127.0.0.2", "sh", "-c",
		fmt.Sprintf("curl -sS --max-time 30 http://10.0.2.2:%d/; ", srv.port)+
			e2etest.HelperCmd(t, "udp-echo", fmt.Sprintf("10.0.2.2:%d", udp), "x"))
	if !strings.Contains(res.Stdout, "hello 127.0.0.2") || !strings.Contains(res.Stdout, "from=127.0.0.2") {
		t.Errorf("with --outbound-addr=127.0.0.2: %s", res)
	}
	if c := srv.clients(); len(c) != 1 || c[0] != "127.0.0.2" {
		t.Errorf("the host's server saw clients %v, want [127.0.0.2]", c)
	}
	// An address that is not the host's fails at start, saying so.
	res = r.Run(t, netTimeout, "--outbound-addr=192.0.2.77", "true")
	if res.Code != exitSetup || !strings.Contains(res.Stderr, "cannot bind to 192.0.2.77") {
		t.Errorf("--outbound-addr with an address of no interface: %s", res)
	}
}
