package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gonetns/gonetns/port"
)

func TestDecodeSpec(t *testing.T) {
	cases := []struct {
		body string
		want port.Spec
		err  string
	}{
		{`{"proto":"tcp","parentIP":"127.0.0.1","parentPort":8080,"childPort":80}`, port.Spec{Proto: "tcp", ParentIP: ip4, ParentPort: 8080, ChildPort: 80}, ""},
		{` {"proto":"udp6","parentPort":53,"childIP":"::1","childPort":5353}` + "\n", port.Spec{Proto: "udp6", ParentPort: 53, ChildIP: netip.MustParseAddr("::1"), ChildPort: 5353}, ""},
		{`{"proto":"tcp","parentPort":8080,"childPort":80,"childPrt":81}`, port.Spec{}, `unknown field "childPrt"`},
		{`{"proto":"tcp","parentPort":8080,"childPort":80} garbage`, port.Spec{}, "data after the JSON object"},
		{`{"proto":"tcp","parentPort":8080,"childPort":80}{"proto":"tcp"}`, port.Spec{}, "data after the JSON object"},
		{`{"proto":"tcp","parentPort":"8080","childPort":80}`, port.Spec{}, "cannot unmarshal"},
		{`{"proto":"tcp","parentIP":"localhost","parentPort":8080,"childPort":80}`, port.Spec{}, "ParseAddr"},
		{``, port.Spec{}, "EOF"},
		{`[]`, port.Spec{}, "cannot unmarshal"},
	}
	for _, c := range cases {
		got, err := DecodeSpec(strings.NewReader(c.body))
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) || !errors.Is(err, port.ErrInvalidSpec) {
				t.Errorf("DecodeSpec(%q): %v; want an ErrInvalidSpec containing %q", c.body, err, c.err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("DecodeSpec(%q) = %+v, %v; want %+v", c.body, got, err, c.want)
		}
	}
}

// FuzzDecodeSpec feeds POST /v1/ports bodies: nothing panics, and what is
// accepted encodes back to JSON that decodes to the same spec.
func FuzzDecodeSpec(f *testing.F) {
	for _, s := range []string{
		`{"proto":"tcp","parentIP":"127.0.0.1","parentPort":8080,"childPort":80}`,
		`{"proto":"tcp6","parentIP":"::1","parentPort":8080,"childIP":"::1","childPort":80}`,
		`{"proto":"udp","parentPort":1,"childPort":65535}`,
		`{"proto":"tcp","parentPort":8080,"childPort":80} x`,
		`{"parentIP":"1.2.3.4%eth0"}`,
		`{"proto":"tcp","parentPort":1e3,"childPort":-1}`,
		`{}`, `null`, ``,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		spec, err := DecodeSpec(strings.NewReader(string(body)))
		if err != nil {
			if !errors.Is(err, port.ErrInvalidSpec) {
				t.Fatalf("error %v does not wrap ErrInvalidSpec", err)
			}
			return
		}
		b, err := json.Marshal(spec)
		if err != nil {
			t.Fatalf("an accepted spec does not encode: %v", err)
		}
		again, err := DecodeSpec(strings.NewReader(string(b)))
		if err != nil || again != spec {
			t.Fatalf("%s: round trip gave %+v, %v; want %+v", b, again, err, spec)
		}
	})
}

// A program that holds connections open — idle, or sending a request that
// never ends — cannot make the API unanswerable: beyond MaxConns the
// oldest are closed.
func TestServerStaysAnswerable(t *testing.T) {
	m := newTestManager(t)
	path := filepath.Join(shortDir(t), "api.sock")
	ln, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	const maxConns = 8
	s := NewServer(ServerConfig{Ports: m, Info: func() Info { return Info{Version: "x"} }, MaxConns: maxConns})
	s.Serve(ln)
	defer s.Close()

	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	for i := range 200 {
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		held = append(held, c)
		switch i % 3 {
		case 0: // a request whose headers never end
			fmt.Fprint(c, "GET /v1/info HTTP/1.1\r\nHost: x\r\n")
		case 1: // a request whose body never ends
			fmt.Fprint(c, "POST /v1/ports HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"proto\":")
		}
		// case 2: a connection that sends nothing
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	info, err := NewClient(path).Info(ctx)
	if err != nil || info.Version != "x" {
		t.Fatalf("GET /v1/info while 200 connections are held: %+v, %v", info, err)
	}
	// Of the held ones, all but the newest few were closed by the server.
	open := 0
	for _, c := range held {
		c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		var b [1]byte
		if _, err := c.Read(b[:]); errors.Is(err, os.ErrDeadlineExceeded) {
			open++
		}
	}
	if open > maxConns {
		t.Errorf("%d of 200 held connections are still open, want at most %d", open, maxConns)
	}
}

// blockingPorts is a port driver whose AddPort waits for release: a
// request being handled for a while.
type blockingPorts struct {
	started chan struct{}
	release chan struct{}
}

func (p *blockingPorts) AddPort(_ context.Context, s port.Spec) (port.Status, error) {
	close(p.started)
	<-p.release
	return port.Status{ID: 1, Spec: s}, nil
}
func (p *blockingPorts) RemovePort(int) error     { return nil }
func (p *blockingPorts) ListPorts() []port.Status { return nil }

// A request being handled is never the one evicted: new connections
// beyond the limit close the ones waiting, or themselves; and Close waits
// for the request to be answered.
func TestServerKeepsRequestsBeingHandled(t *testing.T) {
	path := filepath.Join(shortDir(t), "api.sock")
	ln, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	pd := &blockingPorts{started: make(chan struct{}), release: make(chan struct{})}
	s := NewServer(ServerConfig{Ports: pd, MaxConns: 2})
	s.Serve(ln)
	done := make(chan error, 1)
	go func() {
		_, err := NewClient(path).AddPort(context.Background(), port.Spec{Proto: "tcp", ParentPort: 8080, ChildPort: 80})
		done <- err
	}()
	<-pd.started
	for i := range 20 {
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		defer c.Close()
		fmt.Fprint(c, "GET /v1/info HTTP/1.1\r\nHost: x\r\n") // never finished
	}
	closed := make(chan struct{})
	go func() { s.Close(); close(closed) }()
	select {
	case <-closed:
		t.Fatal("Close returned while a request was being handled")
	case <-time.After(100 * time.Millisecond):
	}
	close(pd.release)
	if err := <-done; err != nil {
		t.Errorf("the request being handled while 20 others arrived: %v", err)
	}
	<-closed
}
