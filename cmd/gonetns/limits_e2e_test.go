package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gonetns/gonetns/api"
	"github.com/gonetns/gonetns/internal/e2etest"
)

// TestPortsIdleTimeout: with --port-tcp-idle-timeout=2s, a connection
// through a published port that has moved nothing for 2 s is reset, its
// client sees the reset, and /v1/info counts it.
func TestPortsIdleTimeout(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	pubPort := freePort(t, "tcp")
	state := r.TempDir(t) + "/state"
	script := fmt.Sprintf(`%s 127.0.0.1:8000 >/dev/null & srv=$!
for i in $(seq 100); do [ -S "$GONETNS_STATE_DIR/api.sock" ] && break; sleep 0.05; done
echo ready
read x
kill $srv`, e2etest.HelperCmd(t, "http-serve"))
	cmd := r.Command(context.Background(), "--state-dir="+state, "--port-tcp-idle-timeout=2s",
		"-p", fmt.Sprintf("127.0.0.1:%d:8000/tcp", pubPort), "sh", "-c", script)
	sess := e2etest.Interact(t, cmd)
	defer func() {
		sess.Stdin.Close()
		cmd.Wait()
	}()
	waitLine(t, sess.Stdout, "ready")

	// The server inside may not listen yet: until it does, connections
	// are reset at once.
	var br *bufio.Reader
	for deadline := time.Now().Add(netTimeout); ; time.Sleep(50 * time.Millisecond) {
		var line string
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", pubPort), 10*time.Second)
		if err == nil {
			c.SetDeadline(time.Now().Add(30 * time.Second))
			fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
			br = bufio.NewReader(c)
			if line, err = br.ReadString('\n'); err == nil && strings.HasPrefix(line, "HTTP/1.1 200") {
				defer c.Close()
				break
			}
			c.Close()
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET through the published port: %q, %v", line, err)
		}
	}
	// Read the rest of the answer, then nothing more comes: the server
	// keeps the connection alive, the idle timeout ends it.
	start := time.Now()
	var rerr error
	for rerr == nil {
		_, rerr = br.ReadString('\n')
	}
	t.Logf("the idle connection ended after %v: %v", time.Since(start).Round(100*time.Millisecond), rerr)
	if !errors.Is(rerr, syscall.ECONNRESET) {
		t.Fatalf("the idle connection: %v; want a reset", rerr)
	}
	info, err := api.NewClient(state + "/api.sock").Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range info.Limits {
		if l.Name == "ports.tcp.connections" {
			if l.Events["endedIdle"] != 1 || l.IdleTimeout != "2s" || l.InUse != 0 {
				t.Errorf("/v1/info: %+v; want 1 connection ended by the idle timeout of 2s, none in use", l)
			}
			return
		}
	}
	t.Errorf("/v1/info has no ports.tcp.connections limit: %+v", info.Limits)
}
