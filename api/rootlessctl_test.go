package api

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http/httptest"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// rootlessctlPath is Debian's rootlessctl (package rootlesskit, v1.1.0
// tested), the reference client of RootlessKit's API.
const rootlessctlPath = "/usr/bin/rootlessctl"

// TestRootlessctl runs the real rootlessctl against our API: it must work
// unchanged.
func TestRootlessctl(t *testing.T) {
	if _, err := os.Stat(rootlessctlPath); err != nil {
		t.Fatalf("%s is needed to check compatibility with RootlessKit's client: install it with `apt-get install rootlesskit` (scripts/test-setup.sh does): %v", rootlessctlPath, err)
	}
	m := newTestManager(t)
	dir := shortDir(t)
	socket := filepath.Join(dir, "api.sock")
	ln, err := Listen(socket)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(NewHandler(m, func() Info {
		return Info{
			Version:  "0.0.0-test",
			StateDir: dir,
			ChildPID: 4242,
			NetworkDriver: &NetworkDriverInfo{
				Driver:  "gonetns",
				DNS:     []netip.Addr{netip.MustParseAddr("10.0.2.3")},
				ChildIP: netip.MustParseAddr("10.0.2.100"),
				Link:    "packet", // a gonetns field: RootlessKit's client ignores it
			},
			PortDriver: builtinInfo(),
			// gonetns's own field: RootlessKit's client must take it.
			Limits: []LimitInfo{{Name: "api.connections", Max: 1024, InUse: 1, Events: map[string]uint64{"closed": 0}}},
		}
	}))
	srv.Listener.Close()
	srv.Listener = ln
	srv.Start()
	defer srv.Close()

	run := func(wantOK bool, args ...string) (string, string) {
		t.Helper()
		cmd := exec.Command(rootlessctlPath, append([]string{"--socket", socket}, args...)...)
		cmd.Env = []string{"PATH=/usr/bin:/bin", "HOME=" + dir}
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		if (err == nil) != wantOK {
			t.Fatalf("rootlessctl %s: %v\nstdout: %s\nstderr: %s", strings.Join(args, " "), err, &stdout, &stderr)
		}
		return stdout.String(), stderr.String()
	}

	child := echoServer(t)
	var parentPort int
	for attempt := 0; ; attempt++ {
		l, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		parentPort = l.Addr().(*net.TCPAddr).Port
		l.Close()
		// rootlessctl wants the parent IP.
		cmd := exec.Command(rootlessctlPath, "--socket", socket, "add-ports", fmt.Sprintf("127.0.0.1:%d:%d/tcp", parentPort, child.Port()))
		out, err := cmd.CombinedOutput()
		if err == nil {
			if string(out) != "1\n" {
				t.Fatalf("add-ports printed %q, want the new ID 1", out)
			}
			break
		}
		if !strings.Contains(string(out), "in use") || attempt == 10 {
			t.Fatalf("rootlessctl add-ports: %v: %s", err, out)
		}
	}

	// The published port works.
	c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", parentPort), 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	c.Write([]byte("ping"))
	c.(*net.TCPConn).CloseWrite()
	if b, err := io.ReadAll(c); err != nil || string(b) != "ping" {
		t.Fatalf("through the port added by rootlessctl: %q, %v", b, err)
	}
	c.Close()

	out, _ := run(true, "list-ports", "--json")
	var st struct {
		ID   int            `json:"id"`
		Spec map[string]any `json:"spec"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil || st.ID != 1 ||
		st.Spec["proto"] != "tcp" || st.Spec["parentIP"] != "127.0.0.1" ||
		st.Spec["parentPort"] != float64(parentPort) || st.Spec["childPort"] != float64(child.Port()) {
		t.Fatalf("list-ports --json printed %q (%v)", out, err)
	}
	out, _ = run(true, "list-ports")
	if lines := strings.Split(strings.TrimSpace(out), "\n"); len(lines) != 2 ||
		strings.Join(strings.Fields(lines[0]), " ") != "ID PROTO PARENTIP PARENTPORT CHILDIP CHILDPORT" ||
		strings.Join(strings.Fields(lines[1]), " ") != fmt.Sprintf("1 tcp 127.0.0.1 %d %d", parentPort, child.Port()) {
		t.Fatalf("list-ports printed\n%s", out)
	}

	// A duplicate is refused with our message.
	_, stderr := run(false, "add-ports", fmt.Sprintf("127.0.0.1:%d:%d/tcp", parentPort, child.Port()))
	if !strings.Contains(stderr, "overlaps port ID 1") {
		t.Fatalf("add-ports of a duplicate: stderr %q", stderr)
	}

	out, _ = run(true, "info", "--json")
	var info map[string]any
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("info --json printed %q: %v", out, err)
	}
	nd, _ := info["networkDriver"].(map[string]any)
	pd, _ := info["portDriver"].(map[string]any)
	if info["apiVersion"] != "1.1.1" || info["version"] != "0.0.0-test" || info["childPID"] != float64(4242) ||
		nd["driver"] != "gonetns" || fmt.Sprint(nd["dns"]) != "[10.0.2.3]" || nd["childIP"] != "10.0.2.100" ||
		pd["driver"] != "builtin" || fmt.Sprint(pd["protos"]) != "[tcp tcp4 tcp6 udp udp4 udp6]" {
		t.Fatalf("info --json printed\n%s", out)
	}
	out, _ = run(true, "info")
	for _, want := range []string{"- REST API version: 1.1.1", "- Child PID: 4242", "- Network Driver: gonetns", "  - DNS: [10.0.2.3]", "  - IP: 10.0.2.100", "- Port Driver: builtin"} {
		if !strings.Contains(out, want) {
			t.Errorf("info printed\n%s\nwithout %q", out, want)
		}
	}

	out, _ = run(true, "remove-ports", "1")
	if out != "1\n" {
		t.Fatalf("remove-ports printed %q, want 1", out)
	}
	if out, _ = run(true, "list-ports", "--json"); out != "" {
		t.Fatalf("list-ports --json after removal printed %q", out)
	}
	_, stderr = run(false, "remove-ports", "1")
	if !strings.Contains(stderr, "no published port has ID 1") {
		t.Fatalf("remove-ports of an unknown ID: stderr %q", stderr)
	}
}
