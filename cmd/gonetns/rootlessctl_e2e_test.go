package main

import (
	"bytes"
	"context"
	jsonpkg "encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gonetns/gonetns/internal/e2etest"
)

// ctlResult is what one rootlessctl run printed.
type ctlResult struct {
	stdout, stderr string
	code           int
}

func (r ctlResult) String() string {
	return fmt.Sprintf("exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
}

// TestRootlessctlSameOutput runs gonetns as rootlessctl and RootlessKit's
// own rootlessctl (Debian's 1.1 and v3.0.1) against one running sandbox
// (the RootlessKit implementation GONETNS_E2E_ROOTLESSKIT selects) and
// compares what they print. gonetns must print what v3 prints; where 1.1
// agrees with v3, also what 1.1 prints.
func TestRootlessctlSameOutput(t *testing.T) {
	e2etest.RequireTun(t)
	kit := e2etest.SelectedKit(t)
	r := e2etest.Unprivileged(t)
	gonetnsCtl := filepath.Join(e2etest.ToolPath(t, e2etest.GonetnsKit(t)), "rootlessctl")
	refs := []struct{ name, path string }{
		{"v3", filepath.Join(e2etest.RootlessKitV3Dir, "rootlessctl")},
		{"1.1", "/usr/bin/rootlessctl"},
	}
	for _, ref := range refs {
		if _, err := os.Stat(ref.path); err != nil {
			t.Fatalf("RootlessKit %s's rootlessctl is not installed at %s (scripts/test-setup.sh installs it)", ref.name, ref.path)
		}
	}

	dir := r.TempDir(t)
	stateDir := filepath.Join(dir, "state")
	socket := filepath.Join(stateDir, "api.sock")
	env := []string{"HOME=" + r.User.HomeDir, "PATH=" + e2etest.ToolPath(t, kit), "LANG=C.UTF-8"}
	tree := e2etest.StartTree(t, e2etest.TreeSpec{
		User: r.User, Env: env, Log: filepath.Join(dir, "log"), Grace: 20 * time.Second,
		Args: []string{"rootlesskit", "--net=slirp4netns", "--port-driver=builtin", "--state-dir=" + stateDir, "sh", "-c",
			fmt.Sprintf("echo ready; for i in $(seq 1200); do [ -e %s/done ] && break; sleep 0.1; done", dir)},
	})
	waitReady(t, tree, 60*time.Second)
	t.Logf("sandbox: %s as rootlesskit", kit.Name)

	run := func(prog string, extraEnv []string, args ...string) ctlResult {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, prog, args...)
		cmd.Env = append(append([]string(nil), env...), extraEnv...)
		cmd.Dir = "/"
		uid, _ := strconv.Atoi(r.User.Uid)
		gid, _ := strconv.Atoi(r.User.Gid)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}}
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		res := ctlResult{stdout: stdout.String(), stderr: stderr.String()}
		var ee *exec.ExitError
		switch {
		case ctx.Err() != nil:
			t.Fatalf("%s %s did not finish within 30 s", prog, strings.Join(args, " "))
		case errors.As(err, &ee):
			res.code = ee.ExitCode()
		case err != nil:
			t.Fatalf("run %s: %v", prog, err)
		}
		return res
	}
	sock := "--socket=" + socket

	// compare runs one read-only command with every client and compares
	// exit status and stdout (sorted lines when sorted is set: list-ports
	// prints in the server's order, random for RootlessKit's own, and
	// RootlessKit 1.1's client sorts its table, v3's does not);
	// stderr must be empty on success and say something on failure.
	compare := func(sorted bool, extraEnv []string, args ...string) {
		t.Helper()
		norm := func(s string) string {
			if !sorted {
				return s
			}
			l := strings.SplitAfter(s, "\n")
			slices.Sort(l)
			return strings.Join(l, "")
		}
		got := run(gonetnsCtl, extraEnv, args...)
		v3 := run(refs[0].path, extraEnv, args...)
		v11 := run(refs[1].path, extraEnv, args...)
		what := "rootlessctl " + strings.Join(args, " ")
		if got.code != v3.code || norm(got.stdout) != norm(v3.stdout) {
			t.Errorf("%s:\ngonetns:            %s\nRootlessKit v3.0.1: %s", what, got, v3)
		}
		if v11.code == v3.code && norm(v11.stdout) == norm(v3.stdout) {
			if got.code != v11.code || norm(got.stdout) != norm(v11.stdout) {
				t.Errorf("%s:\ngonetns:          %s\nRootlessKit 1.1:  %s", what, got, v11)
			}
		} else {
			t.Logf("%s: RootlessKit 1.1 and v3 differ, gonetns is compared with v3:\n1.1: %s\nv3:  %s", what, v11, v3)
		}
		if got.code == 0 && got.stderr != "" {
			t.Errorf("%s: gonetns succeeded but wrote to stderr: %q", what, got.stderr)
		}
		if got.code != 0 && strings.TrimSpace(got.stderr) == "" {
			t.Errorf("%s: gonetns failed with status %d and said nothing on stderr (v3: %q)", what, got.code, v3.stderr)
		}
	}

	compare(true, nil, sock, "list-ports")
	compare(false, nil, sock, "list-ports", "--json")
	compare(false, nil, sock, "info")
	compare(false, nil, sock, "info", "--json")
	compare(false, []string{"ROOTLESSKIT_STATE_DIR=" + stateDir}, "info")

	// Ports added by each client in turn: each prints the new ID, one more
	// than the last (with --json, the port's status; compared with v3's
	// with the ID and ports replaced).
	var ids []int
	jsonOut := map[string]string{}
	addPort := func(name, prog string, json bool) {
		t.Helper()
		port, childPort := freePort(t, "tcp"), 8000+len(ids)
		args := []string{sock, "add-ports"}
		if json {
			args = append(args, "--json")
		}
		spec := fmt.Sprintf("127.0.0.1:%d:%d/tcp", port, childPort)
		res := run(prog, nil, append(args, spec)...)
		if res.code != 0 {
			t.Fatalf("%s add-ports %s: %s", prog, spec, res)
		}
		var id int
		if json {
			var st struct{ ID int }
			if err := jsonpkg.Unmarshal([]byte(res.stdout), &st); err != nil {
				t.Fatalf("%s add-ports --json %s printed %q: %v", prog, spec, res.stdout, err)
			}
			id = st.ID
			jsonOut[name] = strings.NewReplacer(fmt.Sprintf(`"id":%d,`, id), `"id":ID,`,
				fmt.Sprintf(":%d,", port), ":PORT,", fmt.Sprintf(":%d}", childPort), ":CHILDPORT}").Replace(res.stdout)
		} else {
			var err error
			if id, err = strconv.Atoi(strings.TrimSuffix(res.stdout, "\n")); err != nil {
				t.Errorf("%s add-ports %s printed %q, want an ID and a newline", prog, spec, res.stdout)
			}
		}
		if len(ids) > 0 && id != ids[len(ids)-1]+1 {
			t.Errorf("%s add-ports %s: ID %d after %v", prog, spec, id, ids)
		}
		ids = append(ids, id)
	}
	addPort("v3", refs[0].path, false)
	addPort("gonetns", gonetnsCtl, false)
	addPort("1.1", refs[1].path, false)
	addPort("gonetns", gonetnsCtl, true)
	addPort("v3", refs[0].path, true)
	if jsonOut["gonetns"] != jsonOut["v3"] {
		t.Errorf("add-ports --json prints, with ID and ports replaced:\ngonetns: %q\nv3:      %q", jsonOut["gonetns"], jsonOut["v3"])
	}

	compare(true, nil, sock, "list-ports")
	compare(true, nil, sock, "list-ports", "--json")

	// Removal prints the ID; both clients remove one each.
	for i, prog := range []string{refs[0].path, gonetnsCtl} {
		id := strconv.Itoa(ids[i])
		if res := run(prog, nil, sock, "remove-ports", id); res.code != 0 || res.stdout != id+"\n" {
			t.Errorf("%s remove-ports %s: %s, want %q", prog, id, res, id+"\n")
		}
	}
	compare(true, nil, sock, "list-ports")
	compare(true, nil, sock, "list-ports", "--json")

	// Errors: the same exit status, a message on stderr.
	compare(false, nil, sock, "remove-ports", "9999")
	compare(false, nil, sock, "remove-ports", strconv.Itoa(ids[0])) // already removed
	compare(false, nil, sock, "add-ports", "bogus")
	compare(false, nil, sock, "add-ports", fmt.Sprintf("127.0.0.1:%d:80/sctp", freePort(t, "tcp")))
	compare(false, nil, sock, "add-ports")
	compare(false, nil, sock, "remove-ports", "x")
	compare(false, nil, "--socket="+filepath.Join(dir, "no-such.sock"), "list-ports")
	compare(false, nil, "info") // neither --socket nor $ROOTLESSKIT_STATE_DIR

	if err := os.WriteFile(filepath.Join(dir, "done"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	select {
	case <-tree.Done():
	case <-time.After(30 * time.Second):
		t.Fatalf("the sandbox did not exit:\n%s", tree.Tail(20))
	}
	if tree.Code() != 0 {
		t.Errorf("the sandbox exited with status %d:\n%s", tree.Code(), tree.Tail(20))
	}
}
