package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gonetns/gonetns/api"
	"github.com/gonetns/gonetns/internal/e2etest"
)

// fdCount is the number of open descriptors of process pid.
func fdCount(t *testing.T, pid int) int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatalf("count the descriptors of gonetns (pid %d): %v", pid, err)
	}
	return len(ents)
}

// TestPortsIdleClientsKeepNetworkUp: one client holds 4,000 idle
// connections open on a published port, run by an unprivileged user whose
// open-files limit is soft 1024, hard 20000. Meanwhile the sandbox opens
// new connections to the host and resolves names, and the API answers;
// the parent stays under its limit, connections beyond the published-port
// budget are reset at once (none hangs), another client (another address)
// is served each time it connects, each of its connections taking the
// place of one of the first client's, and /v1/info counts both; once the
// clients leave, the parent's descriptors return to about where they were
// within seconds (no splice pipes cached for minutes).
func TestPortsIdleClientsKeepNetworkUp(t *testing.T) {
	const (
		clients   = 4000
		hardLimit = 20000
		checks    = 20 // new connections and lookups from inside
	)
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	prlimit, err := exec.LookPath("prlimit")
	if err != nil {
		t.Fatalf("prlimit (util-linux) is needed to give gonetns a login-like open-files limit: %v", err)
	}
	upstream := startUpstreamDNS(t)
	hostLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer hostLn.Close()
	go func() {
		for {
			c, err := hostLn.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	hostPort := hostLn.Addr().(*net.TCPAddr).Port
	pubPort := freePort(t, "tcp")
	state := r.TempDir(t) + "/state"

	// Inside: an HTTP server on the published port; on each "go", new
	// connections to the host and lookups, then "checked".
	script := fmt.Sprintf(`%s 127.0.0.1:8000 >/dev/null & srv=$!
for i in $(seq 100); do [ -S "$GONETNS_STATE_DIR/api.sock" ] && break; sleep 0.05; done
echo ready
while read cmd; do
  [ "$cmd" = go ] || break
  for i in $(seq %d); do %s; %s; getent hosts gonetns-e2e.test; done
  echo checked
done
kill $srv`, e2etest.HelperCmd(t, "http-serve"), checks,
		e2etest.HelperCmd(t, "tcp-dial", fmt.Sprintf("10.0.2.2:%d", hostPort)),
		e2etest.HelperCmd(t, "dns-query", "10.0.2.3:53", "gonetns-e2e.test."))
	cmd := r.Command(context.Background(), "--state-dir="+state, "--dns-upstream="+upstream,
		"-p", fmt.Sprintf("127.0.0.1:%d:8000/tcp", pubPort), "sh", "-c", script)
	cmd.Args = append([]string{prlimit, fmt.Sprintf("--nofile=1024:%d", hardLimit), "--", r.Bin}, cmd.Args[1:]...)
	cmd.Path = prlimit
	sess := e2etest.Interact(t, cmd)
	stdin, stderr, br := sess.Stdin, sess.Stderr, sess.Stdout
	defer cmd.Process.Kill() // on a failure before the end; the end waits for the exit
	pid := cmd.Process.Pid   // prlimit execs gonetns in place
	waitLine(t, br, "ready")

	// insideChecks runs the sandbox's checks and returns what it printed.
	insideChecks := func() string {
		t.Helper()
		fmt.Fprintln(stdin, "go")
		var out strings.Builder
		done := make(chan struct{})
		go func() {
			defer close(done)
			for {
				line, err := br.ReadString('\n')
				out.WriteString(line)
				if err != nil || strings.TrimSpace(line) == "checked" {
					return
				}
			}
		}()
		select {
		case <-done:
		case <-time.After(2 * netTimeout):
			t.Fatalf("the sandbox's checks did not finish:\n%s\n%s", out.String(), stderr.String())
		}
		return out.String()
	}
	verify := func(when, out string) {
		t.Helper()
		if n := strings.Count(out, "connected after"); n != checks {
			t.Errorf("%s: %d of %d new connections from the sandbox to the host succeeded:\n%s", when, n, checks, out)
		}
		if n := strings.Count(out, "192.0.2.55\n"); n != checks {
			t.Errorf("%s: %d of %d lookups through 10.0.2.3 answered:\n%s", when, n, checks, out)
		}
		if n := strings.Count(out, "192.0.2.55 "); n != checks {
			t.Errorf("%s: getent hosts answered %d of %d times:\n%s", when, n, checks, out)
		}
	}
	apiHTTP := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", state+"/api.sock")
	}}, Timeout: 10 * time.Second}
	apiInfo := func(when string) (limits map[string]api.LimitInfo) {
		t.Helper()
		resp, err := apiHTTP.Get("http://gonetns/v1/info")
		if err != nil {
			t.Errorf("%s: GET /v1/info: %v", when, err)
			return nil
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || !strings.Contains(string(b), `"childIP":"10.0.2.100"`) {
			t.Errorf("%s: GET /v1/info: %d %s", when, resp.StatusCode, b)
		}
		apiHTTP.CloseIdleConnections()
		var info api.Info
		if err := json.Unmarshal(b, &info); err != nil {
			t.Errorf("%s: GET /v1/info: %v", when, err)
		}
		limits = make(map[string]api.LimitInfo)
		for _, l := range info.Limits {
			limits[l.Name] = l
		}
		return limits
	}

	verify("before the clients", insideChecks())
	baseline := fdCount(t, pid)

	// The clients: each sends a request and reads the reply, so that its
	// connection is relayed end to end, then stays open, idle.
	var (
		mu       sync.Mutex
		held     []net.Conn
		served   atomic.Int64
		reset    atomic.Int64
		hung     atomic.Int64
		peak     atomic.Int64
		sem      = make(chan struct{}, 200)
		wg       sync.WaitGroup
		firstErr atomic.Value
	)
	sample := func() {
		if n := int64(fdCount(t, pid)); n > peak.Load() {
			peak.Store(n)
		}
	}
	start := time.Now()
	for i := range clients {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", pubPort), 10*time.Second)
			if err != nil {
				firstErr.CompareAndSwap(nil, err)
				reset.Add(1)
				return
			}
			c.SetDeadline(time.Now().Add(30 * time.Second))
			fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
			line, err := bufio.NewReader(c).ReadString('\n')
			switch {
			case err == nil && strings.HasPrefix(line, "HTTP/1.1 200"):
				served.Add(1)
				c.SetDeadline(time.Time{})
				mu.Lock()
				held = append(held, c)
				mu.Unlock()
				return
			case isTimeout(err):
				hung.Add(1)
			default:
				reset.Add(1)
			}
			c.Close()
		})
		if i%500 == 0 {
			sample()
		}
	}
	wg.Wait()
	sample()
	t.Logf("%d clients in %v: %d served and held open, %d reset, %d hung; gonetns descriptors: %d before, %d peak",
		clients, time.Since(start).Round(time.Millisecond), served.Load(), reset.Load(), hung.Load(), baseline, peak.Load())
	if hung.Load() > 0 {
		t.Errorf("%d clients got no answer within 30 s; a client beyond the budget must be reset at once (first error: %v)", hung.Load(), firstErr.Load())
	}
	if served.Load() < clients/2 {
		t.Errorf("only %d of %d clients were served; the published-port budget should take most of them", served.Load(), clients)
	}

	// With the clients held: new connections, lookups and the API work.
	verify("with the clients held", insideChecks())
	apiInfo("with the clients held")
	sample()

	// Another client, from 127.0.0.2: served each time, as long as it
	// holds fewer than the first; each of its connections takes the place
	// of one of the first client's.
	const others = 20
	var otherHeld []net.Conn
	for i := range others {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}, Timeout: 10 * time.Second}
		c, err := d.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", pubPort))
		if err != nil {
			t.Errorf("the other client's connection %d: %v", i, err)
			continue
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(30 * time.Second))
		fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
		if line, err := bufio.NewReader(c).ReadString('\n'); err != nil || !strings.HasPrefix(line, "HTTP/1.1 200") {
			t.Errorf("the other client's connection %d, while the first holds the budget: %q, %v", i, line, err)
			continue
		}
		otherHeld = append(otherHeld, c)
	}
	tcp := apiInfo("with both clients")["ports.tcp.connections"]
	t.Logf("/v1/info with both clients: %+v", tcp)
	if len(otherHeld) != others || tcp.Events["preempted"] != others || tcp.Events["reset"] != uint64(clients)-uint64(served.Load()) || tcp.Clients != 2 || tcp.InUse != tcp.Max {
		t.Errorf("the other client was served %d times of %d; /v1/info: %+v; want %d preempted, %d reset (the first client's beyond the budget), 2 clients, all %d in use",
			len(otherHeld), others, tcp, others, clients-served.Load(), tcp.Max)
	}
	if p := peak.Load(); p >= hardLimit-1 {
		t.Errorf("gonetns reached %d descriptors, its limit", p)
	}

	mu.Lock()
	for _, c := range append(held, otherHeld...) {
		c.Close()
	}
	held = nil
	mu.Unlock()
	var after int
	deadline := time.Now().Add(10 * time.Second)
	for {
		after = fdCount(t, pid)
		if after <= baseline+32 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("after the clients left: %d descriptors (baseline %d)", after, baseline)
	if after > baseline+32 {
		t.Errorf("10 s after the clients left, gonetns holds %d descriptors; %d before they came", after, baseline)
	}
	verify("after the clients left", insideChecks())
	apiInfo("after the clients left")
	// The script kills its server and exits; wait for that, so that the
	// deferred Kill does not leave the server behind.
	stdin.Close()
	exited := make(chan error, 1)
	go func() {
		io.Copy(io.Discard, br)
		exited <- cmd.Wait()
	}()
	select {
	case err := <-exited:
		if err != nil {
			t.Errorf("gonetns: %v", err)
		}
	case <-time.After(netTimeout):
		t.Errorf("gonetns did not exit after its command's input closed")
		cmd.Process.Kill()
		<-exited
	}
	if t.Failed() {
		t.Logf("gonetns stderr:\n%s", stderr.String())
	}
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}
