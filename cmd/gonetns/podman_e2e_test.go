package main

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gonetns/gonetns/internal/e2etest"
)

const podmanTimeout = 120 * time.Second

// Debian 12's Podman 4.3.1, unchanged, with gonetns as its slirp4netns
// (network_cmd_path in the test user's containers.conf names gonetns under
// that name): containers reach the host's loopback through 10.0.2.2,
// resolve through 10.0.2.3, download 50 MB intact, and publish ports with
// Podman's rootlessport and with port_handler=slirp4netns (the API
// socket), TCP and UDP; stop and rm leave nothing of gonetns running. One
// Podman set-up serves every subtest.
func TestPodmanSlirp4netns(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	slirp := r.As(t, "slirp4netns").Bin
	upstream := startUpstreamDNS(t)
	p := e2etest.NewPodman(t, e2etest.PodmanConfig{
		Slirp4netns: slirp,
		// Podman passes its environment on: the DNS upstream the test
		// starts, never the machine's resolver.
		Env: []string{"GONETNS_SLIRP4NETNS_FLAGS=--dns-upstream=" + upstream},
	})
	p.ImportBusybox(t)
	host := startHostHTTP(t)
	img := e2etest.BusyboxImage
	// Podman passes --disable-host-loopback unless told otherwise.
	loopback := "--network=slirp4netns:allow_host_loopback=true"

	t.Run("info", func(t *testing.T) {
		out := p.Must(t, podmanTimeout, "info", "--format", "{{.Host.Slirp4NetNS.Executable}} {{.Host.Slirp4NetNS.Version}}")
		if !strings.HasPrefix(out, slirp+" slirp4netns version 1.3.1+gonetns.") {
			t.Errorf("podman info: %q", out)
		}
	})
	t.Run("host-loopback-dns-download", func(t *testing.T) {
		script := fmt.Sprintf(`set -e
ip -o addr show tap0 | grep -o 'inet [0-9./]*'
cat /sys/class/net/tap0/mtu
grep ^nameserver /etc/resolv.conf | head -1
wget -qO- http://10.0.2.2:%[1]d/
nslookup gonetns-e2e.test 2>&1 | grep -o 192.0.2.55
wget -qO- http://10.0.2.2:%[1]d/blob | sha256sum`, host.port)
		out := p.Must(t, podmanTimeout, "run", "--rm", loopback, img, "sh", "-c", script)
		for _, want := range []string{"inet 10.0.2.100/24\n", "65520\n", "nameserver 10.0.2.3\n", "hello from the host\n", "192.0.2.55\n", host.sum + " "} {
			if !strings.Contains(out, want) {
				t.Errorf("missing %q in:\n%s", want, out)
			}
		}
	})
	t.Run("host-loopback-refused-by-default", func(t *testing.T) {
		out, _ := p.Run(podmanTimeout, "run", "--rm", img, "sh", "-c", fmt.Sprintf("wget -T 10 -qO- http://10.0.2.2:%d/ 2>&1; echo rc=$?", host.port))
		if strings.Contains(out, "hello from the host") || !strings.Contains(out, "rc=1") {
			t.Errorf("with Podman's default --disable-host-loopback, 10.0.2.2 answered:\n%s", out)
		}
	})
	for _, handler := range []string{"rootlessport", "slirp4netns"} {
		t.Run("publish-"+handler, func(t *testing.T) {
			tcpPort, udpPort := freePort(t, "tcp"), freePort(t, "udp")
			args := []string{"run", "-d", "-p", fmt.Sprintf("%d:8000/tcp", tcpPort), "-p", fmt.Sprintf("%d:8001/udp", udpPort)}
			if handler == "slirp4netns" {
				args = append(args, "--network=slirp4netns:port_handler=slirp4netns")
			}
			args = append(args, img, "sh", "-c", "e2etool udp-echo 0.0.0.0:8001 & exec e2etool tcp-peer 0.0.0.0:8000")
			id := strings.TrimSpace(p.Must(t, podmanTimeout, args...))
			defer p.Run(podmanTimeout, "rm", "--force", "--time=0", id)
			out, err := readRetry(fmt.Sprintf("127.0.0.1:%d", tcpPort), 30*time.Second)
			if err != nil || !strings.HasPrefix(out, "peer=") {
				t.Errorf("TCP through the published port: %q, %v", out, err)
			}
			if got, err := udpExchangeRetry(fmt.Sprintf("127.0.0.1:%d", udpPort), "ping", 30*time.Second); err != nil || !strings.HasSuffix(got, " ping") {
				t.Errorf("UDP through the published port: %q, %v", got, err)
			}
		})
	}
	t.Run("stop-rm-leave-nothing", func(t *testing.T) {
		id := strings.TrimSpace(p.Must(t, podmanTimeout, "run", "-d", "-p", fmt.Sprintf("%d:8000", freePort(t, "tcp")),
			"--network=slirp4netns:port_handler=slirp4netns", img, "sleep", "1000"))
		if n := gonetnsProcesses(t, r, slirp); len(n) == 0 {
			t.Errorf("no gonetns runs for the running container")
		}
		p.Must(t, podmanTimeout, "stop", "--time=1", id)
		p.Must(t, podmanTimeout, "rm", id)
		deadline := time.Now().Add(20 * time.Second)
		for {
			left := gonetnsProcesses(t, r, slirp)
			if len(left) == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("after podman stop and rm, gonetns still runs: %v", left)
			}
			time.Sleep(100 * time.Millisecond)
		}
	})
}

// gonetnsProcesses are the processes of r's user running the gonetns
// binary (the slirp4netns personality and its namespace helper).
func gonetnsProcesses(t *testing.T, r e2etest.Runner, bin string) []string {
	t.Helper()
	want, err := filepath.EvalSymlinks(bin)
	if err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir("/proc")
	var found []string
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		dir := filepath.Join("/proc", e.Name())
		st, err := os.Stat(dir)
		if err != nil || strconv.Itoa(int(st.Sys().(*syscall.Stat_t).Uid)) != r.User.Uid {
			continue
		}
		if exe, err := os.Readlink(filepath.Join(dir, "exe")); err == nil && exe == want {
			cmdline, _ := os.ReadFile(filepath.Join(dir, "cmdline"))
			found = append(found, e.Name()+": "+strings.ReplaceAll(string(cmdline), "\x00", " "))
		}
	}
	return found
}

// readRetry connects to addr and reads until the server closes, retrying
// until it answers or d has passed.
func readRetry(addr string, d time.Duration) (string, error) {
	deadline := time.Now().Add(d)
	for {
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err == nil {
			c.SetDeadline(time.Now().Add(10 * time.Second))
			b := make([]byte, 256)
			n, err := c.Read(b)
			c.Close()
			if n > 0 {
				return string(b[:n]), nil
			}
			if time.Now().After(deadline) {
				return "", err
			}
		} else if time.Now().After(deadline) {
			return "", err
		}
		time.Sleep(100 * time.Millisecond)
	}
}
