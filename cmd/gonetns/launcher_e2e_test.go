package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
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

const quick = 30 * time.Second

func subStart(t *testing.T, file, user string) (start, count string) {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Split(line, ":")
		if len(f) == 3 && f[0] == user {
			return f[1], f[2]
		}
	}
	t.Fatalf("%s has no entry for %s", file, user)
	return
}

func TestLauncherIdentityAndMaps(t *testing.T) {
	for _, r := range e2etest.Both(t) {
		t.Run(r.Name, func(t *testing.T) {
			res := r.MustRun(t, quick, "--net=host", "sh", "-c", "id -u; id -g; cat /proc/self/uid_map /proc/self/gid_map; grep CapEff /proc/self/status")
			lines := strings.Split(strings.TrimSpace(res.Stdout), "\n")
			if len(lines) < 3 || lines[0] != "0" || lines[1] != "0" {
				t.Fatalf("id -u/-g inside are not 0:\n%s", res)
			}
			maps := strings.Join(fieldsOf(lines[2:len(lines)-1]), "|")
			var want string
			if r.User.Uid == "0" {
				want = "0 0 4294967295|0 0 4294967295"
			} else {
				us, uc := subStart(t, "/etc/subuid", r.User.Username)
				gs, gc := subStart(t, "/etc/subgid", r.User.Username)
				want = fmt.Sprintf("0 %s 1|1 %s %s|0 %s 1|1 %s %s", r.User.Uid, us, uc, r.User.Gid, gs, gc)
			}
			if maps != want {
				t.Errorf("uid_map|gid_map = %q, want %q", maps, want)
			}
			if !strings.Contains(lines[len(lines)-1], "000001ffffffffff") && !strings.Contains(lines[len(lines)-1], "0000003fffffffff") {
				t.Errorf("not all capabilities inside: %s", lines[len(lines)-1])
			}
			if strings.Contains(res.Stderr, "warning") {
				t.Errorf("unexpected warning:\n%s", res.Stderr)
			}
		})
	}
}

// Started with an empty environment (env -i: no PATH), gonetns finds
// newuidmap in the system's directories and maps the subordinate ids;
// it mapped one id and said newuidmap was not installed.
func TestLauncherMapsWithoutPath(t *testing.T) {
	r := e2etest.Unprivileged(t)
	cmd := r.Command(context.Background(), "--net=host", "cat", "/proc/self/uid_map")
	cmd.Env = []string{}
	var errOut strings.Builder
	cmd.Stderr = &errOut
	out, err := cmd.Output()
	us, uc := subStart(t, "/etc/subuid", r.User.Username)
	want := fmt.Sprintf("0 %s 1|1 %s %s", r.User.Uid, us, uc)
	if got := strings.Join(fieldsOf(strings.Split(strings.TrimSpace(string(out)), "\n")), "|"); err != nil || got != want || errOut.Len() > 0 {
		t.Errorf("env -i gonetns: uid_map %q (want %q), %v\n%s", got, want, err, errOut.String())
	}
}

func fieldsOf(lines []string) []string {
	var out []string
	for _, l := range lines {
		out = append(out, strings.Join(strings.Fields(l), " "))
	}
	return out
}

func TestLauncherExitStatus(t *testing.T) {
	r := e2etest.Unprivileged(t)
	cases := []struct {
		args     []string
		code     int
		inStderr string
	}{
		{[]string{"sh", "-c", "exit 7"}, 7, ""},
		{[]string{"true"}, 0, ""},
		{[]string{"sh", "-c", "kill -TERM $$"}, 128 + 15, ""},
		{[]string{"--pidns", "sh", "-c", "exit 9"}, 9, ""},
		{[]string{"gonetns-no-such-command"}, 127, "command not found"},
		// A path is not looked up in $PATH: said as a shell says it.
		{[]string{"./gonetns-no-such-command"}, 127, "./gonetns-no-such-command: no such file or directory"},
	}
	script := filepath.Join(r.TempDir(t), "noexec.sh")
	os.WriteFile(script, []byte("#!/bin/sh\necho hi\n"), 0o644)
	os.Chown(script, mustAtoi(r.User.Uid), mustAtoi(r.User.Gid))
	cases = append(cases, struct {
		args     []string
		code     int
		inStderr string
	}{[]string{script}, 126, "not executable"})
	for _, c := range cases {
		res := r.Run(t, quick, append([]string{"--net=host"}, c.args...)...)
		if res.Code != c.code || !strings.Contains(res.Stderr, c.inStderr) {
			t.Errorf("gonetns %v: got %s\nwant exit %d and stderr containing %q", c.args, res, c.code, c.inStderr)
		}
	}
}

