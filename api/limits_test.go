package api

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gonetns/gonetns/internal/e2etest"
	"github.com/gonetns/gonetns/port"
	"github.com/gonetns/gonetns/portfwd"
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

// Clients that send requests and never read the answers cannot hold every
// place: once an answer's write has been blocked for stalledWrite, its
// connection may go for a new one. Before, a prompt client's call waited
// for the 10 s write timeout (9.5 s, 4 of 4).
func TestServerClosesClientsThatDoNotRead(t *testing.T) {
	path := filepath.Join(shortDir(t), "api.sock")
	ln, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	const maxConns = 4
	big := strings.Repeat("v", 16<<10) // answers that fill a socket's buffer soon
	s := NewServer(ServerConfig{Info: func() Info { return Info{Version: big} }, MaxConns: maxConns})
	s.Serve(ln)
	defer s.Close()
	req := strings.Repeat("GET /v1/info HTTP/1.1\r\nHost: x\r\n\r\n", 400)
	for i := range maxConns {
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		defer c.Close()
		go io.WriteString(c, req) // and never read
	}
	time.Sleep(2 * stalledWrite)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	start := time.Now()
	info, err := NewClient(path).Info(ctx)
	if err != nil || info.Version != big {
		t.Fatalf("GET /v1/info while %d clients leave their answers unread: %v after %v", maxConns, err, time.Since(start).Round(time.Millisecond))
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

// A burst of well-formed requests is served whole while another client
// holds 10,000 idle connections and keeps opening new ones: every add and every delete is answered (an error answer counts: a
// 409 for a parent port someone else took is an add that did not happen),
// and no port is left published. The idle client's connections are what
// the limit closes.
func TestServerBurstWhileIdleConnectionsHeld(t *testing.T) {
	const (
		pairs = 1000
		idle  = 10000
	)
	m := newTestManager(t)
	path := filepath.Join(shortDir(t), "api.sock")
	ln, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(ServerConfig{Ports: m})
	s.Serve(ln)
	defer s.Close()

	// The idle client, a process of its own (this binary, see TestMain).
	holder := exec.Command(os.Args[0])
	holder.Env = append(os.Environ(), idleHolderEnv+"="+path+" "+strconv.Itoa(idle))
	holder.Stderr = os.Stderr
	stdin, err := holder.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := holder.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	defer holder.Process.Kill()
	out := bufio.NewReader(stdout)
	if line, err := out.ReadString('\n'); line != "held\n" {
		t.Fatalf("the idle client did not open its %d connections: %q, %v", idle, line, err)
	}
	// Its connects return once in the listen queue: the burst begins when
	// the server has accepted them all (and closed all but MaxConns).
	for s.Stats().Accepted < idle {
		time.Sleep(10 * time.Millisecond)
	}

	// The burst: as REPRO.md's burst.py, TCP and UDP alternately, each
	// add followed by the delete of what it added, a connection each.
	ports := make([]int, pairs)
	for i := range ports {
		ports[i] = e2etest.FreePort(t)
	}
	cl := NewClient(path)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var (
		wg                      sync.WaitGroup
		mu                      sync.Mutex
		unanswered              []error
		added, deleted, refused atomic.Int64
	)
	answered := func(what string, err error) bool {
		var ae *APIError
		if err == nil || errors.As(err, &ae) {
			return true
		}
		mu.Lock()
		unanswered = append(unanswered, fmt.Errorf("%s: %w", what, err))
		mu.Unlock()
		return false
	}
	start := time.Now()
	for i := range pairs {
		proto := []string{"tcp", "udp"}[i%2]
		wg.Go(func() {
			spec := port.Spec{Proto: proto, ParentIP: ip4, ParentPort: ports[i], ChildPort: 80}
			st, err := cl.AddPort(ctx, spec)
			if !answered("add "+spec.String(), err) {
				return
			}
			if err != nil {
				refused.Add(1)
				return
			}
			added.Add(1)
			err = cl.RemovePort(ctx, st.ID)
			if answered(fmt.Sprintf("delete %d", st.ID), err) && err == nil {
				deleted.Add(1)
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	stdin.Close()
	renewed, _ := out.ReadString('\n')
	if err := holder.Wait(); err != nil {
		t.Errorf("the idle client: %v", err)
	}
	stats := s.Stats()
	t.Logf("%d pairs in %v: %d added and deleted, %d adds refused with an answer; the idle client %s; server: %+v",
		pairs, elapsed.Round(time.Millisecond), deleted.Load(), refused.Load(), strings.TrimSpace(renewed), stats)
	for i, err := range unanswered {
		if i == 10 {
			t.Errorf("... and %d more", len(unanswered)-10)
			break
		}
		t.Errorf("no answer: %v", err)
	}
	if added.Load() != deleted.Load() {
		t.Errorf("%d ports added, %d deleted", added.Load(), deleted.Load())
	}
	if left := m.ListPorts(); len(left) > 0 {
		t.Errorf("%d ports left published, e.g. %v", len(left), left[0])
	}
	if added.Load() < pairs/2 {
		t.Errorf("only %d of %d adds succeeded; the parent ports were free a moment before", added.Load(), pairs)
	}
	if stats.Closed < idle-uint64(stats.Max) {
		t.Errorf("the limit closed %d connections; the idle client alone opened %d", stats.Closed, idle)
	}
	if stats.Peak > stats.Max {
		t.Errorf("%d connections open at once, over the limit of %d", stats.Peak, stats.Max)
	}
}

// goneClientPorts publishes with a real Manager, then holds AddPort's
// answer until its client has gone.
type goneClientPorts struct {
	*portfwd.Manager
	added      chan port.Status
	clientGone chan struct{}
	removed    chan int
}

func (p *goneClientPorts) AddPort(ctx context.Context, s port.Spec) (port.Status, error) {
	st, err := p.Manager.AddPort(ctx, s)
	if err == nil {
		p.added <- st
		<-p.clientGone
	}
	return st, err
}

func (p *goneClientPorts) RemovePort(id int) error {
	err := p.Manager.RemovePort(id)
	p.removed <- id
	return err
}

// An add whose answer cannot be handed to its client does not happen: a
// client that never learns the port's ID could not remove it.
func TestServerUndoesAnAddItCannotAnswer(t *testing.T) {
	pd := &goneClientPorts{Manager: newTestManager(t), added: make(chan port.Status, 1), clientGone: make(chan struct{}), removed: make(chan int, 1)}
	path := filepath.Join(shortDir(t), "api.sock")
	ln, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(ServerConfig{Ports: pd})
	s.Serve(ln)
	defer s.Close()

	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	body := fmt.Sprintf(`{"proto":"tcp","parentIP":"127.0.0.1","parentPort":%d,"childPort":80}`, e2etest.FreePort(t))
	fmt.Fprintf(c, "POST /v1/ports HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
	st := <-pd.added
	if got := pd.ListPorts(); len(got) != 1 {
		t.Fatalf("while the add is being answered, %d ports are published, want 1", len(got))
	}
	c.Close()
	close(pd.clientGone)
	select {
	case id := <-pd.removed:
		if id != st.ID {
			t.Fatalf("port %d removed, want %d", id, st.ID)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("port %d (%s) stays published although its add was never answered", st.ID, st.Spec)
	}
	if got := pd.ListPorts(); len(got) != 0 {
		t.Fatalf("%d ports left published: %v", len(got), got)
	}
}
