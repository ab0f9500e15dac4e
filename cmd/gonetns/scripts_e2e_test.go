package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gonetns/gonetns/internal/e2etest"
)

// upstreamFlagSet is a RootlessKit command line that a container tool's
// script runs today: facts from the scripts, kept as data. $XDG_RUNTIME_DIR
// stands for the test user's runtime directory.
type upstreamFlagSet struct {
	name  string
	flags string
	// detach: the command stays in the host's network namespace and the
	// sandbox's is at $ROOTLESSKIT_STATE_DIR/netns.
	detach bool
	// hostNet: no network namespace at all (RootlessKit's default --net).
	hostNet bool
	// publish: a builtin port driver the test publishes a port through.
	publish bool
	ipv6    bool
	copyUp  []string
}

var upstreamFlagSets = []upstreamFlagSet{{
	// moby contrib/dockerd-rootless.sh (2026), defaults, then in the child
	// `nsenter -n"$ROOTLESSKIT_STATE_DIR/netns" sysctl -w net.ipv4.ip_forward=1`.
	name: "dockerd-rootless.sh",
	flags: "--state-dir=$XDG_RUNTIME_DIR/dockerd-rootless --net=slirp4netns --mtu=65520 --slirp4netns-sandbox=auto " +
		"--slirp4netns-seccomp=auto --disable-host-loopback --port-driver=builtin --copy-up=/etc --copy-up=/run " +
		"--propagation=rslave --detach-netns",
	detach: true, publish: true, copyUp: []string{"/etc", "/run"},
}, {
	// nerdctl extras/rootless/containerd-rootless.sh, RootlessKit >= 2
	// (--detach-netns found in --help).
	name: "containerd-rootless.sh",
	flags: "--state-dir=$XDG_RUNTIME_DIR/containerd-rootless --net=slirp4netns --mtu=65520 --slirp4netns-sandbox=auto " +
		"--slirp4netns-seccomp=auto --disable-host-loopback --port-driver=builtin --copy-up=/etc --copy-up=/run " +
		"--copy-up=/var/lib --propagation=rslave --detach-netns",
	detach: true, publish: true, copyUp: []string{"/etc", "/run", "/var/lib"},
}, {
	name: "containerd-rootless.sh --ipv6",
	flags: "--state-dir=$XDG_RUNTIME_DIR/containerd-rootless --net=slirp4netns --mtu=65520 --slirp4netns-sandbox=auto " +
		"--slirp4netns-seccomp=auto --disable-host-loopback --port-driver=builtin --copy-up=/etc --copy-up=/run " +
		"--copy-up=/var/lib --propagation=rslave --detach-netns --ipv6",
	detach: true, publish: true, ipv6: true, copyUp: []string{"/etc", "/run", "/var/lib"},
}, {
	// BuildKit docs/rootless.md: `rootlesskit buildkitd`.
	name:    "buildkit",
	flags:   "",
	hostNet: true,
}, {
	// BuildKit docs/rootless.md, network isolated from the host.
	name:   "buildkit gvisor-tap-vsock",
	flags:  "--net=gvisor-tap-vsock --copy-up=/etc --disable-host-loopback",
	copyUp: []string{"/etc"},
}}

