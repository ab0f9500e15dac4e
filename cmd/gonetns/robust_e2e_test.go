package main

import (
	"bufio"
	"context"
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
	"github.com/gonetns/gonetns/internal/fdbudget"
)

// What the command leaves running is ended when it exits;
// --kill-orphans=false keeps RootlessKit's behaviour.
func TestOrphansEndWithTheCommand(t *testing.T) {
	r := e2etest.Unprivileged(t)
	script := `sleep 300 >/dev/null 2>&1 & echo $!; sh -c 'setsid sleep 301 >/dev/null 2>&1 & echo $!'; exit 0`
	res := r.MustRun(t, quick, "--net=none", "sh", "-c", script)
	pids := strings.Fields(res.Stdout)
	if len(pids) != 2 {
		t.Fatalf("want two pids: %s", res)
	}
	for _, p := range pids {
		pid, _ := strconv.Atoi(p)
		if !e2etest.WaitGone(pid, 5*time.Second) {
			syscall.Kill(pid, syscall.SIGKILL)
			t.Errorf("process %d, left behind by the command, outlived gonetns", pid)
		}
	}
	res = r.MustRun(t, quick, "--net=none", "--kill-orphans=false", "sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!")
	pid, _ := strconv.Atoi(strings.TrimSpace(res.Stdout))
	if pid == 0 || e2etest.WaitGone(pid, 500*time.Millisecond) {
		t.Errorf("with --kill-orphans=false the orphan %d was ended: %s", pid, res)
	}
	syscall.Kill(pid, syscall.SIGKILL)
}

// A default state directory left by a killed gonetns is swept by the next
// run of the same user.
func TestStaleStateDirSwept(t *testing.T) {
	r := e2etest.Unprivileged(t)
	ctx, cancel := context.WithTimeout(context.Background(), quick)
	defer cancel()
	cmd := r.Command(ctx, "--net=none", "sh", "-c", `echo "$GONETNS_STATE_DIR"; exec sleep 60`)
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	stale := strings.TrimSpace(line)
	cmd.Process.Kill() // SIGKILL: no cleanup
	cmd.Wait()
	if _, err := os.Stat(filepath.Join(stale, "lock")); err != nil {
		t.Fatalf("the killed gonetns left no state dir to sweep: %v", err)
	}
	// A run's lock is only swept once it is older than a starting run's
	// could be.
	old := time.Now().Add(-time.Minute)
	os.Chtimes(filepath.Join(stale, "lock"), old, old)
	// Someone else's directory of the same name pattern stays.
	foreign, err := os.MkdirTemp("/tmp", "gonetns-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(foreign)
	os.WriteFile(filepath.Join(foreign, "lock"), nil, 0o600)
	os.Chtimes(filepath.Join(foreign, "lock"), old, old)

	r.MustRun(t, quick, "--net=none", "true")
	if _, err := os.Stat(stale); err == nil {
		os.RemoveAll(stale)
		t.Errorf("the stale state dir %s was not swept", stale)
	}
	if _, err := os.Stat(foreign); err != nil {
		t.Errorf("a state dir of another user (root) was swept: %v", err)
	}
}

// A process of the sandbox can find gonetns's pid (without --pidns) and
// signal it; signals whose default would end the parent are ignored, so
// the sandbox's network stays.
func TestParentSurvivesStraySignals(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	host := startHostHTTP(t)
	script := fmt.Sprintf(`parent=$(awk '/^PPid/{print $2}' /proc/$PPID/status)
for s in ALRM VTALRM IO PWR XCPU XFSZ TRAP SYS 32 33 34 50 64; do kill -s $s $parent 2>/dev/null || kill -$s $parent; done
sleep 0.3
curl -sS http://10.0.2.2:%d/`, host.port)
	res := r.MustRun(t, netTimeout, "sh", "-c", script)
	if res.Stdout != "hello from the host\n" {
		t.Errorf("after stray signals to the parent: %s", res)
	}
}

// Unfinished requests on api.sock (which the sandbox can reach) neither
// make the API unanswerable nor eat memory.
func TestAPIUnderConnectionFlood(t *testing.T) {
	r := e2etest.Unprivileged(t)
	ctx, cancel := context.WithTimeout(context.Background(), netTimeout)
	defer cancel()
	state := filepath.Join(r.TempDir(t), "s")
	cmd := r.Command(ctx, "--net=none", "--port-driver=builtin", "--state-dir="+state, "sh", "-c", "echo up; exec sleep 60")
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	if _, err := bufio.NewReader(out).ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(state, "api.sock")
	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	for i := range 2000 {
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		held = append(held, c)
		if i%2 == 0 {
			fmt.Fprint(c, "POST /v1/ports HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{\"proto\":\"tcp\",")
		} else {
			fmt.Fprint(c, "GET /v1/info HTTP/1.1\r\nHost: x\r\n")
		}
	}
	ctl := exec.CommandContext(ctx, e2etest.Binary(t), "ctl", "--socket", sock, "info")
	info, err := ctl.CombinedOutput()
	if err != nil || !strings.Contains(string(info), "- REST API version: 1.1.1") {
		t.Errorf("gonetns ctl info during the flood: %v\n%s", err, info)
	}
	rss := vmRSS(t, cmd.Process.Pid)
	t.Logf("parent RSS with 2000 unfinished API requests: %d MB", rss>>20)
	if rss > 100<<20 {
		t.Errorf("the parent's RSS is %d MB with 2000 unfinished API requests, want under 100 MB", rss>>20)
	}
	// The API holds at most its share of the descriptor budget; the rest
	// wait in the listen queue or were closed.
	fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", cmd.Process.Pid))
	limit := openFilesLimit(t, cmd.Process.Pid)
	if want := fdbudget.For(limit).APIConns + 64; len(fds) > want {
		t.Errorf("the parent holds %d descriptors with 2000 unfinished API requests; with an open-files limit of %d, want at most %d", len(fds), limit, want)
	}
}

// openFilesLimit is the soft RLIMIT_NOFILE of process pid.
func openFilesLimit(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/limits", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(strings.TrimPrefix(l, "Max open files")); len(f) >= 2 && strings.HasPrefix(l, "Max open files") {
			n, err := strconv.Atoi(f[0])
			if err != nil {
				t.Fatalf("%s: %v", l, err)
			}
			return n
		}
	}
	t.Fatalf("no open-files limit in /proc/%d/limits:\n%s", pid, b)
	return 0
}

