package e2etest

import (
	"bytes"
	"context"
	"fmt"
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

// PodmanCLI is Debian 12's podman 4.3.1.
const PodmanCLI = "/usr/bin/podman"

// RequirePodman fails unless rootless Podman can run here.
func RequirePodman(t testing.TB) {
	t.Helper()
	var missing []string
	for _, f := range []string{PodmanCLI, "/usr/bin/conmon", "/usr/sbin/runc", "/usr/bin/catatonit",
		"/usr/bin/newuidmap", "/usr/bin/newgidmap", "/usr/bin/nsenter", "/bin/busybox"} {
		if _, err := os.Stat(f); err != nil {
			missing = append(missing, f)
		}
	}
	if len(missing) > 0 {
		t.Fatalf("rootless Podman needs %s (Debian packages podman, conmon, runc, catatonit, uidmap, util-linux, busybox-static): %s",
			strings.Join(missing, ", "), setupHint)
	}
	if !isStatic("/bin/busybox") {
		t.Fatalf("/bin/busybox is not statically linked, so it cannot be the image's only program (apt-get install busybox-static): %s", setupHint)
	}
	RequireUserNamespaces(t)
}

// PodmanConfig says which slirp4netns the test user's Podman runs.
type PodmanConfig struct {
	// Slirp4netns is the program Podman runs as slirp4netns, named by
	// network_cmd_path in the user's containers.conf: gonetns under that
	// name, or the real one.
	Slirp4netns string
	// Env is added to Podman's environment (and so to slirp4netns's).
	Env []string
}

// Podman is rootless Podman as the test user, with a HOME and XDG
// directories of its own (containers.conf, vfs storage, runtime state),
// so nothing of the user's real set-up is read or changed.
type Podman struct {
	User    *user.User
	Dir     string
	Home    string
	Runtime string
	env     []string
}

// NewPodman writes the test user's configuration into a fresh HOME:
// network_cmd_path (the way Podman is told where slirp4netns is), vfs
// storage (no fuse-overlayfs needed), cgroupfs (no systemd session), runc
// (crun refuses hosts with cgroups v1 and v2 mounted side by side, as this
// one has), events in a file.
func NewPodman(t testing.TB, cfg PodmanConfig) *Podman {
	t.Helper()
	RequirePodman(t)
	r := Unprivileged(t)
	// A short directory: Podman's API socket for port_handler=slirp4netns
	// is $XDG_RUNTIME_DIR/libpod/tmp/<64 hex digits>.net, and a unix
	// socket's path has room for 107 bytes.
	dir, err := os.MkdirTemp("", "pm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	chownTo(t, dir, r.User)
	p := &Podman{User: r.User, Dir: dir, Home: filepath.Join(dir, "home"), Runtime: filepath.Join(dir, "run")}
	conf := filepath.Join(p.Home, ".config", "containers")
	data := filepath.Join(p.Home, ".local", "share", "containers")
	tmp := filepath.Join(dir, "tmp")
	for _, d := range []string{p.Home, p.Runtime, conf, data, tmp} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	write := func(path, s string) {
		if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(filepath.Join(conf, "containers.conf"), fmt.Sprintf(`[engine]
network_cmd_path = %q
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
tmp_dir = %q

[containers]
netns = "slirp4netns"
`, cfg.Slirp4netns, filepath.Join(p.Runtime, "libpod", "tmp")))
	write(filepath.Join(conf, "storage.conf"), fmt.Sprintf(`[storage]
driver = "vfs"
graphroot = %q
runroot = %q
`, filepath.Join(data, "storage"), filepath.Join(p.Runtime, "containers")))
	write(filepath.Join(conf, "policy.json"), `{"default":[{"type":"insecureAcceptAnything"}]}`+"\n")
	filepath.Walk(dir, func(path string, _ os.FileInfo, err error) error {
		if err == nil {
			chownTo(t, path, r.User)
		}
		return nil
	})
	p.env = append([]string{
		"HOME=" + p.Home,
		"USER=" + r.User.Username,
		"LOGNAME=" + r.User.Username,
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"XDG_RUNTIME_DIR=" + p.Runtime,
		"XDG_CONFIG_HOME=" + filepath.Join(p.Home, ".config"),
		"XDG_DATA_HOME=" + filepath.Join(p.Home, ".local", "share"),
		"TMPDIR=" + tmp,
		"LANG=C.UTF-8",
	}, cfg.Env...)
	t.Cleanup(func() { p.reset(t) })
	return p
}

// reset removes every container and the storage, and ends what this
// Podman left running: its pause process (catatonit, which keeps the user
// namespace for the next podman command and outlives every one of them),
// and anything else started with its runtime directory.
func (p *Podman) reset(t testing.TB) {
	p.Run(60*time.Second, "rm", "--all", "--force", "--time=0")
	// The storage holds files owned by the user's subordinate ids.
	p.Run(60*time.Second, "unshare", "rm", "-rf", filepath.Join(p.Home, ".local", "share", "containers"))
	killByEnv("XDG_RUNTIME_DIR=" + p.Runtime)
}

// killByEnv kills the processes whose environment has the entry kv.
func killByEnv(kv string) {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "environ"))
		if err != nil {
			continue
		}
		for _, entry := range bytes.Split(b, []byte{0}) {
			if string(entry) == kv {
				syscall.Kill(pid, syscall.SIGKILL)
				break
			}
		}
	}
}

// Command prepares podman with args as the test user.
func (p *Podman) Command(ctx context.Context, args ...string) *exec.Cmd {
	return userCommand(ctx, p.User, p.env, PodmanCLI, args...)
}

// Run runs podman and returns its stdout; the error carries stderr.
func (p *Podman) Run(timeout time.Duration, args ...string) (string, error) {
	return runOutput(timeout, p.Command, "podman", args...)
}

// Must is Run that fails the test on an error.
func (p *Podman) Must(t testing.TB, timeout time.Duration, args ...string) string {
	t.Helper()
	out, err := p.Run(timeout, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// ImportBusybox makes BusyboxImage offline, with podman import of the
// same rootfs the Docker tests import.
func (p *Podman) ImportBusybox(t testing.TB) {
	t.Helper()
	tool := Tool(t)
	rootfsOnce.Do(func() { rootfsTar, rootfsErr = busyboxRootfs(tool) })
	if rootfsErr != nil {
		t.Fatalf("build the image's rootfs: %v", rootfsErr)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	cmd := p.Command(ctx, "import", "-", BusyboxImage)
	cmd.Stdin = bytes.NewReader(rootfsTar)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("podman import: %v\n%s", err, out)
	}
}