// flagSetScript is what runs inside: it prints key=value facts for the
// test, starts a server in the sandbox's network namespace, publishes it
// with rootlessctl, prints "ready" and waits for the test's done file.
// Its inputs come in E2E_* variables.
const flagSetScript = `
set -u
fact() { echo "fact $1=$2"; }
fact uid "$(id -u)"
fact statedir "$ROOTLESSKIT_STATE_DIR"
fact netns "$(readlink /proc/self/ns/net)"
for d in $E2E_COPYUP; do
	if touch "$d/.gonetns-e2e-copyup" 2>/dev/null; then fact "copyup:$d" writable; else fact "copyup:$d" readonly; fi
done
fact host-loopback "$(curl -sS --max-time 10 http://127.0.0.1:$E2E_HOST_PORT/ 2>&1)"
in=""
if [ "$E2E_DETACH" = 1 ]; then
	in="nsenter -n$ROOTLESSKIT_STATE_DIR/netns"
	$in sysctl -w net.ipv4.ip_forward=1 >/dev/null 2>&1 && fact sysctl ok || fact sysctl failed
	fact ip_forward "$($in cat /proc/sys/net/ipv4/ip_forward)"
	fact sandbox-netns "$($in readlink /proc/self/ns/net)"
fi
if [ "$E2E_HOSTNET" = 0 ]; then
	fact links "$($in ip -br link | awk '{print $1}' | tr '\n' ' ')"
	if [ "$E2E_IPV6" = 1 ]; then
		# RootlessKit's slirp4netns configures IPv6 by router advertisement.
		for i in $(seq 100); do $in ip -6 addr show scope global | grep -q 'inet6 fd00::' && break; sleep 0.1; done
	fi
	fact addrs "$($in ip -br addr | tr -s ' ' | tr '\n' ';')"
	gw=$($in ip route show default | awk '{print $3; exit}')
	fact gateway "$gw"
	if [ -n "$gw" ]; then
		fact gateway-to-host-loopback "$($in curl -sS --max-time 10 http://$gw:$E2E_HOST_PORT/ 2>&1 | head -c 200)"
	fi
fi
if [ "$E2E_PUBLISH" = 1 ]; then
	$in $E2E_TOOL tcp-peer :8080 >"$E2E_DIR/server.log" 2>&1 &
	server=$!
	for i in $(seq 100); do grep -q listening "$E2E_DIR/server.log" && break; sleep 0.1; done
	for spec in $E2E_SPECS; do
		fact "add-ports:$spec" "$(rootlessctl --socket "$ROOTLESSKIT_STATE_DIR/api.sock" add-ports "$spec" 2>&1)"
	done
fi
echo ready
for i in $(seq 600); do [ -e "$E2E_DIR/done" ] && break; sleep 0.1; done
[ "$E2E_PUBLISH" = 1 ] && kill $server
echo bye
`

