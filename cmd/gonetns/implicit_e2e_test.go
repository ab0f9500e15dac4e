package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gonetns/gonetns/internal/e2etest"
)

// implicitBound is how long the test waits for a port to be published or
// withdrawn. gonetns takes 100-500 ms (its watcher's interval); the test
// asserts only the bound and logs what it took.
const implicitBound = 5 * time.Second

// --port-driver=implicit: servers started inside (TCP and UDP, IPv4, IPv6
// only and dual stack) are published on the same port of the host and
// withdrawn when they stop; /v1/info says implicit and list-ports marks
// them. The same with --detach-netns, the servers started in the detached
// namespace.
func TestPortsImplicit(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	for _, detach := range []bool{false, true} {
		name := "netns"
		if detach {
			name = "detach-netns"
		}
		t.Run(name, func(t *testing.T) { testPortsImplicit(t, r, detach) })
	}
}

// implicitSandbox is a running gonetns whose script starts and stops
// helper servers on request.
type implicitSandbox struct {
	t      *testing.T
	stdin  io.Writer
	lines  <-chan string
	stderr *e2etest.Log
}

func startImplicitSandbox(t *testing.T, r e2etest.Runner, state string, detach bool) *implicitSandbox {
	ns := ""
	args := []string{"--state-dir=" + state, "--port-driver=implicit", "--debug"}
	if detach {
		ns = `nsenter -n"$ROOTLESSKIT_STATE_DIR/netns" `
		args = append(args, "--detach-netns")
	}
	// "http ADDR NETWORK" and "udp ADDR NETWORK" start a server in the
	// sandbox's network namespace and print its pid; "kill PID" stops it.
	script := fmt.Sprintf(`echo ready
while read cmd arg net; do
  case $cmd in
  http|udp) %senv %s=$cmd-serve %s "$arg" "$net" & echo "pid $!";;
  kill) kill $arg; wait $arg 2>/dev/null; echo killed;;
  esac
done`, ns, e2etest.HelperEnv, e2etest.Helper(t))
	cmd := r.Command(context.Background(), append(args, "sh", "-c", script)...)
	sess := e2etest.Interact(t, cmd)
	sb := &implicitSandbox{t: t, stdin: sess.Stdin, lines: sess.Lines(), stderr: sess.Stderr}
	t.Cleanup(func() {
		sess.Stdin.Close()
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("gonetns's log:\n%s", sb.stderr)
		}
	})
	sb.expect("ready")
	return sb
}

// expect waits for a line from the script; "pid" matches "pid N" and
// returns N.
func (sb *implicitSandbox) expect(want string) string {
	sb.t.Helper()
	timeout := time.After(netTimeout)
	for {
		select {
		case line, ok := <-sb.lines:
			if !ok {
				sb.t.Fatalf("the sandbox ended before %q", want)
			}
			if strings.HasPrefix(line, "error") {
				sb.t.Fatalf("in the sandbox: %s", line)
			}
			if line == want {
				return ""
			}
			if pid, ok := strings.CutPrefix(line, want+" "); ok {
				return pid
			}
		case <-timeout:
			sb.t.Fatalf("no %q from the sandbox", want)
		}
	}
}

// start starts a server inside and returns its pid once it listens.
func (sb *implicitSandbox) start(kind, addr, network string) string {
	sb.t.Helper()
	fmt.Fprintf(sb.stdin, "%s %s %s\n", kind, addr, network)
	// The script's "pid" line and the helper's "listening" come in either
	// order.
	pid, listening := "", false
	timeout := time.After(netTimeout)
	for pid == "" || !listening {
		select {
		case line, ok := <-sb.lines:
			if !ok {
				sb.t.Fatalf("the sandbox ended while starting %s %s", kind, addr)
			}
			if strings.HasPrefix(line, "error") {
				sb.t.Fatalf("%s server on %s %s: %s", kind, network, addr, line)
			}
			if p, ok := strings.CutPrefix(line, "pid "); ok {
				pid = p
			}
			listening = listening || line == "listening"
		case <-timeout:
			sb.t.Fatalf("the %s server on %s did not start", kind, addr)
		}
	}
	return pid
}

