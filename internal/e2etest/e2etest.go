// Package e2etest runs the real gonetns binary in end-to-end tests: built
// once per test process, run as the unprivileged test user that
// scripts/test-setup.sh creates (with subordinate ids) and as root.
//
// A missing environment fails the test with a diagnosis; nothing is
// skipped.
package e2etest

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Test users made by scripts/test-setup.sh.
const (
	TestUser  = "gonetns-test"  // has /etc/subuid and /etc/subgid entries
	NoSubUser = "gonetns-nosub" // has none
)

const setupHint = "run `make test` (it runs scripts/test-setup.sh as root first), or run scripts/test-setup.sh as root yourself"

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// Binary builds cmd/gonetns once per test process, statically, into a
// directory every test user can read, and returns its path. The binary is
// for the test users, which only root can switch to: a test run by anyone
// else fails here at once, before the build, with what to do.
func Binary(t testing.TB) string {
	t.Helper()
	if os.Getuid() != 0 {
		t.Fatalf("end-to-end tests run gonetns as the test users and so must run as root: %s; `go test $(go list ./... | grep -v /cmd/gonetns)` runs the unit tests without root", setupHint)
	}
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "gonetns-e2e-bin-")
		if err != nil {
			buildErr = err
			return
		}
		os.Chmod(dir, 0o755)
		binPath = filepath.Join(dir, "gonetns")
		root := moduleRoot()
		cmd := exec.Command("go", "build", "-o", binPath, "./cmd/gonetns")
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build ./cmd/gonetns: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatalf("build gonetns: %v", buildErr)
	}
	return binPath
}

// Cleanup removes what this package made for the whole test process: the
// directory of the gonetns binary, with the tool directories ToolPath made
// in it (17 to 31 MB a run). A TestMain calls it after m.Run.
func Cleanup() {
	if binPath != "" {
		os.RemoveAll(filepath.Dir(binPath))
	}
}

// A program the tests build once per test process, next to Binary's.
type built struct {
	once sync.Once
	path string
	err  error
}

