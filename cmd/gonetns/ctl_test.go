package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gonetns/gonetns/api"
	"github.com/gonetns/gonetns/port"
	"github.com/gonetns/gonetns/portfwd"
)

// ctlDialer stands in for the child: this test's namespace is "inside".
type ctlDialer struct{}

func (ctlDialer) Dial(ctx context.Context, proto string, addr, _ netip.AddrPort) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, proto, addr.String())
}

// ctlServer serves the API of a fresh Manager in dir/api.sock.
func ctlServer(t *testing.T) (dir string, m *portfwd.Manager) {
	t.Helper()
	dir, err := os.MkdirTemp("", "ctl") // short: sun_path has 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	m = portfwd.NewManager(portfwd.Config{Dialer: ctlDialer{}})
	t.Cleanup(func() { m.Close() })
	ln, err := api.Listen(filepath.Join(dir, "api.sock"))
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(api.NewHandler(m, func() api.Info {
		return api.Info{
			Version: "0.0.0-test", StateDir: dir, ChildPID: 99,
			NetworkDriver: &api.NetworkDriverInfo{Driver: "gonetns", DNS: []netip.Addr{netip.MustParseAddr("10.0.2.3")}, ChildIP: netip.MustParseAddr("10.0.2.100"), Link: "packet"},
			PortDriver:    &api.PortDriverInfo{Driver: "builtin", Protos: port.Protos},
			Limits: []api.LimitInfo{{Name: "ports.tcp.connections", Max: 3820, InUse: 3820, Peak: 3820, Clients: 2, IdleTimeout: "2h0m0s",
				Events: map[string]uint64{"reset": 180, "preempted": 20, "endedIdle": 0}}},
		}
	}))
	srv.Listener.Close()
	srv.Listener = ln
	srv.Start()
	t.Cleanup(srv.Close)
	return dir, m
}

func ctlRunT(args ...string) (code int, stdout, stderr string) {
	var o, e bytes.Buffer
	code = runCtl(args, &o, &e)
	return code, o.String(), e.String()
}

func TestCtlPorts(t *testing.T) {
	dir, _ := ctlServer(t)
	t.Setenv("GONETNS_STATE_DIR", dir)
	t.Setenv("ROOTLESSKIT_STATE_DIR", "/nonexistent")

	p1, p2 := freePort(t, "tcp"), freePort(t, "tcp")
	code, out, errOut := ctlRunT("add-ports", fmt.Sprintf("127.0.0.1:%d:80/tcp", p1), fmt.Sprintf("%d:[::1]:81/tcp", p2))
	if code != 0 || out != "1\n2\n" {
		t.Fatalf("add-ports: %d %q %q; want the IDs 1 and 2", code, out, errOut)
	}
	code, out, _ = ctlRunT("list-ports")
	want := fmt.Sprintf(`ID    PROTO    PARENTIP     PARENTPORT    CHILDIP    CHILDPORT    
1     tcp      127.0.0.1    %d         %-11s80           
2     tcp                   %d                    ::1        81           
`, p1, "", p2)
	if code != 0 || ctlNormalize(out) != ctlNormalize(want) {
		t.Fatalf("list-ports printed\n%s\nwant\n%s", out, want)
	}
	code, out, _ = ctlRunT("list-ports", "--json")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	var st port.Status
	if code != 0 || len(lines) != 2 || json.Unmarshal([]byte(lines[1]), &st) != nil || st.ID != 2 || st.Spec.ChildIP != netip.IPv6Loopback() {
		t.Fatalf("list-ports --json printed %q", out)
	}
	code, out, errOut = ctlRunT("remove-ports", "1")
	if code != 0 || out != "1\n" {
		t.Fatalf("remove-ports 1: %d %q %q", code, out, errOut)
	}
	code, _, errOut = ctlRunT("remove-ports", "1")
	if code != 1 || !strings.Contains(errOut, "no published port has ID 1") {
		t.Fatalf("remove-ports of a removed ID: %d %q", code, errOut)
	}
	code, _, errOut = ctlRunT("add-ports", fmt.Sprintf("%d:80/tcp", p2))
	if code != 1 || !strings.Contains(errOut, "overlaps port ID 2") {
		t.Fatalf("add-ports of an overlapping spec: %d %q", code, errOut)
	}
	code, _, errOut = ctlRunT("add-ports", "127.0.0.1:8080:80/tcp", "8080:80/sctp")
	if code != 1 || !strings.Contains(errOut, `unknown protocol "sctp"`) || !strings.Contains(errOut, port.Grammar) {
		t.Fatalf("add-ports with a bad spec: %d %q", code, errOut)
	}
	if code, out, _ = ctlRunT("list-ports", "--json"); code != 0 || strings.Count(out, "\n") != 1 {
		t.Fatalf("a bad spec among good ones published something: %q", out)
	}
	code, _, errOut = ctlRunT("remove-ports", "x")
	if code != 1 || !strings.Contains(errOut, `bad port ID "x"`) {
		t.Fatalf("remove-ports x: %d %q", code, errOut)
	}
}

