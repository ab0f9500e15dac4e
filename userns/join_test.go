package userns

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// joinTestHooks are the helper's hooks when the test binary is the
// helper: the network hook reports the namespaces it runs in and sends a
// file; the serve hook answers "pong" on its extra file until stopped.
var joinTestHooks = ChildHooks{
	Network: func(raw json.RawMessage, _ *slog.Logger) (any, []*os.File, error) {
		var want string
		json.Unmarshal(raw, &want)
		net, _ := os.Readlink("/proc/self/ns/net")
		user, _ := os.Readlink("/proc/self/ns/user")
		f, err := os.Open("/dev/null")
		if err != nil {
			return nil, nil, err
		}
		return map[string]string{"net": net, "user": user, "want": want, "uid": strconv.Itoa(os.Getuid())}, []*os.File{f}, nil
	},
	Serve: func(ctx context.Context, extra []*os.File, _ *slog.Logger) {
		go func() {
			b := make([]byte, 4)
			for {
				if _, err := extra[0].Read(b); err != nil {
					return
				}
				extra[0].Write([]byte("pong"))
			}
		}()
		<-ctx.Done()
	},
}

// target is a process in new user and network namespaces, as slirp4netns's
// callers make them.
func target(t *testing.T) int {
	t.Helper()
	cmd := exec.Command("unshare", "--user", "--map-root-user", "--net", "sleep", "infinity")
	if err := cmd.Start(); err != nil {
		t.Fatalf("unshare: %v", err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for deadline := time.Now().Add(10 * time.Second); ; {
		b, _ := os.ReadFile("/proc/" + strconv.Itoa(cmd.Process.Pid) + "/comm")
		if strings.TrimSpace(string(b)) == "sleep" {
			return cmd.Process.Pid
		}
		if time.Now().After(deadline) {
			t.Fatal("unshare did not start sleep")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// The helper runs in the target's user and network namespaces, sends the
// network hook's files back, serves its extra files until Close, and is
// gone after it.
func TestJoin(t *testing.T) {
	if os.Getuid() != 0 {
		t.Fatal("this test creates user namespaces with unshare and needs root: run `make test` as root")
	}
	pid := target(t)
	ns := func(kind string) string { return "/proc/" + strconv.Itoa(pid) + "/ns/" + kind }
	wantNet, _ := os.Readlink(ns("net"))
	wantUser, _ := os.Readlink(ns("user"))
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	a, b := os.NewFile(uintptr(fds[0]), "a"), os.NewFile(uintptr(fds[1]), "b")
	defer a.Close()
	h, err := Join(JoinOptions{NetNS: ns("net"), UserNS: ns("user"), Network: "hello", ExtraFiles: []*os.File{b}})
	b.Close()
	if err != nil {
		t.Fatal(err)
	}
	info, files := h.NetworkInfo()
	var got map[string]string
	json.Unmarshal(info, &got)
	if got["net"] != wantNet || got["user"] != wantUser || got["want"] != "hello" || got["uid"] != "0" || len(files) != 1 {
		t.Errorf("the helper ran in %v with %d files; want net %s, user %s, uid 0 inside and the network config", got, len(files), wantNet, wantUser)
	}
	for _, f := range files {
		f.Close()
	}
	if err := h.Serve(); err != nil {
		t.Fatal(err)
	}
	a.SetDeadline(time.Now().Add(10 * time.Second))
	a.Write([]byte("ping"))
	buf := make([]byte, 4)
	if _, err := io.ReadFull(a, buf); err != nil || string(buf) != "pong" {
		t.Errorf("the serve hook answered %q, %v", buf, err)
	}
	h.Close()
	select {
	case <-h.Exited():
	default:
		t.Errorf("the helper runs on after Close")
	}
	if h.status.Signaled() || h.status.ExitStatus() != 0 {
		t.Errorf("the helper ended %s, want exit status 0", describeStatus(h.status))
	}
}

// A path that is no network namespace fails with setns's own error, as
// slirp4netns reports it.
func TestJoinNotANamespace(t *testing.T) {
	_, err := Join(JoinOptions{NetNS: "/dev/null", Network: "x"})
	if err == nil || !strings.Contains(err.Error(), "setns(CLONE_NEWNET): invalid argument") {
		t.Errorf("Join of /dev/null: %v", err)
	}
	_, err = Join(JoinOptions{NetNS: "/nonexistent/ns"})
	if err == nil || !strings.Contains(err.Error(), "open /nonexistent/ns: no such file or directory") {
		t.Errorf("Join of a missing path: %v", err)
	}
}