// vmRSS reads a process's resident set size in bytes.
func vmRSS(t *testing.T, pid int) int64 { return procStatusKB(t, pid, "VmRSS") << 10 }

// procStatusKB reads a field in kB of /proc/PID/status (VmRSS, VmHWM).
func procStatusKB(t *testing.T, pid int, field string) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, field+":"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb
		}
	}
	t.Fatalf("no %s for %d", field, pid)
	return 0
}

// --evacuate-cgroup2 moves gonetns's cgroup v2 group's processes into a
// subgroup; the command, in its own cgroup namespace rooted at the group,
// sees itself in /NAME.
func TestEvacuateCgroup2(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	mount := cgroup2Mount(t)
	// With a network namespace (a sysfs of its own) and without one.
	for _, net := range []string{"builtin", "host"} {
		t.Run(net, func(t *testing.T) {
			group, err := os.MkdirTemp(mount, "gonetns-e2e-")
			if err != nil {
				t.Fatalf("create a cgroup v2 group for the test under %s: %v", mount, err)
			}
			defer func() {
				os.Remove(filepath.Join(group, "evac"))
				os.Remove(group)
			}()
			uid, gid := mustAtoi(r.User.Uid), mustAtoi(r.User.Gid)
			for _, f := range []string{"", "cgroup.procs", "cgroup.subtree_control", "cgroup.threads"} {
				os.Chown(filepath.Join(group, f), uid, gid) // delegation, as systemd's Delegate=yes does
			}
			ctx, cancel := context.WithTimeout(context.Background(), quick)
			defer cancel()
			// Root moves the shell into the group, then it becomes the test
			// user and runs gonetns there.
			cmd := exec.CommandContext(ctx, "sh", "-c", `echo $$ > "$1/cgroup.procs" && exec setpriv --reuid="$2" --regid="$3" --clear-groups env HOME=/ "$4" --net="$5" --pidns --cgroupns --evacuate-cgroup2=evac sh -c 'cat /proc/self/cgroup; test -d /sys/fs/cgroup/evac && echo evac-visible; stat -f -c %T /sys/fs/cgroup'`,
				"sh", group, r.User.Uid, r.User.Gid, r.Bin, net)
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("gonetns --evacuate-cgroup2: %v\n%s", err, out)
			}
			// The group it is in is where it finds it: a cgroup2 of its
			// own namespace on /sys/fs/cgroup, as RootlessKit mounts it.
			if !strings.Contains(string(out), "0::/evac\n") || !strings.Contains(string(out), "evac-visible\n") || !strings.Contains(string(out), "cgroup2fs\n") {
				t.Errorf("inside, /proc/self/cgroup, /sys/fs/cgroup/evac and its filesystem:\n%s\nwant 0::/evac, the directory, cgroup2fs", out)
			}
			if _, err := os.Stat(filepath.Join(group, "evac")); err != nil {
				t.Errorf("no subgroup evac: %v", err)
			}
		})
	}
}

func cgroup2Mount(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, " - cgroup2 ") {
			return strings.Fields(l)[4]
		}
	}
	t.Fatal("no cgroup v2 filesystem is mounted: --evacuate-cgroup2 needs one (mount -t cgroup2 none /sys/fs/cgroup/unified)")
	return ""
}
