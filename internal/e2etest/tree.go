package e2etest

import (
	"io"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

var tool built

// Tool builds internal/e2etest/e2etool statically once per test process,
// next to the gonetns binary, and returns its path. Being static, it also
// runs inside a container image that holds nothing but busybox.
func Tool(t testing.TB) string {
	t.Helper()
	return tool.build(t, "e2etool", "./internal/e2etest/e2etool")
}

// TreeSpec is a command to run under the e2etool supervisor.
type TreeSpec struct {
	User  *user.User // who runs Args; nil: root
	Env   []string
	Args  []string
	Log   string        // file that gets the command's stdout and stderr
	Grace time.Duration // how long Stop waits after SIGTERM; default 30 s
	// Owner is the test whose end kills what is still running (default:
	// the test that starts it), e.g. the parent of a subtest that
	// restarts a daemon that later subtests use.
	Owner testing.TB
}

// Tree is a running command and everything it starts, daemons included:
// its supervisor is their subreaper, so Stop and the test's cleanup kill
// and reap all of them, whatever happens to the test.
type Tree struct {
	Log   string
	name  string
	cmd   *exec.Cmd
	stdin io.WriteCloser
	done  chan struct{}
	code  int
	grace time.Duration
}

// StartTree starts spec under the supervisor. The test's cleanup kills the
// whole tree if it is still running.
func StartTree(t testing.TB, spec TreeSpec) *Tree {
	t.Helper()
	if spec.Grace == 0 {
		spec.Grace = 30 * time.Second
	}
	args := []string{"supervise", "--grace=" + spec.Grace.String()}
	if spec.User != nil {
		args = append(args, "--uid="+spec.User.Uid, "--gid="+spec.User.Gid)
	}
	args = append(args, "--")
	args = append(args, spec.Args...)
	cmd := exec.Command(Tool(t), args...)
	cmd.Dir = "/"
	cmd.Env = spec.Env
	log, err := os.OpenFile(spec.Log, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer log.Close()
	cmd.Stdout, cmd.Stderr = log, log
	// The supervisor's own process group: a ^C of the test run reaches it
	// only through the test's cleanup, which then waits for it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s under the supervisor: %v", spec.Args[0], err)
	}
	tr := &Tree{Log: spec.Log, name: filepath.Base(spec.Args[0]), cmd: cmd, stdin: stdin, done: make(chan struct{}), grace: spec.Grace}
	go func() {
		cmd.Wait()
		tr.code = cmd.ProcessState.ExitCode()
		if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			tr.code = 128 + int(ws.Signal())
		}
		close(tr.done)
	}()
	owner := spec.Owner
	if owner == nil {
		owner = t
	}
	owner.Cleanup(func() {
		select {
		case <-tr.done:
			return
		default:
		}
		stdin.Close() // the supervisor kills everything without waiting
		select {
		case <-tr.done:
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			owner.Errorf("the supervisor of %s did not finish killing its tree within 30 s; processes may be left (see %s)", tr.name, tr.Log)
		}
	})
	return tr
}

// Done is closed when the command and everything it started are gone.
func (tr *Tree) Done() <-chan struct{} { return tr.done }

// Code is the command's exit status, once Done is closed.
func (tr *Tree) Code() int { return tr.code }

// Stop sends SIGTERM to the command, waits up to the grace period for it,
// then kills what is left; it returns the command's exit status.
func (tr *Tree) Stop(t testing.TB) int {
	t.Helper()
	select {
	case <-tr.done:
		return tr.code
	default:
	}
	tr.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-tr.done:
	case <-time.After(tr.grace + 30*time.Second):
		tr.stdin.Close()
		<-tr.done
		t.Errorf("%s and its tree did not stop within %v of SIGTERM", tr.name, tr.grace+30*time.Second)
	}
	return tr.code
}

// Tail returns the last n lines of the log.
func (tr *Tree) Tail(n int) string {
	return TailFile(tr.Log, n)
}

// TailFile returns the last n lines of a file.
func TailFile(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.SplitAfter(string(b), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "")
}

// chownTo gives path to u.
func chownTo(t testing.TB, path string, u *user.User) {
	t.Helper()
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	if err := os.Chown(path, uid, gid); err != nil {
		t.Fatal(err)
	}
}
