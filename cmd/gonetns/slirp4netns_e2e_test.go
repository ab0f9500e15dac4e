package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gonetns/gonetns/internal/e2etest"
)

// The slirp4netns personality against namespaces made the way
// slirp4netns's own tests make them (unshare -r -n sleep infinity), as the
// unprivileged test user: every option of slirp4netns 1.3's man page and
// every API command, checked from inside with ip(8), curl and the e2e
// helpers.

// slirpTarget is a network namespace someone else made: unshare -r -n
// sleep infinity, run as the test user.
type slirpTarget struct {
	t   *testing.T
	r   e2etest.Runner
	pid int
}

func newSlirpTarget(t *testing.T, r e2etest.Runner) *slirpTarget {
	t.Helper()
	cmd := r.Exec(context.Background(), "unshare", "-r", "-n", "sleep", "infinity")
	if err := cmd.Start(); err != nil {
		t.Fatalf("unshare -r -n: %v", err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	st := &slirpTarget{t: t, r: r, pid: cmd.Process.Pid}
	// The namespaces exist once sleep runs (unshare has exec'd it).
	deadline := time.Now().Add(10 * time.Second)
	for {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", st.pid))
		if strings.TrimSpace(string(b)) == "sleep" {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("unshare -r -n sleep infinity did not start: comm %q", b)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// in runs a command in the target's namespaces (user and network) and
// returns its output and error.
func (st *slirpTarget) in(timeout time.Duration, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := st.r.Exec(ctx, "nsenter", append([]string{"-t", strconv.Itoa(st.pid), "-U", "--preserve-credentials", "-n", name}, args...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (st *slirpTarget) mustIn(name string, args ...string) string {
	st.t.Helper()
	out, err := st.in(netTimeout, name, args...)
	if err != nil {
		st.t.Fatalf("inside: %s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

// inBackground starts a command in the target's namespaces, killed at the
// end of the test (nsenter execs it: a shell must exec its last command,
// or killing it leaves that one running).
func (st *slirpTarget) inBackground(name string, args ...string) {
	st.t.Helper()
	cmd := st.r.Exec(context.Background(), "nsenter", append([]string{"-t", strconv.Itoa(st.pid), "-U", "--preserve-credentials", "-n", name}, args...)...)
	if err := cmd.Start(); err != nil {
		st.t.Fatal(err)
	}
	st.t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
}

// slirpRun is gonetns running as slirp4netns.
type slirpRun struct {
	t       *testing.T
	cmd     *exec.Cmd
	stdout  *e2etest.Log
	stderr  *e2etest.Log
	ready   *os.File // read end of -r's pipe, or nil
	exitW   *os.File // write end of -e's pipe, or nil
	exited  chan struct{}
	waitErr error
}

// startSlirp runs gonetns as slirp4netns (a symlink of that name) with
// args; "READY" and "EXIT" in args become descriptors 3 and 4, the write
// end of a ready pipe and the read end of an exit pipe.
func startSlirp(t *testing.T, r e2etest.Runner, args ...string) *slirpRun {
	t.Helper()
	s := &slirpRun{t: t, stdout: &e2etest.Log{}, stderr: &e2etest.Log{}, exited: make(chan struct{})}
	var extra []*os.File
	for i, a := range args {
		switch a {
		case "READY", "EXIT":
			pr, pw, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			if a == "READY" {
				s.ready = pr
				extra = append(extra, pw)
			} else {
				s.exitW = pw
				extra = append(extra, pr)
			}
			args[i] = strconv.Itoa(2 + len(extra))
		}
	}
	s.cmd = r.As(t, "slirp4netns").Command(context.Background(), args...)
	s.cmd.Stdout, s.cmd.Stderr = s.stdout, s.stderr
	s.cmd.ExtraFiles = extra
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	for _, f := range extra {
		f.Close()
	}
	go func() {
		s.waitErr = s.cmd.Wait()
		close(s.exited)
	}()
	t.Cleanup(func() {
		s.cmd.Process.Kill()
		<-s.exited
		if s.ready != nil {
			s.ready.Close()
		}
		if s.exitW != nil {
			s.exitW.Close()
		}
	})
	return s
}

// waitReady reads "1" from the ready pipe.
func (s *slirpRun) waitReady() {
	s.t.Helper()
	got := make(chan string, 1)
	go func() {
		b, _ := io.ReadAll(s.ready)
		got <- string(b)
	}()
	select {
	case b := <-got:
		if b != "1" {
			s.t.Fatalf("ready-fd carried %q, want \"1\"\n%s", b, s)
		}
	case <-s.exited:
		s.t.Fatalf("slirp4netns exited before it was ready: %v\n%s", s.waitErr, s)
	case <-time.After(netTimeout):
		s.t.Fatalf("slirp4netns not ready within %v\n%s", netTimeout, s)
	}
}

// wait waits for the process to exit and returns its exit status.
func (s *slirpRun) wait(d time.Duration) int {
	s.t.Helper()
	select {
	case <-s.exited:
	case <-time.After(d):
		s.t.Fatalf("slirp4netns still runs after %v\n%s", d, s)
	}
	return s.cmd.ProcessState.ExitCode()
}

func (s *slirpRun) String() string {
	return "--- stdout:\n" + s.stdout.String() + "--- stderr:\n" + s.stderr.String()
}

// helperPIDs are the processes of the test user running gonetns's
// namespace helper.
func slirpHelpers(t *testing.T, r e2etest.Runner) []string {
	t.Helper()
	ents, _ := os.ReadDir("/proc")
	var pids []string
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && strings.Contains(string(b), "(network namespace helper)") {
			st, err := os.Stat(filepath.Join("/proc", e.Name()))
			if err == nil && strconv.Itoa(int(st.Sys().(*syscall.Stat_t).Uid)) == r.User.Uid {
				pids = append(pids, e.Name())
			}
		}
	}
	return pids
}

// -c by PID: the interface and lo configured as slirp4netns configures
// them, over a TAP with the virtio-net header; the host's loopback through
// 10.0.2.2; DNS at 10.0.2.3; ready-fd written once all is up; exit-fd
// ends it (status 0) and nothing is left running.
func TestSlirp4netnsConfigureByPID(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	st := newSlirpTarget(t, r)
	host := startHostHTTP(t)
	dnsSrv := startUpstreamDNS(t)
	s := startSlirp(t, r, "--configure", "--mtu=65520", "-r", "READY", "-e", "EXIT", "--dns-upstream="+dnsSrv, strconv.Itoa(st.pid), "tap11")
	s.waitReady()

	addr := st.mustIn("ip", "-o", "addr", "show", "dev", "tap11")
	if !strings.Contains(addr, "inet 10.0.2.100/24 brd 10.0.2.255") {
		t.Errorf("tap11's addresses:\n%s", addr)
	}
	link := st.mustIn("ip", "-d", "link", "show", "dev", "tap11")
	for _, want := range []string{"UP", "mtu 65520", "vnet_hdr on", "qlen 10000"} {
		if !strings.Contains(link, want) {
			t.Errorf("tap11 lacks %q:\n%s", want, link)
		}
	}
	if route := st.mustIn("ip", "route"); !strings.Contains(route, "default via 10.0.2.2 dev tap11") {
		t.Errorf("routes:\n%s", route)
	}
	if lo := st.mustIn("ip", "-o", "link", "show", "dev", "lo"); !strings.Contains(lo, "UP") {
		t.Errorf("lo is not up:\n%s", lo)
	}
	sum := st.mustIn("sh", "-c", fmt.Sprintf("curl -sS --fail --max-time 30 http://10.0.2.2:%d/blob | sha256sum", host.port))
	if !strings.HasPrefix(sum, host.sum+" ") {
		t.Errorf("50 MB from the host through 10.0.2.2: %q, want sha256 %s", sum, host.sum)
	}
	if out := st.mustIn("sh", "-c", e2etest.HelperCmd(t, "dns-query", "10.0.2.3:53", "gonetns-e2e.test.")); strings.TrimSpace(out) != "192.0.2.55" {
		t.Errorf("DNS through 10.0.2.3: %q", out)
	}
	if !strings.Contains(s.stdout.String(), "* Recommended IP:  10.0.2.100") {
		t.Errorf("stdout:\n%s", s)
	}

	s.exitW.Close()
	if code := s.wait(20 * time.Second); code != 0 {
		t.Errorf("after its exit-fd closed, slirp4netns exited %d, want 0\n%s", code, s)
	}
	if h := slirpHelpers(t, r); len(h) > 0 {
		t.Errorf("namespace helpers left running: %v", h)
	}
}

// --netns-type=path with --userns-path, and without -c: the TAP is only
// opened (RootlessKit 1.x configures tap0 itself); configured from inside,
// it carries the network. Then from inside the user namespace (as Podman
// runs slirp4netns: no user namespace to enter), by path, with -c.
func TestSlirp4netnsByPath(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	host := startHostHTTP(t)
	t.Run("userns-path", func(t *testing.T) {
		st := newSlirpTarget(t, r)
		ns := func(kind string) string { return fmt.Sprintf("/proc/%d/ns/%s", st.pid, kind) }
		s := startSlirp(t, r, "--userns-path="+ns("user"), "--netns-type=path", "-r", "READY", ns("net"), "tap11")
		s.waitReady()
		link := st.mustIn("ip", "-d", "-o", "link", "show", "dev", "tap11") + st.mustIn("ip", "-o", "addr", "show", "dev", "tap11")
		if strings.Contains(link, "inet ") || strings.Contains(link, ",UP") || !strings.Contains(link, "vnet_hdr on") {
			t.Errorf("without -c, tap11 must be there, down, unconfigured, with the virtio-net header:\n%s", link)
		}
		st.mustIn("sh", "-c", "ip addr add 10.0.2.100/24 dev tap11 && ip link set tap11 up && ip route add default via 10.0.2.2")
		if out := st.mustIn("curl", "-sS", "--max-time", "20", fmt.Sprintf("http://10.0.2.2:%d/", host.port)); out != "hello from the host\n" {
			t.Errorf("through the TAP configured from inside: %q", out)
		}
	})
	t.Run("inside-userns", func(t *testing.T) {
		st := newSlirpTarget(t, r)
		bin := r.As(t, "slirp4netns").Bin
		pr, pw, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		defer pr.Close()
		cmd := r.Exec(context.Background(), "nsenter", "-t", strconv.Itoa(st.pid), "-U", "--preserve-credentials",
			bin, "-c", "-r", "3", "--netns-type=path", fmt.Sprintf("/proc/%d/ns/net", st.pid), "tap11")
		var errOut e2etest.Log
		cmd.Stderr = &errOut
		cmd.ExtraFiles = []*os.File{pw}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		pw.Close()
		defer func() { cmd.Process.Kill(); cmd.Wait() }()
		pr.SetReadDeadline(time.Now().Add(netTimeout))
		if b, err := io.ReadAll(pr); string(b) != "1" {
			t.Fatalf("ready-fd: %q, %v\n%s", b, err, errOut.String())
		}
		if addr := st.mustIn("ip", "-o", "addr", "show", "dev", "tap11"); !strings.Contains(addr, "inet 10.0.2.100/24") {
			t.Errorf("tap11:\n%s", addr)
		}
		if out := st.mustIn("curl", "-sS", "--max-time", "20", fmt.Sprintf("http://10.0.2.2:%d/", host.port)); out != "hello from the host\n" {
			t.Errorf("through 10.0.2.2: %q", out)
		}
	})
}

// The API socket: slirp4netns's error texts for each kind of bad
// request, and add_hostfwd / list_hostfwd / remove_hostfwd publishing TCP
// and UDP ports into the namespace, spliced, with the client's address
// kept inside.
func TestSlirp4netnsAPISocket(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	st := newSlirpTarget(t, r)
	dir := r.TempDir(t)
	sock := filepath.Join(dir, "slirp4netns.sock")
	long := filepath.Join(dir, strings.Repeat("x", 110)+".sock")
	// A path too long for a unix socket fails at start, in slirp4netns's
	// words.
	bad := startSlirp(t, r, "-c", strconv.Itoa(st.pid), "--api-socket", long, "tap11")
	if code := bad.wait(netTimeout); code != 1 || !strings.Contains(bad.stderr.String(), "the specified API socket path is too long (>= 108)") {
		t.Errorf("a long API socket path: exit %d\n%s", code, bad)
	}
	s := startSlirp(t, r, "-c", strconv.Itoa(st.pid), "--api-socket", sock, "-r", "READY", "tap11")
	s.waitReady()
	st.inBackground("sh", "-c", "exec "+e2etest.HelperCmd(t, "peer-serve", "tcp4,0.0.0.0:8000", "udp4,0.0.0.0:8001"))

	api := func(req string) string {
		t.Helper()
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, req)
		c.(*net.UnixConn).CloseWrite()
		b, _ := io.ReadAll(c)
		return string(b)
	}
	for req, want := range map[string]string{
		"badjson":                 "bad request: cannot parse JSON",
		`{"unexpectedjson": 42}`:  "bad request: no execute found",
		`{"execute": "bad"}`:      "bad request: unknown execute",
		`[1]`:                     "bad request: json_object() failed",
		strings.Repeat("x", 8192): "bad request: too large message",
		`{"execute": "add_hostfwd", "arguments":{"proto": "bad"}}`:                                "bad request: add_hostfwd: bad arguments.proto",
		`{"execute": "add_hostfwd", "arguments":{"proto": "tcp","host_addr":"x","host_port":1}}`:  "bad request: add_hostfwd: bad arguments.host_addr",
		`{"execute": "add_hostfwd", "arguments":{"proto": "tcp","guest_port":80}}`:                "bad request: add_hostfwd: bad arguments.host_port",
		`{"execute": "add_hostfwd", "arguments":{"proto": "tcp","host_port":1,"guest_addr":"x"}}`: "bad request: add_hostfwd: bad arguments.guest_addr",
		`{"execute": "add_hostfwd", "arguments":{"proto": "tcp","host_port":1}}`:                  "bad request: add_hostfwd: bad arguments.guest_port",
		`{"execute": "remove_hostfwd", "arguments":{"id": 99}}`:                                   "bad request: remove_hostfwd: bad arguments.id",
	} {
		var ans struct{ Error struct{ Desc string } }
		got := api(req)
		if err := json.Unmarshal([]byte(got), &ans); err != nil || ans.Error.Desc != want {
			t.Errorf("%.50s: answered %q, want error.desc %q", req, got, want)
		}
	}
	// A guest_addr that is not the namespace's: its gateway led to the
	// host's loopback, 127.0.0.1 to the namespace's own.
	for _, guest := range []string{"10.0.2.2", "127.0.0.1"} {
		req := fmt.Sprintf(`{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"127.0.0.1","host_port":%d,"guest_addr":%q,"guest_port":80}}`, freePort(t, "tcp"), guest)
		if got := api(req); !strings.Contains(got, `"desc":"bad request: add_hostfwd: slirp_add_hostfwd failed: guest_addr `+guest) {
			t.Errorf("add_hostfwd to guest_addr %s: %s; want it refused", guest, got)
		}
	}

	client := e2etest.NewClientNetns(t)
	tcpPort, udpPort := freePort(t, "tcp"), freePort(t, "udp")
	// Podman's requests: host_addr 0.0.0.0, guest_addr "", so .100. TCP
	// first (a slice, not a map: its forward must get id 1, which the
	// test removes below).
	for _, fwd := range []struct {
		proto       string
		host, guest int
	}{{"tcp", tcpPort, 8000}, {"udp", udpPort, 8001}} {
		req := fmt.Sprintf(`{"execute":"add_hostfwd","arguments":{"proto":%q,"host_addr":"0.0.0.0","host_port":%d,"guest_addr":"","guest_port":%d}}`+"\n", fwd.proto, fwd.host, fwd.guest)
		if got := api(req); !strings.HasPrefix(got, `{"return":{"id":`) {
			t.Fatalf("add_hostfwd %s: %s", fwd.proto, got)
		}
	}
	list := api(`{"execute":"list_hostfwd"}`)
	for _, want := range []string{
		fmt.Sprintf(`{"id":1,"proto":"tcp","host_addr":"0.0.0.0","host_port":%d,"guest_addr":"10.0.2.100","guest_port":8000}`, tcpPort),
		fmt.Sprintf(`"proto":"udp","host_addr":"0.0.0.0","host_port":%d,"guest_addr":"10.0.2.100","guest_port":8001}`, udpPort),
	} {
		if !strings.Contains(list, want) {
			t.Errorf("list_hostfwd lacks %s:\n%s", want, list)
		}
	}
	// From the client's namespace: the server inside sees the client's
	// own address.
	out, err := client.Output(netTimeout, "sh", "-c", e2etest.HelperCmd(t, "tcp-halfclose", fmt.Sprintf("%s:%d", client.HostIP4, tcpPort), "0"))
	if !strings.Contains(out, "peer="+client.ClientIP4.String()+":") {
		t.Errorf("TCP through add_hostfwd from %s: %q, %v", client.ClientIP4, out, err)
	}
	out, err = client.Output(netTimeout, "sh", "-c", e2etest.HelperCmd(t, "udp-echo", fmt.Sprintf("%s:%d", client.HostIP4, udpPort), "x"))
	if !strings.Contains(out, "peer="+client.ClientIP4.String()+":") {
		t.Errorf("UDP through add_hostfwd from %s: %q, %v", client.ClientIP4, out, err)
	}
	if got := api(`{"execute":"remove_hostfwd","arguments":{"id":1}}`); got != `{"return":{}}` {
		t.Errorf("remove_hostfwd: %s", got)
	}
	if _, err := net.DialTimeout("tcp4", fmt.Sprintf("127.0.0.1:%d", tcpPort), 2*time.Second); err == nil {
		t.Errorf("the removed forward still answers")
	}
	s.cmd.Process.Signal(syscall.SIGTERM)
	s.wait(20 * time.Second)
	// It dies of the signal, as slirp4netns does (a parent that looks
	// at WIFSIGNALED sees it); it used to exit 143, 8 runs in 10.
	if ws, ok := s.cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGTERM {
		t.Errorf("after SIGTERM: %v; want killed by SIGTERM", s.cmd.ProcessState)
	}
	if _, err := os.Stat(sock); err == nil {
		t.Errorf("the API socket is left after slirp4netns ended")
	}
}

// RootlessKit 1.1 (Debian's), unchanged, with gonetns as its slirp4netns
// (--slirp4netns-binary): RootlessKit creates tap0 and runs slirp4netns on
// its child's PID with -r and, auto-detected from the help, the sandbox
// and seccomp flags (--slirp4netns-sandbox=auto, as dockerd-rootless.sh
// passes it); the command reaches the host's loopback, and ports
// are published through the slirp4netns port driver (the API socket) and
// the builtin one.
func TestRootlessKit1Slirp4netns(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	const rk1 = "/usr/bin/rootlesskit"
	if _, err := os.Stat(rk1); err != nil {
		t.Fatalf("RootlessKit 1.1 (Debian's rootlesskit package) is needed: %v", err)
	}
	slirp := r.As(t, "slirp4netns").Bin
	host := startHostHTTP(t)
	for _, driver := range []string{"slirp4netns", "builtin"} {
		t.Run(driver, func(t *testing.T) {
			hostPort := freePort(t, "tcp")
			state := filepath.Join(r.TempDir(t), "state")
			script := fmt.Sprintf(`set -e
ip -o addr show tap0 | grep -o 'inet [0-9./]*'
curl -sS --max-time 20 http://10.0.2.2:%d/
exec %s`, host.port, e2etest.HelperCmd(t, "peer-serve", "tcp4,0.0.0.0:8000"))
			ctx, cancel := context.WithTimeout(context.Background(), netTimeout)
			defer cancel()
			// dockerd-rootless.sh's sandbox and seccomp settings: auto
			// enables them when slirp4netns's help lists them.
			cmd := r.Exec(ctx, rk1, "--state-dir="+state, "--net=slirp4netns", "--slirp4netns-binary="+slirp, "--mtu=65520",
				"--slirp4netns-sandbox=auto", "--slirp4netns-seccomp=auto",
				"--port-driver="+driver, "-p", fmt.Sprintf("127.0.0.1:%d:8000/tcp", hostPort), "sh", "-c", script)
			var out, errOut e2etest.Log
			cmd.Stdout, cmd.Stderr = &out, &errOut
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			defer func() { cmd.Process.Kill(); cmd.Wait() }()
			got, err := readRetry(fmt.Sprintf("127.0.0.1:%d", hostPort), 30*time.Second)
			if err != nil || !strings.HasPrefix(got, "peer=") {
				t.Errorf("through the published port: %q, %v\nstdout:\n%s\nstderr:\n%s", got, err, out.String(), errOut.String())
			}
			for _, want := range []string{"inet 10.0.2.100/24\n", "hello from the host\n"} {
				if !strings.Contains(out.String(), want) {
					t.Errorf("missing %q in:\n%s\nstderr:\n%s", want, out.String(), errOut.String())
				}
			}
			// RootlessKit's auto-detection found the flags in the help.
			procs := gonetnsProcesses(t, r, slirp)
			if all := strings.Join(procs, "\n"); !strings.Contains(all, "--enable-sandbox --enable-seccomp") || !strings.Contains(all, "-r 3") {
				t.Errorf("gonetns as RootlessKit runs it:\n%s", all)
			}
			// And the network process confines itself as asked.
			confined := false
			for _, p := range procs {
				pid, cmdline, _ := strings.Cut(p, ": ")
				status, _ := os.ReadFile("/proc/" + pid + "/status")
				if strings.Contains(cmdline, "--enable-seccomp") && strings.Contains(string(status), "Seccomp:\t2\n") && strings.Contains(string(status), "NoNewPrivs:\t1\n") {
					confined = true
				}
			}
			if !confined {
				t.Errorf("no gonetns process run with --enable-sandbox --enable-seccomp has a seccomp filter:\n%s", strings.Join(procs, "\n"))
			}
			cmd.Process.Signal(syscall.SIGTERM)
			cmd.Wait()
			deadline := time.Now().Add(20 * time.Second)
			for len(gonetnsProcesses(t, r, slirp)) > 0 {
				if time.Now().After(deadline) {
					t.Fatalf("after RootlessKit ended, gonetns still runs: %v", gonetnsProcesses(t, r, slirp))
				}
				time.Sleep(100 * time.Millisecond)
			}
		})
	}
}

// The other options of slirp4netns's man page, each in a namespace of its
// own, checked from inside as slirp4netns's own tests check them.
func TestSlirp4netnsOptions(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	host := startPeerHTTP(t, "127.0.0.1:0")
	host6 := startPeerHTTP(t, "[::1]:0")
	// up starts gonetns as slirp4netns with args on a new target and waits
	// until it is ready.
	up := func(t *testing.T, args ...string) *slirpTarget {
		st := newSlirpTarget(t, r)
		s := startSlirp(t, r, append(append([]string{"-r", "READY"}, args...), strconv.Itoa(st.pid), "tap11")...)
		s.waitReady()
		return st
	}
	dial := func(st *slirpTarget, addr string) string {
		out, _ := st.in(netTimeout, "sh", "-c", e2etest.HelperCmd(t, "tcp-dial", addr, "5s"))
		return out
	}
	t.Run("disable-host-loopback", func(t *testing.T) {
		st := up(t, "-c", "--disable-host-loopback")
		// The gateway still answers pings (slirp4netns's test).
		if out, err := st.in(netTimeout, "ping", "-c", "1", "-W", "5", "10.0.2.2"); err != nil {
			t.Errorf("ping 10.0.2.2: %v\n%s", err, out)
		}
		if out := dial(st, fmt.Sprintf("10.0.2.2:%d", host.port)); !strings.Contains(out, "refused") {
			t.Errorf("10.0.2.2 with --disable-host-loopback: %q, want refused", out)
		}
	})
	t.Run("disable-dns", func(t *testing.T) {
		st := up(t, "-c", "--disable-dns")
		// No service at 10.0.2.3, and nothing sent anywhere for it.
		if out := dial(st, "10.0.2.3:53"); !strings.Contains(out, "refused") {
			t.Errorf("10.0.2.3:53 over TCP with --disable-dns: %q, want refused", out)
		}
		if out, err := st.in(netTimeout, "sh", "-c", e2etest.HelperCmd(t, "dns-query", "10.0.2.3:53", "gonetns-e2e.test.")); err == nil {
			t.Errorf("a DNS query with --disable-dns was answered: %q", out)
		}
		if out := st.mustIn("curl", "-sS", "--max-time", "20", fmt.Sprintf("http://10.0.2.2:%d/", host.port)); out != "hello 127.0.0.1\n" {
			t.Errorf("the network otherwise: %q", out)
		}
	})
	t.Run("macaddress", func(t *testing.T) {
		st := up(t, "-c", "--macaddress", "0e:d4:18:d9:38:fb")
		if out := st.mustIn("ip", "-o", "link", "show", "dev", "tap11"); !strings.Contains(out, "link/ether 0e:d4:18:d9:38:fb ") {
			t.Errorf("tap11: %s", out)
		}
	})
	t.Run("cidr", func(t *testing.T) {
		st := up(t, "-c", "--cidr", "10.0.135.128/25")
		if out := st.mustIn("ip", "-o", "addr", "show", "dev", "tap11"); !strings.Contains(out, "inet 10.0.135.228/25") {
			t.Errorf("tap11: %s", out)
		}
		if out := st.mustIn("curl", "-sS", "--max-time", "20", fmt.Sprintf("http://10.0.135.130:%d/", host.port)); out != "hello 127.0.0.1\n" {
			t.Errorf("the host through 10.0.135.130: %q", out)
		}
	})
	t.Run("outbound-addr", func(t *testing.T) {
		st := up(t, "-c", "--outbound-addr=127.0.0.2")
		if out := st.mustIn("curl", "-sS", "--max-time", "20", fmt.Sprintf("http://10.0.2.2:%d/", host.port)); out != "hello 127.0.0.2\n" {
			t.Errorf("the host saw: %q, want 127.0.0.2", out)
		}
		// An address of the host's own interface applies to the host's
		// loopback too, as slirp4netns binds every socket it makes (its
		// own test reads it off a connection to the gateway).
		own := hostAddress(t)
		st = up(t, "-c", "--outbound-addr="+own.String())
		if out := st.mustIn("curl", "-sS", "--max-time", "20", fmt.Sprintf("http://10.0.2.2:%d/", host.port)); out != "hello "+own.String()+"\n" {
			t.Errorf("with --outbound-addr=%s the host saw: %q", own, out)
		}
	})
	t.Run("enable-ipv6", func(t *testing.T) {
		st := up(t, "-c", "--enable-ipv6")
		if out := st.mustIn("ip", "-o", "-6", "addr", "show", "dev", "tap11"); !strings.Contains(out, "inet6 fd00::100/64") {
			t.Errorf("tap11: %s", out)
		}
		if out := st.mustIn("curl", "-sS", "--max-time", "20", fmt.Sprintf("http://[fd00::2]:%d/", host6.port)); out != "hello ::1\n" {
			t.Errorf("the host's ::1 through fd00::2: %q", out)
		}
	})
	// gonetns's packet link in a joined namespace (what it gets where
	// /dev/net/tun cannot be opened).
	t.Run("link-packet", func(t *testing.T) {
		st := up(t, "-c", "--link=packet")
		if out := st.mustIn("ip", "-d", "-o", "link", "show", "dev", "tap11"); !strings.Contains(out, " veth ") {
			t.Errorf("tap11 is no veth: %s", out)
		}
		if out := st.mustIn("curl", "-sS", "--max-time", "20", fmt.Sprintf("http://10.0.2.2:%d/", host.port)); out != "hello 127.0.0.1\n" {
			t.Errorf("the host through the packet link: %q", out)
		}
	})
	t.Run("failures", func(t *testing.T) {
		as := r.As(t, "slirp4netns")
		for _, tc := range []struct {
			args []string
			want string
		}{
			{[]string{"--target-type=bess", "/tmp/x"}, "--target-type=bess is not supported"},
			{[]string{"abc", "tap0"}, "slirp4netns: PID must be a positive integer"},
			{[]string{"-c", "--cidr=10.0.2.100/24", "1", "tap0"}, "CIDR needs to be a network address like 10.0.2.0/24, not like 10.0.2.100/24"},
			{[]string{"--netns-type=path", "/nonexistent/netns", "tap0"}, "existing path expected when --netns-type=path"},
			// A process that is gone: its namespace cannot be opened.
			{[]string{"-c", "999999999", "tap0"}, "/proc/999999999/ns/net"},
		} {
			res := as.Run(t, quick, tc.args...)
			if res.Code != 1 || !strings.Contains(res.Stderr, tc.want) {
				t.Errorf("slirp4netns %q: want exit 1 and %q on stderr:\n%s", tc.args, tc.want, res)
			}
		}
	})
	t.Run("help-version", func(t *testing.T) {
		as := r.As(t, "slirp4netns")
		help := as.MustRun(t, quick, "--help").Stdout
		for _, flag := range []string{"--enable-ipv6", "--netns-type", "--enable-sandbox", "--enable-seccomp", "--disable-host-loopback", "--mtu", "--cidr", "--api-socket", "--outbound-addr"} {
			if !strings.Contains(help, flag) {
				t.Errorf("--help lacks %s", flag)
			}
		}
		if v := as.MustRun(t, quick, "--version").Stdout; !strings.HasPrefix(v, "slirp4netns version 1.3.1+gonetns.") {
			t.Errorf("--version: %q", v)
		}
		// gonetns slirp4netns is the same.
		if v := r.MustRun(t, quick, "slirp4netns", "-v").Stdout; !strings.HasPrefix(v, "slirp4netns version 1.3.1+gonetns.") {
			t.Errorf("gonetns slirp4netns -v: %q", v)
		}
	})
}

// hostAddress is an IPv4 address of the machine's own that is neither
// loopback nor one of the client namespaces' test networks.
func hostAddress(t *testing.T) netip.Addr {
	t.Helper()
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		t.Fatal(err)
	}
	tests := netip.MustParsePrefix("198.18.0.0/15")
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok {
			ip, _ := netip.AddrFromSlice(n.IP)
			if ip = ip.Unmap(); ip.Is4() && !ip.IsLoopback() && !ip.IsLinkLocalUnicast() && !tests.Contains(ip) {
				return ip
			}
		}
	}
	t.Fatalf("this machine has no IPv4 address besides loopback (in %v) for --outbound-addr", addrs)
	return netip.Addr{}
}