// build runs `go build FLAGS -o DIR/NAME PKG` once for b, with DIR the
// directory of Binary's gonetns, and returns the path.
func (b *built) build(t testing.TB, name, pkg string, flags ...string) string {
	t.Helper()
	bin := Binary(t)
	b.once.Do(func() {
		b.path = filepath.Join(filepath.Dir(bin), name)
		args := append(append([]string{"build"}, flags...), "-o", b.path, pkg)
		cmd := exec.Command("go", args...)
		cmd.Dir = moduleRoot()
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			b.err = fmt.Errorf("go %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	})
	if b.err != nil {
		t.Fatalf("build %s for the tests: %v", name, b.err)
	}
	return b.path
}

var hookBinary built

// HookBinary builds cmd/gonetns with the e2ehooks build tag, next to
// Binary's: the same program plus probes that only the end-to-end tests
// turn on (through variables of their own, e.g. GONETNS_E2E_CONFINE_PROBE
// in cmd/gonetns/probe_e2e.go). The binaries people run never have them.
func HookBinary(t testing.TB) string {
	t.Helper()
	return hookBinary.build(t, "gonetns-e2ehooks", "./cmd/gonetns", "-tags", "e2ehooks")
}

func moduleRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// Runner runs gonetns as one user.
type Runner struct {
	Name string     // for subtest names: "user" or "root"
	User *user.User // who runs gonetns
	Bin  string
	// NoTun runs gonetns where /dev/net/tun cannot be opened (WithoutTun).
	NoTun bool
}

// Unprivileged returns a Runner for the test user with subordinate ids,
// checking everything an unprivileged run needs.
func Unprivileged(t testing.TB) Runner {
	t.Helper()
	return runnerFor(t, TestUser, true)
}

// NoSubIDs returns a Runner for the test user without subordinate ids.
func NoSubIDs(t testing.TB) Runner {
	t.Helper()
	return runnerFor(t, NoSubUser, false)
}

// Root returns a Runner for root; the tests must run as root.
func Root(t testing.TB) Runner {
	t.Helper()
	if os.Getuid() != 0 {
		t.Fatalf("the root variant of this end-to-end test needs the tests to run as root: %s", setupHint)
	}
	u, err := user.LookupId("0")
	if err != nil {
		t.Fatal(err)
	}
	return Runner{Name: "root", User: u, Bin: Binary(t), NoTun: withoutTun(t)}
}

// Both returns the unprivileged and the root Runner, in that order.
func Both(t testing.TB) []Runner {
	t.Helper()
	return []Runner{Unprivileged(t), Root(t)}
}

func runnerFor(t testing.TB, name string, wantSubIDs bool) Runner {
	t.Helper()
	if os.Getuid() != 0 {
		t.Fatalf("end-to-end tests switch to the test user %s and so must run as root: %s", name, setupHint)
	}
	u, err := user.Lookup(name)
	if err != nil {
		t.Fatalf("test user %s does not exist: %s", name, setupHint)
	}
	if _, err := exec.LookPath("newuidmap"); err != nil && wantSubIDs {
		t.Fatalf("newuidmap is not installed (apt-get install uidmap): %s", setupHint)
	}
	if wantSubIDs {
		for _, f := range []string{"/etc/subuid", "/etc/subgid"} {
			b, _ := os.ReadFile(f)
			if !bytes.Contains(b, []byte("\n"+name+":")) && !bytes.HasPrefix(b, []byte(name+":")) {
				t.Fatalf("%s has no entry for %s: %s", f, name, setupHint)
			}
		}
	}
	return Runner{Name: "user", User: u, Bin: Binary(t), NoTun: withoutTun(t)}
}

// RequireTun fails unless the test user can open /dev/net/tun.
func RequireTun(t testing.TB) {
	t.Helper()
	st, err := os.Stat("/dev/net/tun")
	if err != nil {
		t.Fatalf("/dev/net/tun: %v (modprobe tun)", err)
	}
	if st.Mode().Perm()&0o006 != 0o006 {
		t.Fatalf("/dev/net/tun is mode %04o; unprivileged users cannot open it: %s", st.Mode().Perm(), setupHint)
	}
}

// Command prepares gonetns with args, run as r's user with a login-like
// environment (HOME, USER, LOGNAME, PATH; no XDG_RUNTIME_DIR).
func (r Runner) Command(ctx context.Context, args ...string) *exec.Cmd {
	return r.Exec(ctx, r.Bin, args...)
}

// Exec prepares another program, run as Command runs gonetns.
func (r Runner) Exec(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = "/"
	uid, _ := strconv.Atoi(r.User.Uid)
	gid, _ := strconv.Atoi(r.User.Gid)
	cmd.Env = []string{
		"HOME=" + r.User.HomeDir,
		"USER=" + r.User.Username,
		"LOGNAME=" + r.User.Username,
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"LANG=C.UTF-8",
	}
	if uid != 0 {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}}
	}
	cmd.WaitDelay = 5 * time.Second
	if r.NoTun {
		r.hideTun(cmd)
	}
	return cmd
}

// Result is the outcome of one gonetns run.
type Result struct {
	Stdout, Stderr string
	Code           int
}

func (res Result) String() string {
	return fmt.Sprintf("exit %d\n--- stdout:\n%s--- stderr:\n%s", res.Code, res.Stdout, res.Stderr)
}

// Run runs gonetns with args and a time limit, and returns what happened.
func (r Runner) Run(t testing.TB, timeout time.Duration, args ...string) Result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := r.Command(ctx, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	res := Result{Stdout: stdout.String(), Stderr: stderr.String()}
	if ctx.Err() != nil {
		t.Fatalf("gonetns %s did not finish within %v\n%s", strings.Join(args, " "), timeout, res)
	}
	if ee, ok := err.(*exec.ExitError); ok {
		res.Code = ee.ExitCode()
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			res.Code = 128 + int(ws.Signal())
		}
	} else if err != nil {
		t.Fatalf("run gonetns: %v", err)
	}
	return res
}

// MustRun is Run that fails the test unless gonetns exits 0.
func (r Runner) MustRun(t testing.TB, timeout time.Duration, args ...string) Result {
	t.Helper()
	res := r.Run(t, timeout, args...)
	if res.Code != 0 {
		t.Fatalf("gonetns %s failed:\n%s", strings.Join(args, " "), res)
	}
	return res
}

