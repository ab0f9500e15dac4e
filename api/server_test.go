package api

import (
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/gonetns/gonetns/port"
)

func TestListenAPIMode(t *testing.T) {
	// With umask 0 a socket file is 0777 unless its mode was set before
	// bind; this shows the fchmod, not the umask, makes it 0600.
	old := syscall.Umask(0)
	defer syscall.Umask(old)
	path := filepath.Join(shortDir(t), "api.sock")
	ln, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Type() != fs.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Fatalf("%s has mode %v, want a socket with 0600", path, fi.Mode())
	}
	ln.Close()
	if _, err := os.Lstat(path); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("the socket file outlives its listener: %v", err)
	}
}

func TestListenAPIStaleSocket(t *testing.T) {
	path := filepath.Join(shortDir(t), "api.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close() // the file stays, nobody answers: a crashed instance
	ln2, err := Listen(path)
	if err != nil {
		t.Fatalf("ListenAPI over a stale socket: %v", err)
	}
	ln2.Close()
}

func TestListenAPIInUse(t *testing.T) {
	path := filepath.Join(shortDir(t), "api.sock")
	ln, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if _, err := Listen(path); err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "another instance") {
		t.Fatalf("a second ListenAPI: %v; want an error naming %s and another instance", err, path)
	}
	// The first one still serves.
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatalf("the first listener lost its socket: %v", err)
	}
	c.Close()
}

func TestListenAPINotASocket(t *testing.T) {
	path := filepath.Join(shortDir(t), "api.sock")
	os.WriteFile(path, []byte("keep me"), 0o600)
	if _, err := Listen(path); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("ListenAPI over a regular file: %v", err)
	}
	if b, _ := os.ReadFile(path); string(b) != "keep me" {
		t.Fatal("ListenAPI removed a regular file")
	}
}

func get(t *testing.T, h http.Handler, path string) (int, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "http://any-host"+path, nil))
	return rec.Code, rec.Body.String()
}

func TestAPIInfoJSON(t *testing.T) {
	m := newTestManager(t)
	h := NewHandler(m, func() Info {
		return Info{
			Version:  "0.1.0",
			StateDir: "/run/user/1000/gonetns",
			ChildPID: 4242,
			NetworkDriver: &NetworkDriverInfo{
				Driver:  "gonetns",
				DNS:     []netip.Addr{netip.MustParseAddr("10.0.2.3")},
				ChildIP: netip.MustParseAddr("10.0.2.100"),
			},
			PortDriver: builtinInfo(),
		}
	})
	code, body := get(t, h, "/v1/info")
	want := `{"apiVersion":"1.1.1","version":"0.1.0","stateDir":"/run/user/1000/gonetns","childPID":4242,` +
		`"networkDriver":{"driver":"gonetns","dns":["10.0.2.3"],"childIP":"10.0.2.100"},` +
		`"portDriver":{"driver":"builtin","protos":["tcp","tcp4","tcp6","udp","udp4","udp6"]}}`
	if code != http.StatusOK || body != want {
		t.Fatalf("GET /v1/info: %d\n%s\nwant\n%s", code, body, want)
	}
	// With no info function: the API version still.
	if code, body := get(t, NewHandler(m, nil), "/v1/info"); code != http.StatusOK || body != `{"apiVersion":"1.1.1","version":"","stateDir":"","childPID":0}` {
		t.Fatalf("GET /v1/info with nil info: %d %s", code, body)
	}
}

func TestAPIPortsEmpty(t *testing.T) {
	m := newTestManager(t)
	if code, body := get(t, NewHandler(m, nil), "/v1/ports"); code != http.StatusOK || body != "[]" {
		t.Fatalf("GET /v1/ports: %d %q; want 200 []", code, body)
	}
}

