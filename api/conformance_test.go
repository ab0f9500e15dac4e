package api

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/gonetns/gonetns/internal/e2etest"
	"github.com/gonetns/gonetns/port"
	"github.com/gonetns/gonetns/portfwd/portfwdtest"
)

// The API's conformance subtests: RootlessKit's REST API over a real
// portfwd.Manager, for each way of reaching the child that portfwd's
// conformance suite (package portfwdtest) runs.
func TestConformance(t *testing.T) {
	for _, c := range []struct {
		name     string
		newChild portfwdtest.Factory
	}{
		{"WireProtocol", portfwdtest.WireChild},
		{"InProcessDialer", portfwdtest.InProcessChild},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Run("AddRemoveDuringTransfer", func(t *testing.T) { testAddRemoveDuringTransfer(t, c.newChild) })
			t.Run("BadSpecs", func(t *testing.T) { testBadSpecs(t, c.newChild) })
			t.Run("HostPortInUse", func(t *testing.T) { testHostPortInUse(t, c.newChild) })
		})
	}
}

var loop4 = netip.MustParseAddr("127.0.0.1")

// serveAPI serves the API of m on a unix socket and returns its path.
func serveAPI(t *testing.T, m port.Manager) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "pf") // short: sun_path has 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "sock")
	ln, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(NewHandler(m, func() Info {
		return Info{Version: "test", StateDir: dir, ChildPID: 4242}
	}))
	srv.Listener.Close()
	srv.Listener = ln
	srv.Start()
	t.Cleanup(srv.Close)
	return path
}

// testAPIDuringTransfer publishes through the API, removes the port while a
// transfer runs, and checks that the transfer completes while new
// connections are refused.
func testAddRemoveDuringTransfer(t *testing.T, newChild portfwdtest.Factory) {
	e := portfwdtest.NewEnv(t, newChild)
	ctx := context.Background()
	client := NewClient(serveAPI(t, e.M))
	srv := e.TCPServer(loop4, portfwdtest.Echo)

	var st port.Status
	for attempt := 0; ; attempt++ {
		spec := port.Spec{Proto: "tcp", ParentIP: loop4, ParentPort: e2etest.FreePort(t), ChildPort: int(srv.Port())}
		var err error
		st, err = client.AddPort(ctx, spec)
		if err == nil {
			break
		}
		var apiErr *APIError
		if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusConflict || attempt == 10 {
			t.Fatalf("POST /v1/ports: %v", err)
		}
	}
	ports, err := client.ListPorts(ctx)
	if err != nil || len(ports) != 1 || ports[0] != st {
		t.Fatalf("GET /v1/ports: %v, %v; want [%v]", ports, err, st)
	}

	const total, first = 20 << 20, 1 << 20
	c := portfwdtest.DialTCP(t, portfwdtest.ParentAddr(st))
	removed := make(chan struct{})
	var werr error
	var wg sync.WaitGroup
	wg.Go(func() {
		data := portfwdtest.Pattern(4, total)
		if _, werr = io.CopyN(c, data, first); werr != nil {
			return
		}
		<-removed
		if _, werr = io.Copy(c, data); werr == nil {
			werr = c.CloseWrite()
		}
	})
	h := sha256.New()
	if _, err := io.CopyN(h, c, first); err != nil {
		t.Fatalf("read the first MB back: %v", err)
	}
	if err := client.RemovePort(ctx, st.ID); err != nil {
		t.Fatalf("DELETE /v1/ports/%d: %v", st.ID, err)
	}
	if c2, err := net.DialTimeout("tcp", portfwdtest.ParentAddr(st).String(), portfwdtest.IOTimeout); err == nil {
		c2.Close()
		t.Fatalf("a new connection to %s succeeded after the port was removed", portfwdtest.ParentAddr(st))
	} else if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("a new connection after removal: %v; want ECONNREFUSED", err)
	}
	close(removed)
	n, err := io.Copy(h, c)
	wg.Wait()
	if werr != nil {
		t.Fatalf("write through the removed port: %v", werr)
	}
	if err != nil || n != total-first {
		t.Fatalf("the transfer after removal read %d bytes, %v; want %d", n, err, total-first)
	}
	if got, want := [32]byte(h.Sum(nil)), portfwdtest.SumOf(portfwdtest.Pattern(4, total)); got != want {
		t.Fatalf("sha256 %x, want %x", got, want)
	}
	if ports, err := client.ListPorts(ctx); err != nil || len(ports) != 0 {
		t.Fatalf("GET /v1/ports after removal: %v, %v; want []", ports, err)
	}
	err = client.RemovePort(ctx, st.ID)
	var apiErr *APIError
	if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusNotFound || !errors.Is(err, port.ErrUnknownPort) ||
		!strings.Contains(apiErr.Message, strconv.Itoa(st.ID)) {
		t.Fatalf("DELETE of a removed port: %v; want 404 naming ID %d", err, st.ID)
	}
}