// TestRootlessKitFlagSets runs the RootlessKit command lines of
// dockerd-rootless.sh, containerd-rootless.sh and BuildKit with the
// implementation GONETNS_E2E_ROOTLESSKIT selects (gonetns by default) as
// rootlesskit on PATH, and checks what each promises the script.
func TestRootlessKitFlagSets(t *testing.T) {
	e2etest.RequireTun(t)
	e2etest.RequireUserNamespaces(t)
	kit := e2etest.SelectedKit(t)
	r := e2etest.Unprivileged(t)
	path := e2etest.ToolPath(t, kit)
	host := startHostHTTP(t)
	runtime := filepath.Join(r.TempDir(t), "run")
	mustMkdirOwned(t, runtime, r)
	hostNetns, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	env := func(dir string) []string {
		return []string{
			"HOME=" + r.User.HomeDir, "USER=" + r.User.Username, "LOGNAME=" + r.User.Username,
			"PATH=" + path, "XDG_RUNTIME_DIR=" + runtime, "LANG=C.UTF-8", "E2E_DIR=" + dir,
			"E2E_TOOL=" + e2etest.Tool(t), "E2E_HOST_PORT=" + strconv.Itoa(host.port),
		}
	}

	t.Run("help-detach-netns", func(t *testing.T) {
		// nerdctl's containerd-rootless.sh: detach mode is used when this succeeds.
		out, err := userShell(t, r, env(runtime), "rootlesskit --help | grep -qw -- --detach-netns && echo found")
		if strings.TrimSpace(out) != "found" {
			t.Errorf("rootlesskit --help | grep -qw -- --detach-netns: %v\n%s", err, out)
		}
	})

	for _, fs := range upstreamFlagSets {
		t.Run(strings.ReplaceAll(fs.name, " ", "_"), func(t *testing.T) {
			dir := r.TempDir(t)
			flags := strings.Fields(strings.ReplaceAll(fs.flags, "$XDG_RUNTIME_DIR", runtime))
			var explicitState string
			for _, f := range flags {
				if s, ok := strings.CutPrefix(f, "--state-dir="); ok {
					explicitState = s
				}
			}
			if explicitState != "" {
				// What containerd-rootless.sh checks before it starts.
				if _, err := os.Lstat(explicitState); err == nil {
					t.Fatalf("%s exists before the start: containerd-rootless.sh would refuse to start", explicitState)
				}
			}
			pub4, pub6 := freePort(t, "tcp"), 0
			specs := []string{fmt.Sprintf("127.0.0.1:%d:8080/tcp", pub4)}
			if fs.ipv6 {
				pub6 = freePort(t, "tcp")
				specs = append(specs, fmt.Sprintf("[::1]:%d:8080/tcp", pub6))
			}
			e := append(env(dir),
				"E2E_COPYUP="+strings.Join(fs.copyUp, " "),
				"E2E_DETACH="+boolDigit(fs.detach), "E2E_IPV6="+boolDigit(fs.ipv6), "E2E_HOSTNET="+boolDigit(fs.hostNet), "E2E_PUBLISH="+boolDigit(fs.publish),
				"E2E_SPECS="+strings.Join(specs, " "))
			args := append([]string{"rootlesskit"}, flags...)
			args = append(args, "sh", "-c", flagSetScript)
			t.Logf("rootlesskit %s", strings.Join(flags, " "))
			tree := e2etest.StartTree(t, e2etest.TreeSpec{User: r.User, Env: e, Args: args, Log: filepath.Join(dir, "log"), Grace: 20 * time.Second})
			facts := waitReady(t, tree, 60*time.Second)
			t.Logf("facts: %q", facts)

			want := func(key, value string) {
				t.Helper()
				if facts[key] != value {
					t.Errorf("%s = %q, want %q\n--- log:\n%s", key, facts[key], value, tree.Tail(40))
				}
			}
			want("uid", "0")
			for _, d := range fs.copyUp {
				want("copyup:"+d, "writable")
			}
			stateDir := facts["statedir"]
			if explicitState != "" {
				want("statedir", explicitState)
			}
			switch {
			case fs.hostNet || fs.detach:
				// The command itself is in the host's network namespace.
				want("netns", hostNetns)
				want("host-loopback", "hello from the host")
			default:
				if facts["netns"] == hostNetns {
					t.Errorf("the command runs in the host's network namespace")
				}
			}
			if fs.detach {
				want("sysctl", "ok")
				want("ip_forward", "1")
				if facts["sandbox-netns"] == "" || facts["sandbox-netns"] == hostNetns {
					t.Errorf("nsenter -n$ROOTLESSKIT_STATE_DIR/netns entered %q (the host's is %s)", facts["sandbox-netns"], hostNetns)
				}
			}
			if !fs.hostNet {
				if !strings.Contains(facts["links"], "tap0") {
					t.Errorf("the sandbox's interfaces are %q, no tap0\n%s", facts["links"], tree.Tail(40))
				}
				if facts["gateway"] == "" {
					t.Errorf("the sandbox has no default route\n%s", tree.Tail(40))
				} else if strings.Contains(facts["gateway-to-host-loopback"], "hello from the host") {
					t.Errorf("--disable-host-loopback, yet the gateway %s reached the host's 127.0.0.1:%d", facts["gateway"], host.port)
				}
				if fs.ipv6 && !strings.Contains(facts["addrs"], " fd00::") {
					t.Errorf("--ipv6: the sandbox's addresses are %q, none in fd00::/64", facts["addrs"])
				}
			}
			if fs.publish {
				for _, spec := range specs {
					if _, err := strconv.Atoi(facts["add-ports:"+spec]); err != nil {
						t.Errorf("rootlessctl add-ports %s printed %q, not a port ID", spec, facts["add-ports:"+spec])
					}
				}
				checks := []string{fmt.Sprintf("127.0.0.1:%d", pub4)}
				if fs.ipv6 {
					checks = append(checks, fmt.Sprintf("[::1]:%d", pub6))
				}
				for _, addr := range checks {
					if line, err := tcpReadLine(addr); err != nil || !strings.HasPrefix(line, "peer=") {
						t.Errorf("the port published on %s into the sandbox: %q, %v\n%s", addr, line, err, tree.Tail(40))
					}
				}
			}

			if err := os.WriteFile(filepath.Join(dir, "done"), nil, 0o644); err != nil {
				t.Fatal(err)
			}
			select {
			case <-tree.Done():
			case <-time.After(30 * time.Second):
				t.Fatalf("rootlesskit did not exit within 30 s of its command's end\n%s", tree.Tail(40))
			}
			if tree.Code() != 0 {
				t.Errorf("rootlesskit exited with status %d\n%s", tree.Code(), tree.Tail(40))
			}
			if log := tree.Tail(5); strings.Contains(log, "left running") {
				t.Errorf("processes outlived rootlesskit:\n%s", log)
			}
			if stateDir == "" {
				t.Errorf("ROOTLESSKIT_STATE_DIR is not set for the command")
			} else if _, err := os.Lstat(stateDir); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("the state directory %s is left after exit (%v)", stateDir, err)
			}
		})
	}
}

