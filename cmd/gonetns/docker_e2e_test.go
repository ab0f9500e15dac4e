package main

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gonetns/gonetns/internal/e2etest"
)

// dockerTimeout bounds one docker client call; container starts with vfs
// copy the 2 MB image, so this is generous.
const dockerTimeout = 60 * time.Second

// TestDockerRootless runs Debian's rootless Docker (docker.io 20.10 and
// its dockerd-rootless.sh, unchanged) with the RootlessKit implementation
// that GONETNS_E2E_ROOTLESSKIT selects (gonetns by default) on PATH as
// rootlesskit and rootlesskit-docker-proxy. One daemon serves the
// subtests, in order; the last ones restart and stop it.
func TestDockerRootless(t *testing.T) {
	e2etest.RequireTun(t)
	kit := e2etest.SelectedKit(t)
	host := startHostHTTP(t)
	upstream := startUpstreamDNS(t)
	// Debian's script always passes --disable-host-loopback; the flags
	// variable comes after it, so the container can reach 10.0.2.2.
	flags := []string{"--disable-host-loopback=false"}
	if kit.Gonetns {
		flags = append(flags, "--dns-upstream="+upstream)
	}
	d := e2etest.NewDocker(t, e2etest.DockerConfig{Kit: kit, Flags: flags})
	t.Logf("RootlessKit implementation: %s; PATH=%s", kit.Name, d.Path)
	d.Start(t)
	d.ImportBusybox(t)
	img := e2etest.BusyboxImage

	t.Run("host-loopback", func(t *testing.T) {
		out := d.Must(t, dockerTimeout, "run", "--rm", img, "wget", "-q", "-O-", fmt.Sprintf("http://10.0.2.2:%d/", host.port))
		if strings.TrimSpace(out) != "hello from the host" {
			t.Errorf("a container fetching the host's 127.0.0.1:%d as 10.0.2.2 got %q", host.port, out)
		}
	})

	// Only with gonetns (what CI runs): RootlessKit has no --dns-upstream,
	// and its resolver would forward to the host's resolvers, which tests
	// must not contact; the reference run leaves this case out.
	dnsCase := t.Run
	if !kit.Gonetns {
		dnsCase = func(name string, _ func(*testing.T)) bool {
			t.Logf("%s: not run against RootlessKit (it has no --dns-upstream)", name)
			return true
		}
	}
	dnsCase("dns-upstream", func(t *testing.T) {
		out := d.Must(t, dockerTimeout, "run", "--rm", img, "sh", "-c", "cat /etc/resolv.conf; nslookup -type=a gonetns-e2e.test")
		if !strings.Contains(out, "192.0.2.55") {
			t.Errorf("a container resolving gonetns-e2e.test through the sandbox's resolver and --dns-upstream=%s:\n%s", upstream, out)
		}
	})

	t.Run("publish-tcp", func(t *testing.T) {
		all, lo := freePort(t, "tcp"), freePort(t, "tcp")
		d.Must(t, dockerTimeout, "run", "-d", "--stop-timeout=1", "--name=web", "-p", fmt.Sprintf("%d:80", all), "-p", fmt.Sprintf("127.0.0.1:%d:80", lo),
			img, "sh", "-c", "echo hello from the container >/www/index.html && exec httpd -f -p 80 -h /www")
		for _, url := range []string{
			fmt.Sprintf("http://127.0.0.1:%d/", all),
			fmt.Sprintf("http://[::1]:%d/", all),
			fmt.Sprintf("http://127.0.0.1:%d/", lo),
		} {
			if body, err := fetchRetry(url, 30*time.Second); err != nil || strings.TrimSpace(string(body)) != "hello from the container" {
				t.Errorf("GET %s: %q, %v\n--- daemon log:\n%s", url, body, err, d.Tail(20))
			}
		}
		if c, err := net.DialTimeout("tcp", fmt.Sprintf("[::1]:%d", lo), 5*time.Second); err == nil {
			c.Close()
			t.Errorf("-p 127.0.0.1:%d:80 also accepts connections on [::1]:%d", lo, lo)
		}
	})

	t.Run("publish-udp", func(t *testing.T) {
		port := freePort(t, "udp")
		d.Must(t, dockerTimeout, "run", "-d", "--stop-timeout=1", "--name=udp", "-p", fmt.Sprintf("%d:9999/udp", port), img, "e2etool", "udp-echo", ":9999")
		for _, addr := range []string{fmt.Sprintf("127.0.0.1:%d", port), fmt.Sprintf("[::1]:%d", port)} {
			reply, err := udpExchangeRetry(addr, "ping "+addr, 30*time.Second)
			if err != nil || !strings.HasSuffix(reply, " ping "+addr) {
				t.Errorf("UDP to %s: %q, %v\n--- daemon log:\n%s", addr, reply, err, d.Tail(20))
			}
		}
	})

	t.Run("download-50MB", func(t *testing.T) {
		// Into the container through the sandbox's network (from the host's
		// 127.0.0.1), then out of it through a published port.
		port := freePort(t, "tcp")
		d.Must(t, dockerTimeout, "run", "-d", "--stop-timeout=1", "--name=blob", "-p", fmt.Sprintf("%d:80", port), img, "sh", "-c",
			fmt.Sprintf("wget -q -O /www/blob http://10.0.2.2:%d/blob && sha256sum /www/blob && echo ready && exec httpd -f -p 80 -h /www", host.port))
		logs := waitLogs(t, d, "blob", "ready", 2*time.Minute)
		if !strings.Contains(logs, host.sum) {
			t.Fatalf("sha256 of the 50 MB the container fetched from the host is not %s:\n%s", host.sum, logs)
		}
		start := time.Now()
		body, err := fetchRetry(fmt.Sprintf("http://127.0.0.1:%d/blob", port), 2*time.Minute)
		if err != nil {
			t.Fatalf("download from the container: %v", err)
		}
		sum := sha256.Sum256(body)
		if got := hex.EncodeToString(sum[:]); got != host.sum || len(body) != 50<<20 {
			t.Errorf("downloaded %d bytes with sha256 %s, want %d bytes with %s", len(body), got, 50<<20, host.sum)
		}
		t.Logf("50 MB out of the container through -p in %v", time.Since(start).Round(time.Millisecond))
	})

	t.Run("stop", func(t *testing.T) {
		port := publishedPort(t, d, "web", "80/tcp")
		d.Must(t, dockerTimeout, "stop", "--time=2", "web")
		state := strings.TrimSpace(d.Must(t, dockerTimeout, "inspect", "--format={{.State.Status}}", "web"))
		if state != "exited" {
			t.Errorf("after docker stop the container is %q", state)
		}
		if err := waitRefused(fmt.Sprintf("127.0.0.1:%d", port), 10*time.Second); err != nil {
			t.Errorf("the stopped container's port: %v", err)
		}
	})

	t.Run("source-address", func(t *testing.T) {
		dockerSourceAddress(t, d)
	})

	t.Run("restart-always", func(t *testing.T) {
		port := freePort(t, "tcp")
		d.Must(t, dockerTimeout, "run", "-d", "--stop-timeout=1", "--name=always", "--restart=always", "-p", fmt.Sprintf("%d:80", port),
			img, "sh", "-c", "echo always here >/www/index.html && exec httpd -f -p 80 -h /www")
		url := fmt.Sprintf("http://127.0.0.1:%d/", port)
		if body, err := fetchRetry(url, 30*time.Second); err != nil || strings.TrimSpace(string(body)) != "always here" {
			t.Fatalf("GET %s before the restart: %q, %v", url, body, err)
		}
		stopDocker(t, d)
		if err := waitRefused(fmt.Sprintf("127.0.0.1:%d", port), 5*time.Second); err != nil {
			t.Errorf("with dockerd stopped: %v", err)
		}
		d.Start(t)
		if body, err := fetchRetry(url, 60*time.Second); err != nil || strings.TrimSpace(string(body)) != "always here" {
			t.Errorf("GET %s after the daemon restarted: %q, %v\n--- daemon log:\n%s", url, body, err, d.Tail(30))
		}
	})

	t.Run("shutdown", func(t *testing.T) {
		stopDocker(t, d)
	})
}