// rawAPI posts body to the API at path and returns status, content type
// and the error message.
func rawAPI(t *testing.T, socket, method, path, body string) (int, string, string) {
	t.Helper()
	hc := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
		DisableKeepAlives: true,
	}}
	req, err := http.NewRequest(method, "http://whatever"+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var eb struct {
		Message string `json:"message"`
	}
	if resp.StatusCode/100 != 2 {
		if err := json.Unmarshal(b, &eb); err != nil || eb.Message == "" {
			t.Fatalf("%s %s: error body %q is not {\"message\": ...}", method, path, b)
		}
	}
	return resp.StatusCode, resp.Header.Get("Content-Type"), eb.Message
}

func testBadSpecs(t *testing.T, newChild portfwdtest.Factory) {
	e := portfwdtest.NewEnv(t, newChild)
	socket := serveAPI(t, e.M)
	srv := e.TCPServer(loop4, portfwdtest.Echo)
	good := e.Publish(port.Spec{Proto: "tcp4", ParentIP: loop4, ChildPort: int(srv.Port())})
	for _, tc := range []struct{ body, want string }{
		{`{"proto":"tcp","parentIP":"127.0.0.1","parentPort":0,"childPort":80}`, "parent port 0"},
		{`{"proto":"tcp","parentIP":"127.0.0.1","parentPort":65536,"childPort":80}`, "parent port 65536"},
		{`{"proto":"tcp","parentIP":"127.0.0.1","parentPort":8080,"childPort":-1}`, "child port -1"},
		{`{"proto":"sctp","parentIP":"127.0.0.1","parentPort":8080,"childPort":80}`, `unknown protocol "sctp"`},
		{`{"parentIP":"127.0.0.1","parentPort":8080,"childPort":80}`, "missing protocol"},
		{`{"proto":"tcp4","parentIP":"::1","parentPort":8080,"childPort":80}`, "IPv6"},
		{`{"proto":"udp6","parentIP":"127.0.0.1","parentPort":8080,"childPort":80}`, "IPv4"},
		{`{"proto":"tcp","parentIP":"localhost","parentPort":8080,"childPort":80}`, "bad request body"},
		{`not json`, "bad request body"},
	} {
		code, ctype, msg := rawAPI(t, socket, "POST", "/v1/ports", tc.body)
		if code != http.StatusBadRequest || ctype != "application/json" || !strings.Contains(msg, tc.want) {
			t.Errorf("POST %s: %d %q %q; want 400 application/json with a message containing %q", tc.body, code, ctype, msg, tc.want)
		}
	}
	for _, tc := range []struct {
		method, path string
		code         int
	}{
		{"DELETE", "/v1/ports/abc", http.StatusBadRequest},
		{"DELETE", "/v1/ports/999", http.StatusNotFound},
		{"PUT", "/v1/ports", http.StatusMethodNotAllowed},
		{"GET", "/v2/ports", http.StatusNotFound},
	} {
		if code, ctype, msg := rawAPI(t, socket, tc.method, tc.path, ""); code != tc.code || ctype != "application/json" {
			t.Errorf("%s %s: %d %q %q; want %d with a JSON message", tc.method, tc.path, code, ctype, msg, tc.code)
		}
	}
	// Nothing was published by the bad requests, and the good port works.
	if ports := e.M.ListPorts(); len(ports) != 1 || ports[0] != good {
		t.Fatalf("ports after bad requests: %v; want only %v", ports, good)
	}
	portfwdtest.RoundTrip(t, portfwdtest.DialTCP(t, portfwdtest.ParentAddr(good)), "still here")
}

// testHostPortInUse: a POST for a host port another program holds is a
// 409 naming the address, and publishes nothing.
func testHostPortInUse(t *testing.T, newChild portfwdtest.Factory) {
	e := portfwdtest.NewEnv(t, newChild)
	socket := serveAPI(t, e.M)
	srv := e.TCPServer(loop4, portfwdtest.Echo)
	good := e.Publish(port.Spec{Proto: "tcp4", ParentIP: loop4, ChildPort: int(srv.Port())})

	other, err := net.Listen("tcp4", "127.0.0.1:0") // "another program"
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	busy := netip.MustParseAddrPort(other.Addr().String())
	body := fmt.Sprintf(`{"proto":"tcp4","parentIP":"127.0.0.1","parentPort":%d,"childPort":%d}`, busy.Port(), srv.Port())
	if code, _, msg := rawAPI(t, socket, "POST", "/v1/ports", body); code != http.StatusConflict || !strings.Contains(msg, busy.String()) {
		t.Fatalf("POST on a busy host port: %d %q; want 409 naming %s", code, msg, busy)
	}
	if ports := e.M.ListPorts(); len(ports) != 1 {
		t.Fatalf("ports: %v; want only %v", ports, good)
	}
	portfwdtest.RoundTrip(t, portfwdtest.DialTCP(t, portfwdtest.ParentAddr(good)), "the earlier port still works")
}
