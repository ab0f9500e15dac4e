package sandbox

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/gonetns/gonetns/port"
)

// The test binary is the sandbox's child too (Init), and, with serveEnv
// set, a web server to run inside.
const serveEnv = "SANDBOX_TEST_SERVE"

func TestMain(m *testing.M) {
	Init()
	if addr := os.Getenv(serveEnv); addr != "" {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			fmt.Println(err)
			os.Exit(1)
		}
		fmt.Println("listening")
		http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprintln(w, "hello from inside") }))
		return
	}
	os.Exit(m.Run())
}

func needRoot(t *testing.T) {
	t.Helper()
	if os.Getuid() != 0 {
		t.Fatal("this test runs sandboxes as root (the whole id space mapped): run `make test` as root; the unprivileged case is tested end to end in cmd/gonetns and examples/embed")
	}
}

// Run returns the command's status; errors are for the sandbox itself.
func TestRunExitStatus(t *testing.T) {
	needRoot(t)
	ctx := context.Background()
	for _, c := range []struct {
		args []string
		code int
	}{
		{[]string{"sh", "-c", "exit 7"}, 7},
		{[]string{"sh", "-c", "kill -TERM $$"}, 128 + 15},
		{[]string{"no-such-command-here"}, 127},
	} {
		code, err := Run(ctx, Config{Net: NetNone, Stderr: io.Discard}, c.args)
		if err != nil || code != c.code {
			t.Errorf("Run %v = %d, %v; want %d", c.args, code, err, c.code)
		}
	}
	if _, err := Run(ctx, Config{MTU: 10}, []string{"true"}); !errors.Is(err, ErrInvalidConfig) {
		t.Errorf("Run with MTU 10: %v; want ErrInvalidConfig", err)
	}
	if _, err := Run(ctx, Config{}, nil); !errors.Is(err, ErrInvalidConfig) {
		t.Errorf("Run with no command: %v; want ErrInvalidConfig", err)
	}
}

// Start gives a handle: the state dir, ports published at run time, the
// command's stdio, Close.
func TestStartPortsAndClose(t *testing.T) {
	needRoot(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	pr, pw := io.Pipe()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s, err := Start(ctx, Config{Stdout: pw, Env: []string{serveEnv + "=127.0.0.1:8000"}}, []string{self})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	line, err := bufio.NewReader(pr).ReadString('\n')
	if err != nil || line != "listening\n" {
		t.Fatalf("the server inside printed %q, %v", line, err)
	}
	go io.Copy(io.Discard, pr)
	if st, err := os.Stat(s.StateDir() + "/api.sock"); err != nil || st.Mode().Type() != os.ModeSocket {
		t.Errorf("no api.sock in the state dir: %v", err)
	}
	if s.ChildPID() <= 0 {
		t.Errorf("child pid %d", s.ChildPID())
	}
	var st port.Status
	for attempt := 0; ; attempt++ {
		l, _ := net.Listen("tcp4", "127.0.0.1:0")
		pn := l.Addr().(*net.TCPAddr).Port
		l.Close()
		st, err = s.AddPort(ctx, port.Spec{Proto: "tcp4", ParentIP: netip.MustParseAddr("127.0.0.1"), ParentPort: pn, ChildPort: 8000})
		if err == nil || !errors.Is(err, syscall.EADDRINUSE) || attempt == 5 {
			break
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	if ports := s.Ports(); len(ports) != 1 || ports[0] != st {
		t.Errorf("Ports() = %v, want [%v]", ports, st)
	}
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/", st.Spec.ParentPort))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "hello from inside\n" {
		t.Errorf("through the published port: %q", body)
	}
	if err := s.RemovePort(st.ID); err != nil {
		t.Fatal(err)
	}
	state := s.StateDir()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if code, _ := s.Wait(); code != 128+int(syscall.SIGKILL) {
		t.Errorf("after Close the command's status is %d, want SIGKILL's", code)
	}
	if _, err := os.Stat(state); !os.IsNotExist(err) {
		t.Errorf("the state dir outlives Close: %v", err)
	}
}