// stopDocker stops the daemon and checks that it went cleanly: exit
// status 0, nothing left running, the state directory removed.
func stopDocker(t *testing.T, d *e2etest.Docker) {
	t.Helper()
	if code := d.Stop(t); code != 0 {
		t.Errorf("dockerd-rootless.sh exited with status %d after SIGTERM:\n%s", code, d.Tail(30))
	}
	if log := d.Tail(5); strings.Contains(log, "left running") {
		t.Errorf("processes outlived the daemon:\n%s", log)
	}
	if d.Kit.Gonetns {
		// Issue 9: publishing and unpublishing are debug lines; in normal
		// operation gonetns says nothing in dockerd's log.
		if lines := d.LogLines("rootlesskit: ", "rootlesskit-docker-proxy: ", "rootlessctl: ", "gonetns: "); len(lines) > 0 {
			t.Errorf("gonetns wrote to dockerd's log (without --debug):\n%s", strings.Join(lines, "\n"))
		}
	}
	if _, err := os.Lstat(d.StateDir); !errors.Is(err, os.ErrNotExist) {
		ents, _ := os.ReadDir(d.StateDir)
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Errorf("the state directory %s is left after exit (%v), holding %v; containerd-rootless.sh would refuse to start", d.StateDir, err, names)
	}
}