func TestClient(t *testing.T) {
	m := newTestManager(t)
	path := filepath.Join(shortDir(t), "api.sock")
	ln, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(NewHandler(m, func() Info { return Info{Version: "x", ChildPID: 7, PortDriver: builtinInfo()} }))
	srv.Listener.Close()
	srv.Listener = ln
	srv.Start()
	defer srv.Close()

	ctx := context.Background()
	c := NewClient(path)
	info, err := c.Info(ctx)
	if err != nil || info.APIVersion != Version || info.ChildPID != 7 || info.PortDriver == nil || info.PortDriver.Driver != "builtin" {
		t.Fatalf("Info: %+v, %v", info, err)
	}
	st := publishLoop(t, m, "tcp4", echoServer(t))
	ports, err := c.ListPorts(ctx)
	if err != nil || len(ports) != 1 || ports[0] != st {
		t.Fatalf("ListPorts: %v, %v; want [%v]", ports, err, st)
	}
	_, err = c.AddPort(ctx, st.Spec)
	var apiErr *APIError
	if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusConflict || !errors.Is(err, port.ErrConflict) || !strings.Contains(err.Error(), "overlaps port ID 1") {
		t.Fatalf("AddPort of a duplicate: %v; want a 409 APIError with the server's message", err)
	}
	_, err = c.AddPort(ctx, port.Spec{Proto: "tcp", ParentPort: 0, ChildPort: 1})
	if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusBadRequest || !strings.Contains(err.Error(), "parent port 0") {
		t.Fatalf("AddPort of a bad spec: %v", err)
	}
	if err := c.RemovePort(ctx, st.ID); err != nil {
		t.Fatal(err)
	}
	if err := c.RemovePort(ctx, st.ID); !errors.Is(err, port.ErrUnknownPort) {
		t.Fatalf("RemovePort of an unknown ID: %v", err)
	}

	gone := NewClient(filepath.Join(shortDir(t), "nothing.sock"))
	if _, err := gone.ListPorts(ctx); err == nil || !strings.Contains(err.Error(), "nothing.sock") || strings.Contains(err.Error(), "http://") {
		t.Fatalf("a client of a missing socket: %v; want an error naming the socket, not the dummy URL", err)
	}
}

func TestAPIErrorBody(t *testing.T) {
	m := newTestManager(t)
	rec := httptest.NewRecorder()
	NewHandler(m, nil).ServeHTTP(rec, httptest.NewRequest("DELETE", "/v1/ports/5", nil))
	var body map[string]any
	if rec.Code != http.StatusNotFound || rec.Header().Get("Content-Type") != "application/json" ||
		json.Unmarshal(rec.Body.Bytes(), &body) != nil || len(body) != 1 || !strings.Contains(body["message"].(string), "no published port has ID 5") {
		t.Fatalf("DELETE of an unknown port: %d %q %s", rec.Code, rec.Header().Get("Content-Type"), rec.Body)
	}
}

// Without a port driver (--port-driver=none) info answers, without a
// portDriver, and every port call fails with 400 before anything listens.
func TestAPINoPortDriver(t *testing.T) {
	h := NewHandler(nil, func() Info { return Info{Version: "x"} })
	if code, body := get(t, h, "/v1/info"); code != http.StatusOK || strings.Contains(body, "portDriver") {
		t.Errorf("GET /v1/info: %d %s", code, body)
	}
	for _, req := range []*http.Request{
		httptest.NewRequest("GET", "http://h/v1/ports", nil),
		httptest.NewRequest("POST", "http://h/v1/ports", strings.NewReader(`{"proto":"tcp","parentIP":"127.0.0.1","parentPort":1,"childPort":1}`)),
		httptest.NewRequest("DELETE", "http://h/v1/ports/1", nil),
	} {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code != http.StatusBadRequest || !strings.Contains(rec.Body.String(), "--port-driver=builtin") {
			t.Errorf("%s %s: %d %s", req.Method, req.URL.Path, rec.Code, rec.Body.String())
		}
	}
}
