package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/gonetns/gonetns/api"
	"github.com/gonetns/gonetns/internal/e2etest"
)

// Once the sandbox runs, the network process cannot read the user's
// files, run programs or trace the user's other processes: a binary built
// with the test hooks tries each after set-up and reports what it got.
// With --confine-network-process=false the same probes succeed, which
// shows that they would see a missing confinement.
func TestNetworkProcessConfined(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	r.Bin = e2etest.HookBinary(t)
	uid, _ := strconv.Atoi(r.User.Uid)
	gid, _ := strconv.Atoi(r.User.Gid)

	secret := filepath.Join(r.User.HomeDir, fmt.Sprintf(".gonetns-confine-probe-%d", os.Getpid()))
	if err := os.WriteFile(secret, []byte("the user's own file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(secret)
	os.Chown(secret, uid, gid)
	// A process of the same user, which the network process could
	// ptrace if it were not confined.
	sibling := exec.Command("sleep", "120")
	sibling.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
	if err := sibling.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { sibling.Process.Kill(); sibling.Wait() }()
	probe := fmt.Sprintf("%s:%d", secret, sibling.Process.Pid)

	run := func(t *testing.T, flags ...string) (map[string]string, api.Info) {
		ctx, cancel := context.WithTimeout(context.Background(), netTimeout)
		defer cancel()
		args := append(flags, "sh", "-c", `curl -sS --unix-socket "$ROOTLESSKIT_STATE_DIR/api.sock" http://gonetns/v1/info`)
		cmd := r.Command(ctx, args...)
		cmd.Env = append(cmd.Env, "GONETNS_E2E_CONFINE_PROBE="+probe)
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		if err := cmd.Run(); err != nil {
			t.Fatalf("gonetns %v: %v\nstdout:\n%s\nstderr:\n%s", flags, err, &stdout, &stderr)
		}
		got := map[string]string{}
		for _, l := range strings.Split(stderr.String(), "\n") {
			if rest, ok := strings.CutPrefix(l, "confine-probe: "); ok {
				what, res, _ := strings.Cut(rest, " => ")
				got[what] = res
			}
		}
		var info api.Info
		if err := json.Unmarshal(stdout.Bytes(), &info); err != nil {
			t.Fatalf("GET /v1/info: %v\n%s", err, &stdout)
		}
		if len(got) != 3 {
			t.Fatalf("want three probe lines on stderr:\n%s", &stderr)
		}
		return got, info
	}
	read, ptrace := "read "+secret, fmt.Sprintf("ptrace %d", sibling.Process.Pid)

	t.Run("confined", func(t *testing.T) {
		got, info := run(t)
		for what, want := range map[string][]string{
			read:             {"permission denied"},
			"exec /bin/true": {"permission denied", "operation not permitted"},
			ptrace:           {"operation not permitted"},
		} {
			ok := false
			for _, w := range want {
				ok = ok || strings.HasSuffix(got[what], w)
			}
			if !ok {
				t.Errorf("%s after set-up: %q, want it refused (%s)", what, got[what], strings.Join(want, " or "))
			}
		}
		if c := info.Confinement; c == nil || !strings.HasSuffix(c.Landlock, "applied") || !strings.HasPrefix(c.Seccomp, "filter applied") {
			t.Errorf("/v1/info's confinement: %+v, want both layers applied", c)
		}
	})
	t.Run("not confined", func(t *testing.T) {
		got, info := run(t, "--confine-network-process=false")
		for _, what := range []string{read, "exec /bin/true", ptrace} {
			if got[what] != "ok" {
				t.Errorf("%s with --confine-network-process=false: %q; the probe cannot tell confinement from its absence", what, got[what])
			}
		}
		if info.Confinement != nil {
			t.Errorf("/v1/info's confinement with --confine-network-process=false: %+v, want none", info.Confinement)
		}
	})
}
