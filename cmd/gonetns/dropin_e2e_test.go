package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gonetns/gonetns/internal/e2etest"
)

// hostNetNS is the test's own network namespace, as /proc/PID/ns/net
// reads it.
func hostNetNS(t *testing.T) string {
	t.Helper()
	ns, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	return ns
}

// Invoked as rootlesskit, gonetns takes RootlessKit's defaults: the host's
// network, no port driver; the version scripts read is RootlessKit's.
func TestRootlessKitPersonality(t *testing.T) {
	r := e2etest.Unprivileged(t).As(t, "rootlesskit")
	res := r.MustRun(t, quick, "sh", "-c", "id -u; readlink /proc/self/ns/net; echo state=$ROOTLESSKIT_STATE_DIR")
	lines := strings.Split(strings.TrimSpace(res.Stdout), "\n")
	if len(lines) != 3 || lines[0] != "0" || lines[1] != hostNetNS(t) || !strings.HasPrefix(lines[2], "state=/") {
		t.Errorf("rootlesskit sh: want uid 0 in the host's network namespace %s:\n%s", hostNetNS(t), res)
	}
	if v := r.MustRun(t, quick, "--version"); !strings.HasPrefix(v.Stdout, "rootlesskit version 3.0.1 (gonetns version ") {
		t.Errorf("rootlesskit --version printed %q", v.Stdout)
	}
	for part, want := range map[string]string{"major": "3", "minor": "0", "patch": "1"} {
		if v := r.MustRun(t, quick, "--print-semver="+part); strings.TrimSpace(v.Stdout) != want {
			t.Errorf("rootlesskit --print-semver=%s printed %q, want %s", part, v.Stdout, want)
		}
	}
	// nerdctl's containerd-rootless.sh looks for --detach-netns this way.
	if h := r.MustRun(t, quick, "--help"); !strings.Contains(h.Stdout, "--detach-netns ") {
		t.Errorf("rootlesskit --help does not list --detach-netns")
	}
	// Every --net RootlessKit knows selects the builtin network.
	for _, net := range []string{"slirp4netns", "pasta", "vpnkit", "gvisor-tap-vsock", "lxc-user-nic"} {
		res := r.MustRun(t, quick, "--net="+net, "--slirp4netns-sandbox=auto", "--pasta-binary=/nonexistent", "cat", "/sys/class/net/tap0/mtu")
		if strings.TrimSpace(res.Stdout) != "65520" {
			t.Errorf("rootlesskit --net=%s: %s", net, res)
		}
	}
}

// --detach-netns: the command stays in the host's network namespace and
// reaches the host's loopback directly; the sandbox's namespace, with tap0
// and the published ports, is at $ROOTLESSKIT_STATE_DIR/netns.
func TestDetachNetNS(t *testing.T) {
	e2etest.RequireTun(t)
	for _, r := range e2etest.Both(t) {
		t.Run(r.Name, func(t *testing.T) {
			host := startHostHTTP(t)
			parentPort := freePort(t, "tcp")
			state := filepath.Join(r.TempDir(t), "state")
			script := fmt.Sprintf(`set -e
readlink /proc/self/ns/net
nsenter -n"$ROOTLESSKIT_STATE_DIR/netns" ip -o link show tap0 | grep -o 'mtu [0-9]*'
nsenter -n"$ROOTLESSKIT_STATE_DIR/netns" sysctl -w net.ipv4.ip_forward=1
curl -sS http://127.0.0.1:%d/
echo "etc-resolv-sandbox=$(grep -c 'nameserver 10.0.2.3' /etc/resolv.conf || true)"
echo "state-resolv-sandbox=$(grep -c 'nameserver 10.0.2.3' "$ROOTLESSKIT_STATE_DIR/resolv.conf")"
nsenter -n"$ROOTLESSKIT_STATE_DIR/netns" %s &
exec sleep 30`, host.port, e2etest.HelperCmd(t, "http-serve", "127.0.0.1:8000"))
			ctx, cancel := context.WithTimeout(context.Background(), netTimeout)
			defer cancel()
			cmd := r.Command(ctx, "--detach-netns", "--state-dir="+state, "-p", fmt.Sprintf("127.0.0.1:%d:8000/tcp", parentPort), "sh", "-c", script)
			var out, errOut strings.Builder
			cmd.Stdout, cmd.Stderr = &out, &errOut
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			defer func() { cmd.Process.Kill(); cmd.Wait() }()
			body := httpGetRetry(t, fmt.Sprintf("http://127.0.0.1:%d/", parentPort), 20*time.Second)
			if body != "hello from inside\n" {
				t.Errorf("the published port into the detached namespace answered %q", body)
			}
			// The way in of containerd-rootless-setuptool.sh nsenter,
			// through child_pid, reaches the sandbox's namespace, as
			// with RootlessKit (it failed: "reassociate to namespace
			// 'ns/net' failed: Operation not permitted").
			pid, err := os.ReadFile(filepath.Join(state, "child_pid"))
			if err != nil {
				t.Fatal(err)
			}
			ns, err := r.Exec(ctx, "nsenter", "-U", "--preserve-credentials", "-m", "-n", "-t", strings.TrimSpace(string(pid)), "ip", "-o", "-4", "addr", "show", "tap0").CombinedOutput()
			if !strings.Contains(string(ns), "10.0.2.100/24") {
				t.Errorf("nsenter -U -m -n -t $(cat child_pid): %v\n%s", err, ns)
			}
			cmd.Process.Signal(os.Interrupt)
			cmd.Wait()
			got := out.String()
			// The command, on the host's network, keeps the host's
			// resolvers; the sandbox's resolv.conf is in the state dir.
			for _, want := range []string{hostNetNS(t) + "\n", "mtu 65520\n", "net.ipv4.ip_forward = 1\n", "hello from the host\n",
				"etc-resolv-sandbox=0\n", "state-resolv-sandbox=1\n"} {
				if !strings.Contains(got, want) {
					t.Errorf("missing %q in:\n%s\nstderr:\n%s", want, got, errOut.String())
				}
			}
			if _, err := os.Stat(state); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("state dir after exit: %v; want it removed", err)
			}
		})
	}
}

// httpGetRetry GETs url until it answers or d has passed.
func httpGetRetry(t *testing.T, url string, d time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		out, err := httpGet(url)
		if err == nil {
			return out
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET %s: %v", url, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// httpGet GETs url on a connection of its own, with a time limit.
func httpGet(url string) (string, error) {
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return string(b), err
}