// dockerSourceAddress records what source address a container's server
// sees for a client outside the host (a network namespace of the test's),
// over a published TCP and UDP port.
func dockerSourceAddress(t *testing.T, d *e2etest.Docker) {
	cn := e2etest.NewClientNetns(t)
	tool := e2etest.Tool(t)
	img := e2etest.BusyboxImage
	tcp, udp := freePort(t, "tcp"), freePort(t, "udp")
	d.Must(t, dockerTimeout, "run", "-d", "--stop-timeout=1", "--name=peer", "-p", fmt.Sprintf("%d:8080", tcp), "-p", fmt.Sprintf("%d:9999/udp", udp),
		img, "sh", "-c", "e2etool udp-echo :9999 & exec e2etool tcp-peer :8080")
	cip := strings.TrimSpace(d.Must(t, dockerTimeout, "inspect", "--format={{.NetworkSettings.IPAddress}}", "peer"))
	gw := strings.TrimSpace(d.Must(t, dockerTimeout, "inspect", "--format={{.NetworkSettings.Gateway}}", "peer"))
	t.Logf("container %s, bridge gateway %s; client %s and %s, reaching the host at %s and %s", cip, gw, cn.ClientIP4, cn.ClientIP6, cn.HostIP4, cn.HostIP6)
	for _, host := range []string{cn.HostIP4.String(), "[" + cn.HostIP6.String() + "]"} {
		var out string
		var err error
		deadline := time.Now().Add(30 * time.Second)
		for {
			out, err = cn.Output(20*time.Second, tool, "tcp-read", fmt.Sprintf("%s:%d", host, tcp))
			if strings.HasPrefix(out, "peer=") || time.Now().After(deadline) {
				break
			}
			time.Sleep(300 * time.Millisecond)
		}
		seen := func(proto, out string, err error) {
			t.Helper()
			if !strings.HasPrefix(out, "peer=") {
				t.Errorf("%s from the client namespace to %s: %v\n%s", proto, host, err, out)
				return
			}
			peer, _, _ := strings.Cut(strings.TrimPrefix(strings.TrimSpace(out), "peer="), " ")
			ap, perr := netip.ParseAddrPort(peer)
			switch {
			case perr != nil:
				t.Errorf("%s: the container's server printed %q", proto, out)
			case ap.Addr() == cn.ClientIP4 || ap.Addr() == cn.ClientIP6:
				t.Logf("%s client -> %s: the container's server sees the client, %s", proto, host, ap)
			case ap.Addr().String() == gw:
				t.Logf("%s client -> %s: the container's server sees the bridge gateway %s: a userland proxy inside the namespace dialed the container", proto, host, ap)
			default:
				t.Errorf("%s client -> %s: the container's server sees %s, neither the client nor the bridge gateway", proto, host, ap)
			}
		}
		seen("TCP", out, err)
		out, err = cn.Output(20*time.Second, tool, "udp-send", fmt.Sprintf("%s:%d", host, udp), "hi")
		seen("UDP", out, err)
	}
}

// fetchRetry GETs url until it answers 200 or the time is up: a
// published port may take a moment to reach a server that is still
// starting.
func fetchRetry(url string, d time.Duration) ([]byte, error) {
	client := &http.Client{Timeout: d}
	deadline := time.Now().Add(d)
	for {
		resp, err := client.Get(url)
		if err == nil {
			body, rerr := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK && rerr == nil {
				return body, nil
			}
			err = fmt.Errorf("status %s, read: %v", resp.Status, rerr)
		}
		if time.Now().After(deadline) {
			return nil, err
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// udpExchangeRetry sends msg to addr until a reply comes or the time is up.
func udpExchangeRetry(addr, msg string, d time.Duration) (string, error) {
	c, err := net.Dial("udp", addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	deadline := time.Now().Add(d)
	b := make([]byte, 65536)
	for {
		c.Write([]byte(msg))
		c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		n, err := c.Read(b)
		if err == nil {
			return string(b[:n]), nil
		}
		if time.Now().After(deadline) {
			return "", err
		}
	}
}

// waitRefused waits until nothing accepts connections on addr.
func waitRefused(addr string, d time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if errors.Is(err, syscall.ECONNREFUSED) {
			return nil
		}
		if err == nil {
			c.Close()
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s still accepts connections (last dial: %v)", addr, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// waitLogs waits until the container's output holds want.
func waitLogs(t *testing.T, d *e2etest.Docker, name, want string, timeout time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		out, err := d.Run(dockerTimeout, "logs", name)
		if err == nil && strings.Contains(out, want) {
			return out
		}
		if time.Now().After(deadline) {
			state, _ := d.Run(dockerTimeout, "inspect", "--format={{.State.Status}} {{.State.ExitCode}}", name)
			t.Fatalf("container %s did not print %q within %v (state %s):\n%s%v", name, want, timeout, state, out, err)
		}
		time.Sleep(300 * time.Millisecond)
	}
}

// publishedPort is the host port docker published for a container port.
func publishedPort(t *testing.T, d *e2etest.Docker, name, port string) int {
	t.Helper()
	out := d.Must(t, dockerTimeout, "inspect", "--format={{(index (index .NetworkSettings.Ports \""+port+"\") 0).HostPort}}", name)
	p, err := strconv.Atoi(strings.TrimSpace(out))
	if err != nil {
		t.Fatalf("published port of %s %s: %q", name, port, out)
	}
	return p
}