func (sb *implicitSandbox) stop(pid string) {
	sb.t.Helper()
	fmt.Fprintf(sb.stdin, "kill %s\n", pid)
	sb.expect("killed")
}

// hostProbe tries a published port from the host once: nil when the
// server inside answered, an error matching ECONNREFUSED when nothing
// listens on the host port.
type hostProbe func() error

func httpProbe(addr string) hostProbe {
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: time.Second}
	return func() error {
		resp, err := client.Get("http://" + addr + "/")
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if string(b) != "hello from inside\n" {
			return fmt.Errorf("answer %q", b)
		}
		return nil
	}
}

func udpProbe(addr string) hostProbe {
	return func() error {
		c, err := net.Dial("udp", addr)
		if err != nil {
			return err
		}
		defer c.Close()
		if _, err := c.Write([]byte("ping")); err != nil {
			return err
		}
		c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		b := make([]byte, 100)
		n, err := c.Read(b)
		if err != nil {
			return err
		}
		if string(b[:n]) != "inside:ping" {
			return fmt.Errorf("answer %q", b[:n])
		}
		return nil
	}
}

// until polls p until ok says yes, and returns how long that took.
func until(t *testing.T, what string, p hostProbe, ok func(error) bool) time.Duration {
	t.Helper()
	start := time.Now()
	var err error
	for time.Since(start) < implicitBound {
		if err = p(); ok(err) {
			return time.Since(start)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("%s: not within %v (last: %v)", what, implicitBound, err)
	return 0
}

func answers(err error) bool { return err == nil }
func refused(err error) bool { return errors.Is(err, syscall.ECONNREFUSED) }

func testPortsImplicit(t *testing.T, r e2etest.Runner, detach bool) {
	state := r.TempDir(t) + "/state"
	sb := startImplicitSandbox(t, r, state, detach)
	sock := state + "/api.sock"

	info := compactJSON(r.MustRun(t, quick, "ctl", "--socket", sock, "info", "--json").Stdout)
	if !strings.Contains(info, `"portDriver":{"driver":"implicit"`) {
		t.Errorf("/v1/info does not say implicit: %s", info)
	}

	type server struct {
		kind, inside, network string
		reach                 []string // host addresses (with the port) that must answer
		notReach              []string // and that must not: the families mirror
	}
	p := func(network string) string { return strconv.Itoa(freePort(t, network)) }
	tcp4, tcp6, dual, udp4, udp6 := p("tcp"), p("tcp"), p("tcp"), p("udp"), p("udp")
	servers := []server{
		{"http", "0.0.0.0:" + tcp4, "tcp4", []string{"127.0.0.1:" + tcp4}, []string{"[::1]:" + tcp4}},
		{"http", "[::]:" + tcp6, "tcp6", []string{"[::1]:" + tcp6}, []string{"127.0.0.1:" + tcp6}},
		{"http", "[::]:" + dual, "tcp", []string{"127.0.0.1:" + dual, "[::1]:" + dual}, nil},
		{"udp", "0.0.0.0:" + udp4, "udp4", []string{"127.0.0.1:" + udp4}, nil},
		{"udp", "[::]:" + udp6, "udp6", []string{"[::1]:" + udp6}, nil},
	}
	probe := func(kind, addr string) hostProbe {
		if kind == "udp" {
			return udpProbe(addr)
		}
		return httpProbe(addr)
	}
	for _, s := range servers {
		what := fmt.Sprintf("%s server on %s (%s)", s.kind, s.inside, s.network)
		pid := sb.start(s.kind, s.inside, s.network)
		for _, a := range s.reach {
			d := until(t, what+" answering on the host's "+a, probe(s.kind, a), answers)
			t.Logf("%s: published on %s after %v", what, a, d.Round(time.Millisecond))
		}
		for _, a := range s.notReach {
			if err := probe(s.kind, a)(); !refused(err) {
				t.Errorf("%s: the host's %s does not refuse: %v", what, a, err)
			}
		}
		if s.kind == "http" {
			ports := r.MustRun(t, quick, "ctl", "--socket", sock, "list-ports", "--json").Stdout
			port := s.reach[0][strings.LastIndexByte(s.reach[0], ':')+1:]
			if !strings.Contains(ports, `"parentPort":`+port) || !strings.Contains(ports, `"implicit":true`) {
				t.Errorf("%s: list-ports --json does not show it as implicit:\n%s", what, ports)
			}
		}
		sb.stop(pid)
		for _, a := range s.reach {
			d := until(t, what+" withdrawn from the host's "+a, probe(s.kind, a), refused)
			t.Logf("%s: withdrawn from %s after %v", what, a, d.Round(time.Millisecond))
		}
	}
	if ports := strings.TrimSpace(r.MustRun(t, quick, "ctl", "--socket", sock, "list-ports", "--json").Stdout); ports != "" {
		t.Errorf("ports left after every server stopped:\n%s", ports)
	}
}

// A port the host is using when a listener appears inside on it stays the
// host's: the host's service restarts on it (lets go, and binds again 3 s
// later, as a restarting service does) and gets it back. list-ports and
// /v1/info say it is not published and why, the log says it once, and a
// new appearance of the listener with the port free publishes it.
func TestPortsImplicitLeavesHostPorts(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	state := r.TempDir(t) + "/state"
	sb := startImplicitSandbox(t, r, state, false)
	sock := state + "/api.sock"
	hp := strconv.Itoa(freePort(t, "tcp"))
	hostAddr := "127.0.0.1:" + hp
	hostService, err := net.Listen("tcp4", hostAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { hostService.Close() }()

	pid := sb.start("http", hostAddr, "tcp4")
	unpublished := func() string {
		return compactJSON(r.MustRun(t, quick, "ctl", "--socket", sock, "info", "--json").Stdout)
	}
	deadline := time.Now().Add(implicitBound)
	for !strings.Contains(unpublished(), `"parentPort":`+hp) && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if info := unpublished(); !strings.Contains(info, `"unpublished":[{"spec":{"proto":"tcp4","parentIP":"127.0.0.1","parentPort":`+hp) ||
		!strings.Contains(info, "the host was using this port") {
		t.Fatalf("/v1/info does not list %s as left to the host: %s", hostAddr, info)
	}
	list := r.MustRun(t, quick, "ctl", "--socket", sock, "list-ports").Stdout
	if !strings.Contains(list, "Not published") || !strings.Contains(list, hp) || !strings.Contains(list, "the host was using this port") {
		t.Errorf("list-ports does not say the port is not published and why:\n%s", list)
	}

	// The host's service restarts.
	hostService.Close()
	time.Sleep(3 * time.Second)
	hostService, err = net.Listen("tcp4", hostAddr)
	if err != nil {
		t.Fatalf("the host's service cannot bind %s again after a restart: %v", hostAddr, err)
	}
	hostService.Close()
	if n := strings.Count(sb.stderr.String(), "not publishing a port the host is using"); n != 1 {
		t.Errorf("logged %d times, want once:\n%s", n, sb.stderr)
	}

	// The server inside restarts with the host's port free: published.
	// The driver polls the listeners: it must see this one gone before it
	// comes back, or it is the same appearance still.
	sb.stop(pid)
	deadline = time.Now().Add(implicitBound)
	for strings.Contains(unpublished(), `"parentPort":`+hp) {
		if time.Now().After(deadline) {
			t.Fatalf("the stopped listener is still listed as not published after %v: %s", implicitBound, unpublished())
		}
		time.Sleep(20 * time.Millisecond)
	}
	pid = sb.start("http", hostAddr, "tcp4")
	d := until(t, "the listener's new appearance published on the host's "+hostAddr, httpProbe(hostAddr), answers)
	t.Logf("published %v after the listener came back", d.Round(time.Millisecond))
	sb.stop(pid)
}