func TestLauncherFlagErrors(t *testing.T) {
	r := e2etest.Unprivileged(t)
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"--mtu=10", "true"}, "1280 to 65521"},
		{[]string{"--copy-up=/tmp", "true"}, "/tmp is refused"},
		{[]string{"--copy-up=etc", "true"}, "must be absolute"},
		// The user cannot read /root (0700, root's): said as that, not
		// as a container's seccomp profile.
		{[]string{"--copy-up=/root", "true"}, "cannot read it"},
		{[]string{"--copy-up=/proc", "true"}, "kernel filesystem"},
		{[]string{"--net=slirp", "true"}, "builtin, none or host"},
		{[]string{"--cidr=10.0.2.0/28", "true"}, "/25 or shorter"},
		{[]string{"--propagation=shared", "true"}, "rprivate or rslave"},
		{[]string{"--no-such-flag", "true"}, "unknown flag"},
		{[]string{}, "no command given"},
	}
	for _, c := range cases {
		res := r.Run(t, quick, c.args...)
		if res.Code != exitUsage || !strings.Contains(res.Stderr, c.want) {
			t.Errorf("gonetns %v: got %s\nwant exit %d and %q", c.args, res, exitUsage, c.want)
		}
	}
}

func TestLauncherHelpListsFlags(t *testing.T) {
	r := e2etest.Unprivileged(t)
	res := r.MustRun(t, quick, "--help")
	for _, f := range []string{"--net", "--mtu", "--cidr", "--ifname", "--disable-host-loopback", "--copy-up", "--copy-up-mode",
		"--propagation", "--pidns", "--utsns", "--ipcns", "--cgroupns", "--reaper", "--state-dir", "--subid-source", "--debug", "--version",
		"--ipv6", "--dns-upstream", "--port-driver", "--publish", "--cpuprofile"} {
		if !strings.Contains(res.Stdout, f) {
			t.Errorf("--help does not list %s", f)
		}
	}
	if !strings.Contains(res.Stdout, `(default "rprivate")`) || !strings.Contains(res.Stdout, "(default 65520)") {
		t.Errorf("--help does not show defaults:\n%s", res.Stdout)
	}
	v := r.MustRun(t, quick, "--version")
	if !strings.HasPrefix(v.Stdout, "gonetns version ") {
		t.Errorf("--version printed %q", v.Stdout)
	}
	// Flags stop at the first non-flag: --net here is the command's.
	res = r.MustRun(t, quick, "--net=host", "echo", "--net=none")
	if strings.TrimSpace(res.Stdout) != "--net=none" {
		t.Errorf("flags after the command were not passed on: %q", res.Stdout)
	}
}

func TestLauncherCopyUp(t *testing.T) {
	for _, r := range e2etest.Both(t) {
		t.Run(r.Name, func(t *testing.T) {
			before := fileSum(t, "/etc/hosts")
			probe := fmt.Sprintf("/etc/gonetns-e2e-probe-%d", time.Now().UnixNano())
			script := fmt.Sprintf(`set -e
echo written > %[1]s
cat %[1]s
rm /etc/hosts
echo "192.0.2.1 replaced" > /etc/hosts
cat /etc/hosts
readlink /etc/passwd
head -c 5 /etc/passwd; echo`, probe)
			res := r.MustRun(t, quick, "--net=host", "--copy-up=/etc", "sh", "-c", script)
			if !strings.Contains(res.Stdout, "written\n192.0.2.1 replaced\n.ro") || !strings.Contains(res.Stdout, "root:") {
				t.Errorf("copy-up /etc not writable as expected:\n%s", res)
			}
			if _, err := os.Stat(probe); err == nil {
				os.Remove(probe)
				t.Errorf("%s appeared on the host", probe)
			}
			if after := fileSum(t, "/etc/hosts"); after != before {
				t.Errorf("the host's /etc/hosts changed")
			}
		})
	}
}