func ctlNormalize(s string) string {
	var lines []string
	for l := range strings.SplitSeq(strings.TrimSpace(s), "\n") {
		lines = append(lines, strings.Join(strings.Fields(l), " "))
	}
	return strings.Join(lines, "\n")
}

func TestCtlInfo(t *testing.T) {
	dir, _ := ctlServer(t)
	sock := filepath.Join(dir, "api.sock")
	code, out, errOut := ctlRunT("--socket", sock, "info")
	for _, want := range []string{"- REST API version: 1.1.1", "- Implementation version: 0.0.0-test", "- State Directory: " + dir,
		"- Child PID: 99", "- Network Driver: gonetns", "  - DNS: [10.0.2.3]", "  - IP: 10.0.2.100", "  - Link: packet", "- Port Driver: builtin",
		"  - Supported protocols: [tcp tcp4 tcp6 udp udp4 udp6]", "- Limits:",
		"  - ports.tcp.connections: 3820 of 3820 in use (peak 3820), 2 clients, idle timeout 2h0m0s; endedIdle 0; preempted 20; reset 180"} {
		if code != 0 || !strings.Contains(out, want+"\n") {
			t.Errorf("info: %d, %q missing in\n%s%s", code, want, out, errOut)
		}
	}
	code, out, _ = ctlRunT("--socket", sock, "info", "--json")
	var info api.Info
	if code != 0 || json.Unmarshal([]byte(out), &info) != nil || info.ChildPID != 99 || info.PortDriver == nil || info.PortDriver.Driver != "builtin" {
		t.Fatalf("info --json printed %q", out)
	}
	if len(info.Limits) != 1 || info.Limits[0].Events["preempted"] != 20 {
		t.Fatalf("info --json: limits %+v", info.Limits)
	}
}

func TestCtlSocketChoice(t *testing.T) {
	dir, _ := ctlServer(t)
	t.Setenv("GONETNS_STATE_DIR", "")
	t.Setenv("ROOTLESSKIT_STATE_DIR", "")
	code, _, errOut := ctlRunT("list-ports")
	if code != 1 || !strings.Contains(errOut, "--socket") || !strings.Contains(errOut, "GONETNS_STATE_DIR") {
		t.Fatalf("no socket anywhere: %d %q; want a clear error", code, errOut)
	}
	t.Setenv("ROOTLESSKIT_STATE_DIR", dir)
	if code, _, errOut := ctlRunT("list-ports"); code != 0 {
		t.Fatalf("$ROOTLESSKIT_STATE_DIR: %d %q", code, errOut)
	}
	t.Setenv("GONETNS_STATE_DIR", filepath.Join(dir, "elsewhere"))
	code, _, errOut = ctlRunT("list-ports")
	if code != 1 || !strings.Contains(errOut, filepath.Join(dir, "elsewhere", "api.sock")) {
		t.Fatalf("$GONETNS_STATE_DIR comes first: %d %q", code, errOut)
	}
}

func TestCtlUsage(t *testing.T) {
	for _, tc := range []struct {
		args     []string
		code     int
		out, err string
	}{
		{[]string{"--help"}, 0, "list-ports", ""},
		{[]string{"list-ports", "--help"}, 0, "--json", ""},
		{[]string{"add-ports", "-h"}, 0, port.Grammar, ""},
		{[]string{"remove-ports", "--help"}, 0, "ID...", ""},
		{[]string{"info", "--help"}, 0, "--json", ""},
		{nil, 2, "", "missing COMMAND"},
		{[]string{"frobnicate"}, 2, "", `unknown command "frobnicate"`},
		{[]string{"--bogus", "list-ports"}, 2, "", "bogus"},
		{[]string{"list-ports", "--bogus"}, 2, "", "bogus"},
		{[]string{"list-ports", "extra"}, 2, "", "no arguments"},
		{[]string{"add-ports"}, 2, "", "no SPEC"},
		{[]string{"remove-ports"}, 2, "", "no ID"},
	} {
		code, out, errOut := ctlRunT(tc.args...)
		if code != tc.code || !strings.Contains(out, tc.out) || !strings.Contains(errOut, tc.err) {
			t.Errorf("gonetns ctl %s: %d\nstdout %q\nstderr %q\nwant %d, stdout with %q, stderr with %q", strings.Join(tc.args, " "), code, out, errOut, tc.code, tc.out, tc.err)
		}
	}
}