// TempDir returns a directory owned by r's user that is removed after the
// test.
func (r Runner) TempDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "gonetns-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	uid, _ := strconv.Atoi(r.User.Uid)
	gid, _ := strconv.Atoi(r.User.Gid)
	if err := os.Chown(dir, uid, gid); err != nil {
		t.Fatal(err)
	}
	return dir
}

// Sysctl reads a sysctl by its dotted name.
func Sysctl(t testing.TB, name string) string {
	t.Helper()
	b, err := os.ReadFile("/proc/sys/" + strings.ReplaceAll(name, ".", "/"))
	if err != nil {
		t.Fatalf("read sysctl %s: %v", name, err)
	}
	return strings.TrimSpace(string(b))
}

// PingAllowed reports whether net.ipv4.ping_group_range lets r's user open
// ping sockets.
func (r Runner) PingAllowed(t testing.TB) bool {
	t.Helper()
	f := strings.Fields(Sysctl(t, "net.ipv4.ping_group_range"))
	if len(f) != 2 {
		t.Fatalf("unexpected ping_group_range %q", f)
	}
	lo, _ := strconv.Atoi(f[0])
	hi, _ := strconv.Atoi(f[1])
	gid, _ := strconv.Atoi(r.User.Gid)
	return lo <= gid && gid <= hi
}

// Pidfd-free check that a process is gone.
func processGone(pid int) bool {
	return unix.Kill(pid, 0) == unix.ESRCH
}

// WaitGone waits up to d for pid to disappear.
func WaitGone(pid int, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if processGone(pid) {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	return processGone(pid)
}

// HelperEnv selects a helper mode of the test binary (see Helper).
const HelperEnv = "GONETNS_E2E_HELPER"

var (
	helperOnce sync.Once
	helperPath string
	helperErr  error
)

// Helper copies the running test binary next to the gonetns binary, where
// every test user can run it, and returns its path. Run inside the sandbox
// with HelperEnv set, the test binary's TestMain dispatches to a helper
// client or server instead of running tests.
func Helper(t testing.TB) string {
	t.Helper()
	bin := Binary(t)
	helperOnce.Do(func() {
		self, err := os.Executable()
		if err != nil {
			helperErr = err
			return
		}
		helperPath = filepath.Join(filepath.Dir(bin), "e2e-helper")
		data, err := os.ReadFile(self)
		if err != nil {
			helperErr = err
			return
		}
		helperErr = os.WriteFile(helperPath, data, 0o755)
	})
	if helperErr != nil {
		t.Fatalf("install the e2e helper: %v", helperErr)
	}
	return helperPath
}

// HelperCmd is a shell command line running helper mode with args inside
// the sandbox.
func HelperCmd(t testing.TB, mode string, args ...string) string {
	t.Helper()
	q := []string{HelperEnv + "=" + mode, Helper(t)}
	for _, a := range args {
		q = append(q, "'"+strings.ReplaceAll(a, "'", `'\''`)+"'")
	}
	return "env " + strings.Join(q, " ")
}

var linkMu sync.Mutex

// As returns a Runner whose binary is gonetns under another name (a
// symlink next to it, e.g. "rootlesskit" or "rootlessctl"): gonetns
// speaks the command line of the program argv[0] names.
func (r Runner) As(t testing.TB, name string) Runner {
	t.Helper()
	linkMu.Lock()
	defer linkMu.Unlock()
	dir := filepath.Join(filepath.Dir(Binary(t)), "as")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, name)
	if _, err := os.Lstat(link); err != nil {
		if err := os.Symlink(Binary(t), link); err != nil {
			t.Fatal(err)
		}
	}
	r.Bin = link
	return r
}

// userCommand prepares path with args as u, with env, in /.
func userCommand(ctx context.Context, u *user.User, env []string, path string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Dir = "/"
	cmd.Env = env
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}}
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// runOutput runs the command command makes with args, bounded by timeout,
// and returns its stdout; the error, named after name, carries stderr.
func runOutput(timeout time.Duration, command func(context.Context, ...string) *exec.Cmd, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := command(ctx, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if ctx.Err() != nil {
		err = fmt.Errorf("timed out after %v", timeout)
	}
	if err != nil {
		return stdout.String(), fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, stderr.String())
	}
	return stdout.String(), nil
}