// A command started in a directory that is copied up works in the copy:
// what it removes and creates by relative path leaves the host's
// directory as it was (before, the host's file was removed and the new
// one made there, while the command's own ls of the copy saw neither).
func TestLauncherCopyUpWorkingDirectory(t *testing.T) {
	for _, r := range e2etest.Both(t) {
		t.Run(r.Name, func(t *testing.T) {
			dir := r.TempDir(t)
			if err := os.WriteFile(filepath.Join(dir, "keep.txt"), []byte("keep\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			cmd := r.Command(context.Background(), "--net=host", "--copy-up="+dir, "sh", "-c", "rm keep.txt && echo inside > made.txt && ls")
			cmd.Dir = dir
			out, err := cmd.CombinedOutput()
			if err != nil || strings.TrimSpace(string(out)) != "made.txt" {
				t.Errorf("inside, in the copied-up directory: %v\n%s", err, out)
			}
			if _, err := os.Stat(filepath.Join(dir, "keep.txt")); err != nil {
				t.Errorf("the host's keep.txt: %v; want it kept", err)
			}
			if _, err := os.Stat(filepath.Join(dir, "made.txt")); err == nil {
				t.Errorf("made.txt appeared in the host's directory")
			}
		})
	}
}

func mustAtoi(s string) int {
	n, err := strconv.Atoi(s)
	if err != nil {
		panic(err)
	}
	return n
}

func fileSum(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

func TestLauncherPIDNamespace(t *testing.T) {
	r := e2etest.Unprivileged(t)
	res := r.MustRun(t, quick, "--net=host", "--pidns", "sh", "-c", "echo $$; ls /proc | grep -c '^[0-9]'")
	f := strings.Fields(res.Stdout)
	if len(f) != 2 || f[0] != "1" {
		t.Fatalf("$$ inside --pidns = %v, want 1:\n%s", f, res)
	}
	if n, _ := strconv.Atoi(f[1]); n > 5 {
		t.Errorf("/proc inside --pidns lists %d processes; it is not the namespace's procfs", n)
	}
}

// Killing gonetns with SIGKILL must take everything inside with it: the
// child by Pdeathsig, the command by its own, and with --pidns every
// process of the namespace.
func TestLauncherParentDeathKillsAll(t *testing.T) {
	r := e2etest.Unprivileged(t)
	for _, extra := range [][]string{nil, {"--pidns"}} {
		t.Run(fmt.Sprintf("flags=%v", extra), func(t *testing.T) {
			marker := strconv.Itoa(700000 + int(time.Now().UnixNano()%100000))
			args := append(append([]string{"--net=host"}, extra...), "sh", "-c", "sleep "+marker+" & echo ready; sleep "+marker)
			cmd := r.Command(context.Background(), args...)
			out, _ := cmd.StdoutPipe()
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			line, _ := bufio.NewReader(out).ReadString('\n')
			if line != "ready\n" {
				t.Fatalf("no ready line: %q", line)
			}
			// "ready" comes before the second sleep starts.
			for i := 0; i < 100 && countProcs(t, "sleep "+marker) < 2; i++ {
				time.Sleep(20 * time.Millisecond)
			}
			if n := countProcs(t, "sleep "+marker); n != 2 {
				t.Fatalf("%d sleep processes running, want 2", n)
			}
			cmd.Process.Signal(syscall.SIGKILL)
			cmd.Wait()
			deadline := time.Now().Add(5 * time.Second)
			for countProcs(t, "sleep "+marker) > 0 && time.Now().Before(deadline) {
				time.Sleep(50 * time.Millisecond)
			}
			script := "sh -c sleep " + marker + " & echo ready; sleep " + marker
			for countProcs(t, script) > 0 && time.Now().Before(deadline) {
				time.Sleep(50 * time.Millisecond)
			}
			if n := countProcs(t, script); n != 0 {
				t.Errorf("the command survived gonetns's death")
			}
			// What the command started goes too: the PID namespace ends
			// with its init, and without one the child ends the rest
			// (--kill-orphans, the default).
			if n := countProcs(t, "sleep "+marker); n != 0 {
				t.Errorf("%d processes survived gonetns %v", n, extra)
			}
			exec.Command("pkill", "-f", "sleep "+marker).Run()
		})
	}
}

func countProcs(t *testing.T, cmdline string) int {
	t.Helper()
	ents, _ := os.ReadDir("/proc")
	n := 0
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && strings.ReplaceAll(strings.TrimRight(string(b), "\x00"), "\x00", " ") == cmdline {
			n++
		}
	}
	return n
}

func TestLauncherStateDirAndEnv(t *testing.T) {
	r := e2etest.Unprivileged(t)
	dir := filepath.Join(r.TempDir(t), "state")
	res := r.MustRun(t, quick, "--net=host", "--state-dir="+dir, "sh", "-c",
		`ls "$GONETNS_STATE_DIR"; echo "rk=$ROOTLESSKIT_STATE_DIR euid=$ROOTLESSKIT_PARENT_EUID egid=$ROOTLESSKIT_PARENT_EGID home=$HOME user=$USER"; echo "mode=$(stat -c %a "$GONETNS_STATE_DIR")"; cat "$GONETNS_STATE_DIR/child_pid"`)
	for _, want := range []string{"child_pid\n", "lock\n", "rk=" + dir + " ", "euid=" + r.User.Uid + " ", "egid=" + r.User.Gid + " ", "home=" + r.User.HomeDir, "user=" + r.User.Username, "mode=700\n"} {
		if !strings.Contains(res.Stdout, want) {
			t.Errorf("missing %q in:\n%s", want, res)
		}
	}
	// A given state directory goes on exit too, as RootlessKit's does
	// (containerd-rootless.sh refuses to start while it exists).
	if _, err := os.Stat(dir); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("state dir %s after exit: %v; want it removed", dir, err)
	}
	env := r.MustRun(t, quick, "--net=host", "env")
	if strings.Contains(env.Stdout, "_GONETNS_") {
		t.Errorf("internal variables leak into the command's environment:\n%s", env.Stdout)
	}
	if !strings.Contains(env.Stdout, "GONETNS_STATE_DIR=/tmp/gonetns-") {
		t.Errorf("default state dir is not a new one under /tmp:\n%s", env.Stdout)
	}
}

func TestLauncherStateDirLocked(t *testing.T) {
	r := e2etest.Unprivileged(t)
	dir := filepath.Join(r.TempDir(t), "state")
	first := r.Command(context.Background(), "--net=host", "--state-dir="+dir, "sh", "-c", "echo ready; exec sleep 60")
	out, _ := first.StdoutPipe()
	if err := first.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { first.Process.Kill(); first.Wait() }()
	if line, _ := bufio.NewReader(out).ReadString('\n'); line != "ready\n" {
		t.Fatalf("first instance not ready: %q", line)
	}
	res := r.Run(t, quick, "--net=host", "--state-dir="+dir, "true")
	if res.Code != exitSetup || !strings.Contains(res.Stderr, "locked by another gonetns") {
		t.Errorf("second instance on the same state dir: %s\nwant exit %d and a lock message", res, exitSetup)
	}
}

func TestLauncherSingleMappingFallback(t *testing.T) {
	r := e2etest.NoSubIDs(t)
	res := r.MustRun(t, quick, "--net=host", "sh", "-c", "id -u; cat /proc/self/uid_map /proc/self/setgroups")
	got := strings.Join(strings.Fields(res.Stdout), " ")
	want := "0 0 " + r.User.Uid + " 1 deny"
	if got != want {
		t.Errorf("inside: %q, want %q", got, want)
	}
	if strings.Count(res.Stderr, "warning:") != 1 || !strings.Contains(res.Stderr, "usermod --add-subuids") {
		t.Errorf("want exactly one warning telling how to add subordinate ids:\n%s", res.Stderr)
	}
}

func TestLauncherChownToMappedID(t *testing.T) {
	r := e2etest.Unprivileged(t)
	dir := r.TempDir(t)
	start, _ := subStart(t, "/etc/subuid", r.User.Username)
	gstart, _ := subStart(t, "/etc/subgid", r.User.Username)
	res := r.MustRun(t, quick, "--net=host", "sh", "-c", "touch "+dir+"/f && chown 1000:1000 "+dir+"/f && stat -c %u:%g "+dir+"/f")
	if strings.TrimSpace(res.Stdout) != "1000:1000" {
		t.Fatalf("inside the file is owned by %q, want 1000:1000", res.Stdout)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(dir+"/f", &st); err != nil {
		t.Fatal(err)
	}
	s, _ := strconv.Atoi(start)
	g, _ := strconv.Atoi(gstart)
	if int(st.Uid) != s+999 || int(st.Gid) != g+999 {
		t.Errorf("on the host the file is owned by %d:%d, want %d:%d", st.Uid, st.Gid, s+999, g+999)
	}
}

func TestLauncherSignalForwarded(t *testing.T) {
	r := e2etest.Unprivileged(t)
	for _, extra := range [][]string{nil, {"--pidns"}} {
		t.Run(fmt.Sprintf("flags=%v", extra), func(t *testing.T) {
			args := append(append([]string{"--net=host"}, extra...), "sh", "-c", `trap 'echo got TERM; exit 42' TERM; echo ready; while :; do sleep 0.05; done`)
			cmd := r.Command(context.Background(), args...)
			out, _ := cmd.StdoutPipe()
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			br := bufio.NewReader(out)
			if line, _ := br.ReadString('\n'); line != "ready\n" {
				t.Fatalf("not ready: %q", line)
			}
			cmd.Process.Signal(syscall.SIGTERM)
			line, _ := br.ReadString('\n')
			err := cmd.Wait()
			code := 0
			if ee, ok := err.(*exec.ExitError); ok {
				code = ee.ExitCode()
			}
			if line != "got TERM\n" || code != 42 {
				t.Errorf("after SIGTERM: output %q exit %d, want \"got TERM\" and 42", line, code)
			}
		})
	}
}

func TestLauncherNetNoneAndHost(t *testing.T) {
	r := e2etest.Unprivileged(t)
	res := r.MustRun(t, quick, "--net=none", "sh", "-c", "ls /sys/class/net; cat /sys/class/net/lo/flags")
	if got := strings.Fields(res.Stdout); len(got) != 2 || got[0] != "lo" || got[1] != "0x9" {
		t.Errorf("--net=none: interfaces and lo flags = %v, want only lo, up (0x9)", got)
	}
	hostIfs, _ := os.ReadDir("/sys/class/net")
	res = r.MustRun(t, quick, "--net=host", "ls", "/sys/class/net")
	if got := len(strings.Fields(res.Stdout)); got != len(hostIfs) {
		t.Errorf("--net=host sees %d interfaces, the host has %d", got, len(hostIfs))
	}
}

// An interactive bash on a terminal, with job control.
func TestLauncherInteractiveBash(t *testing.T) {
	r := e2etest.Unprivileged(t)
	if _, err := exec.LookPath("script"); err != nil {
		t.Fatalf("script(1) (util-linux) is needed to give gonetns a terminal: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), quick)
	defer cancel()
	cmd := r.Command(ctx)
	cmd.Path, _ = exec.LookPath("script")
	cmd.Args = []string{"script", "-qec", r.Bin + " --net=host bash --norc -i", "/dev/null"}
	// The input stays open until bash has exited: script(1) may drop the
	// terminal's last output when its stdin ends first. The killed job is
	// reported by bash ("Terminated") or, when wait reaps it first, by its
	// status.
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pw.Close()
	cmd.Stdin = pr
	pw.WriteString("set -m\nsleep 30 &\njobs\nkill %1\nwait %1\necho status=$?\necho tty=$(tty)\nexit 3\n")
	out, err := cmd.CombinedOutput()
	pr.Close()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	}
	s := string(out)
	if code != 3 || !strings.Contains(s, "Running") || !(strings.Contains(s, "Terminated") || strings.Contains(s, "status=143")) || !strings.Contains(s, "tty=/dev/pts/") {
		t.Errorf("interactive bash: exit %d, output:\n%s", code, s)
	}
}

// dockerd-rootless copies up /run with its state dir under /run/user: a
// copy-up of a directory holding the state dir must work, and leave
// nothing behind.
func TestLauncherCopyUpOverStateDir(t *testing.T) {
	r := e2etest.Unprivileged(t)
	parent, err := os.MkdirTemp("/var/tmp", "gonetns-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(parent)
	os.Chown(parent, mustAtoi(r.User.Uid), mustAtoi(r.User.Gid))
	state := parent + "/state"
	res := r.MustRun(t, quick, "--net=none", "--state-dir="+state, "--copy-up=/var", "sh", "-c",
		`touch /var/gonetns-e2e-new && echo created; ls "$GONETNS_STATE_DIR"`)
	if !strings.Contains(res.Stdout, "created") || !strings.Contains(res.Stdout, "child_pid") {
		t.Errorf("copy-up of /var with the state dir under /var/tmp: %s", res)
	}
	if _, err := os.Stat("/var/gonetns-e2e-new"); err == nil {
		os.Remove("/var/gonetns-e2e-new")
		t.Error("a file created in the copied-up /var appeared on the host")
	}
	if left, err := os.ReadDir(state); !errors.Is(err, fs.ErrNotExist) {
		var names []string
		for _, e := range left {
			names = append(names, e.Name())
		}
		t.Errorf("state dir after exit: %v, holding %v; want it removed, as RootlessKit does", err, names)
	}
}

func TestLauncherSubIDSources(t *testing.T) {
	r := e2etest.Unprivileged(t)
	if _, err := exec.LookPath("getsubids"); err != nil {
		t.Fatalf("getsubids is not installed (apt-get install uidmap, shadow 4.11+): %v", err)
	}
	var maps []string
	for _, src := range []string{"static", "dynamic", "auto"} {
		res := r.MustRun(t, quick, "--net=host", "--subid-source="+src, "cat", "/proc/self/uid_map")
		maps = append(maps, strings.Join(strings.Fields(res.Stdout), " "))
	}
	us, uc := subStart(t, "/etc/subuid", r.User.Username)
	want := fmt.Sprintf("0 %s 1 1 %s %s", r.User.Uid, us, uc)
	for i, m := range maps {
		if m != want {
			t.Errorf("source %d: uid_map %q, want %q", i, m, want)
		}
	}
	res := r.Run(t, quick, "--subid-source=ldap", "true")
	if res.Code != exitUsage || !strings.Contains(res.Stderr, "auto, static or dynamic") {
		t.Errorf("--subid-source=ldap: %s", res)
	}
}

// gonetns --debug ... 2>&1 | head: when whoever reads gonetns's stderr
// goes away, the sandbox carries on and ends with the command's status.
func TestLauncherClosedStderr(t *testing.T) {
	r := e2etest.Unprivileged(t)
	ctx, cancel := context.WithTimeout(context.Background(), quick)
	defer cancel()
	cmd := r.Command(ctx, "--debug", "sh", "-c", "sleep 0.5; echo done; exit 4")
	stderr, _ := cmd.StderrPipe()
	var stdout strings.Builder
	cmd.Stdout = &stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	bufio.NewReader(stderr).ReadString('\n') // the first debug line, then hang up
	stderr.Close()
	err := cmd.Wait()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	}
	if ctx.Err() != nil {
		t.Fatal("gonetns hung after its stderr was closed")
	}
	if code != 4 || stdout.String() != "done\n" {
		t.Errorf("with stderr closed: exit %d, stdout %q; want 4 and \"done\"", code, stdout.String())
	}
}

// gonetns inside gonetns (or inside any rootless container): uid 0 there
// maps the ids its own namespace has.
func TestLauncherNested(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	res := r.MustRun(t, quick, "sh", "-c", r.Bin+` sh -c 'id -u; cat /proc/self/uid_map; cat /sys/class/net/tap0/mtu'`)
	got := strings.Join(strings.Fields(res.Stdout), " ")
	_, count := subStart(t, "/etc/subuid", r.User.Username)
	if want := "0 0 0 1 1 1 " + count + " 65520"; got != want {
		t.Errorf("nested sandbox: %q, want %q\n%s", got, want, res)
	}
}

// A command line far larger than one control message (xargs, long file
// lists) reaches the command whole.
func TestLauncherLongCommandLine(t *testing.T) {
	r := e2etest.Unprivileged(t)
	args := []string{"--net=none", "sh", "-c", `echo $# "${60000}"`, "_"}
	for i := 1; i <= 60000; i++ {
		args = append(args, strconv.Itoa(i)+"-argument")
	}
	res := r.MustRun(t, quick, args...)
	if got := strings.TrimSpace(res.Stdout); got != "60000 60000-argument" {
		t.Errorf("60000 arguments (%d bytes): got %q", 60000*15, got)
	}
	// With the collector running all the time, the child's first stage
	// once lost its control socket to a finalizer before it re-executed
	// itself (about 1 run in 2 with GOGC=1).
	for i := range 6 {
		ctx, cancel := context.WithTimeout(context.Background(), quick)
		cmd := r.Command(ctx, args...)
		cmd.Env = append(cmd.Env, "GOGC=1")
		var stdout, stderr strings.Builder
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		cancel()
		if got := strings.TrimSpace(stdout.String()); err != nil || got != "60000 60000-argument" {
			t.Fatalf("run %d with GOGC=1: %v, got %q\n%s", i, err, got, stderr.String())
		}
	}
}