// waitReady waits for the script's "ready" line and returns its facts.
func waitReady(t *testing.T, tree *e2etest.Tree, timeout time.Duration) map[string]string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		b, _ := os.ReadFile(tree.Log)
		if strings.Contains(string(b), "\nready\n") || strings.HasPrefix(string(b), "ready\n") {
			facts := map[string]string{}
			sc := bufio.NewScanner(strings.NewReader(string(b)))
			for sc.Scan() {
				if kv, ok := strings.CutPrefix(sc.Text(), "fact "); ok {
					k, v, _ := strings.Cut(kv, "=")
					facts[k] = v
				}
			}
			return facts
		}
		select {
		case <-tree.Done():
			t.Fatalf("rootlesskit exited with status %d before its command was ready:\n%s", tree.Code(), tree.Tail(40))
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("the command was not ready within %v:\n%s", timeout, tree.Tail(40))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// tcpReadLine connects to addr and reads one line, retrying briefly.
func tcpReadLine(addr string) (string, error) {
	var err error
	for range 20 {
		var c net.Conn
		c, err = net.DialTimeout("tcp", addr, 5*time.Second)
		if err == nil {
			c.SetDeadline(time.Now().Add(5 * time.Second))
			line, rerr := bufio.NewReader(c).ReadString('\n')
			c.Close()
			if rerr == nil {
				return strings.TrimSpace(line), nil
			}
			err = rerr
		}
		time.Sleep(250 * time.Millisecond)
	}
	return "", err
}

// userShell runs a shell command line as r's user with env, bounded.
func userShell(t *testing.T, r e2etest.Runner, env []string, script string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "/bin/sh", "-c", script)
	cmd.Env = env
	cmd.Dir = "/"
	uid, _ := strconv.Atoi(r.User.Uid)
	gid, _ := strconv.Atoi(r.User.Gid)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}}
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func mustMkdirOwned(t *testing.T, dir string, r e2etest.Runner) {
	t.Helper()
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	uid, _ := strconv.Atoi(r.User.Uid)
	gid, _ := strconv.Atoi(r.User.Gid)
	if err := os.Chown(dir, uid, gid); err != nil {
		t.Fatal(err)
	}
}

func boolDigit(b bool) string {
	if b {
		return "1"
	}
	return "0"
}
