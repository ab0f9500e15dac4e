package e2etest

import (
	"archive/tar"
	"bytes"
	"context"
	"debug/elf"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// Debian's docker.io: the script users run for rootless Docker, and the
// 20.10 client and daemon (/usr/local/bin may hold another docker client).
const (
	DockerdRootlessScript = "/usr/share/docker.io/contrib/dockerd-rootless.sh"
	DockerCLI             = "/usr/bin/docker"
)

// BusyboxImage is the image ImportBusybox makes: busybox-static with its
// applets, and e2etool at /bin/e2etool.
const BusyboxImage = "gonetns-e2e-busybox:1"

// RequireDocker fails unless everything rootless Docker needs is
// installed and allowed.
func RequireDocker(t testing.TB) {
	t.Helper()
	var missing []string
	for _, f := range []string{DockerdRootlessScript, DockerCLI, "/usr/sbin/dockerd", "/usr/bin/containerd",
		"/usr/bin/containerd-shim-runc-v2", "/usr/sbin/runc", "/usr/sbin/docker-proxy", "/usr/sbin/iptables",
		"/usr/bin/newuidmap", "/usr/bin/newgidmap", "/usr/bin/nsenter", "/bin/busybox"} {
		if _, err := os.Stat(f); err != nil {
			missing = append(missing, f)
		}
	}
	if len(missing) > 0 {
		t.Fatalf("rootless Docker needs %s (Debian packages docker.io, containerd, runc, iptables, uidmap, util-linux, busybox-static): %s",
			strings.Join(missing, ", "), setupHint)
	}
	if !isStatic("/bin/busybox") {
		t.Fatalf("/bin/busybox is not statically linked, so it cannot be the image's only program (apt-get install busybox-static): %s", setupHint)
	}
	RequireUserNamespaces(t)
}

// RequireUserNamespaces fails unless unprivileged users may create user
// namespaces (the kernel knobs distributions use to forbid it).
func RequireUserNamespaces(t testing.TB) {
	t.Helper()
	for name, want := range map[string]string{
		"kernel.unprivileged_userns_clone":             "1", // Debian before 11
		"kernel.apparmor_restrict_unprivileged_userns": "0", // Ubuntu 23.10 and later
	} {
		b, err := os.ReadFile("/proc/sys/" + strings.ReplaceAll(name, ".", "/"))
		if err == nil && strings.TrimSpace(string(b)) != want {
			t.Fatalf("sysctl %s is %s; unprivileged user namespaces need %s: %s", name, strings.TrimSpace(string(b)), want, setupHint)
		}
	}
	if Sysctl(t, "user.max_user_namespaces") == "0" {
		t.Fatalf("sysctl user.max_user_namespaces is 0: %s", setupHint)
	}
}

func isStatic(path string) bool {
	f, err := elf.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return false
		}
	}
	return true
}

// DockerConfig says how to start a rootless dockerd.
type DockerConfig struct {
	Kit Kit
	// Flags reach RootlessKit through DOCKERD_ROOTLESS_ROOTLESSKIT_FLAGS,
	// after the script's own flags; --state-dir is always among them.
	Flags []string
}

// Docker is a rootless dockerd started the way its user starts it:
// Debian's dockerd-rootless.sh, unchanged, with Kit's programs on PATH
// under RootlessKit's names and the test user's own XDG_RUNTIME_DIR and
// HOME (so its data root), vfs storage.
type Docker struct {
	Kit      Kit
	User     *user.User
	Dir      string // runtime dir, home, tmp and logs of this daemon
	Runtime  string // XDG_RUNTIME_DIR
	Home     string
	StateDir string // RootlessKit's --state-dir
	Path     string // the tool PATH
	env      []string
	owner    testing.TB
	tree     *Tree
	starts   int
}

// NewDocker prepares the directories and environment of a rootless
// dockerd for the test user; Start starts it. Whatever of it still runs
// when t ends is killed then.
func NewDocker(t testing.TB, cfg DockerConfig) *Docker {
	t.Helper()
	RequireDocker(t)
	r := Unprivileged(t)
	dir := r.TempDir(t)
	d := &Docker{Kit: cfg.Kit, User: r.User, Dir: dir, Path: ToolPath(t, cfg.Kit), owner: t}
	d.Runtime = filepath.Join(dir, "run")
	d.Home = filepath.Join(dir, "home")
	tmp := filepath.Join(dir, "tmp")
	for _, p := range []string{d.Runtime, d.Home, tmp} {
		if err := os.Mkdir(p, 0o700); err != nil {
			t.Fatal(err)
		}
		chownTo(t, p, r.User)
	}
	d.StateDir = filepath.Join(d.Runtime, "dockerd-rootless")
	flags := append([]string{"--state-dir=" + d.StateDir}, cfg.Flags...)
	d.env = []string{
		"HOME=" + d.Home,
		"USER=" + r.User.Username,
		"LOGNAME=" + r.User.Username,
		"PATH=" + d.Path,
		"XDG_RUNTIME_DIR=" + d.Runtime,
		"TMPDIR=" + tmp,
		"LANG=C.UTF-8",
		"DOCKER_HOST=unix://" + filepath.Join(d.Runtime, "docker.sock"),
		"DOCKERD_ROOTLESS_ROOTLESSKIT_FLAGS=" + strings.Join(flags, " "),
	}
	if cfg.Kit.Gonetns {
		// slirp4netns is not on PATH (gonetns needs no helper), so the
		// script's detection of it cannot pick the network: name it, with
		// the MTU the script would pick for it.
		d.env = append(d.env, "DOCKERD_ROOTLESS_ROOTLESSKIT_NET=slirp4netns", "DOCKERD_ROOTLESS_ROOTLESSKIT_MTU=65520")
	}
	return d
}

// Env is the environment dockerd-rootless.sh and the docker client get.
func (d *Docker) Env() []string { return append([]string(nil), d.env...) }

// Start runs dockerd-rootless.sh and waits until the daemon answers.
func (d *Docker) Start(t testing.TB) {
	t.Helper()
	d.starts++
	log := filepath.Join(d.Dir, fmt.Sprintf("dockerd-%d.log", d.starts))
	d.tree = StartTree(t, TreeSpec{
		User:  d.User,
		Env:   d.env,
		Args:  []string{DockerdRootlessScript, "--storage-driver=vfs", "--exec-opt=native.cgroupdriver=cgroupfs"},
		Log:   log,
		Owner: d.owner,
	})
	deadline := time.Now().Add(90 * time.Second)
	for {
		out, err := d.Run(10*time.Second, "version", "--format", "{{.Server.Version}}")
		if err == nil && strings.TrimSpace(out) != "" {
			return
		}
		select {
		case <-d.tree.Done():
			t.Fatalf("dockerd-rootless.sh exited with status %d before the daemon answered:\n%s", d.tree.Code(), d.tree.Tail(60))
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("rootless dockerd did not answer within 90 s (last: %v %s):\n%s", err, out, d.tree.Tail(60))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// Stop stops the daemon with SIGTERM, as systemd would, and returns the
// script's exit status once dockerd, RootlessKit and everything they
// started are gone.
func (d *Docker) Stop(t testing.TB) int {
	t.Helper()
	return d.tree.Stop(t)
}

// LogLines returns the lines of every log of this daemon (all its starts)
// that begin with one of prefixes.
func (d *Docker) LogLines(prefixes ...string) []string {
	var out []string
	for i := 1; i <= d.starts; i++ {
		b, _ := os.ReadFile(filepath.Join(d.Dir, fmt.Sprintf("dockerd-%d.log", i)))
		for _, line := range strings.Split(string(b), "\n") {
			for _, p := range prefixes {
				if strings.HasPrefix(line, p) {
					out = append(out, line)
					break
				}
			}
		}
	}
	return out
}

// Tail is the end of the current daemon's log.
func (d *Docker) Tail(n int) string { return d.tree.Tail(n) }

// Command prepares the docker client (Debian's 20.10) as the test user.
func (d *Docker) Command(ctx context.Context, args ...string) *exec.Cmd {
	return userCommand(ctx, d.User, d.env, DockerCLI, args...)
}

// Run runs the docker client and returns its stdout; the error carries
// stderr.
func (d *Docker) Run(timeout time.Duration, args ...string) (string, error) {
	return runOutput(timeout, d.Command, "docker", args...)
}

// Must is Run that fails the test on an error.
func (d *Docker) Must(t testing.TB, timeout time.Duration, args ...string) string {
	t.Helper()
	out, err := d.Run(timeout, args...)
	if err != nil {
		t.Fatalf("%v\n--- daemon log:\n%s", err, d.Tail(30))
	}
	return out
}

var (
	rootfsOnce sync.Once
	rootfsTar  []byte
	rootfsErr  error
)

// ImportBusybox makes BusyboxImage offline, with docker import of a
// rootfs built here: nothing is pulled.
func (d *Docker) ImportBusybox(t testing.TB) {
	t.Helper()
	tool := Tool(t)
	rootfsOnce.Do(func() { rootfsTar, rootfsErr = busyboxRootfs(tool) })
	if rootfsErr != nil {
		t.Fatalf("build the image's rootfs: %v", rootfsErr)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := d.Command(ctx, "import", "-", BusyboxImage)
	cmd.Stdin = bytes.NewReader(rootfsTar)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("docker import: %v\n%s", err, out)
	}
}

// busyboxRootfs is a tar of a root filesystem: /bin/busybox (static) and
// its applets, /bin/e2etool, /www for httpd, and the usual directories.
func busyboxRootfs(tool string) ([]byte, error) {
	list, err := exec.Command("/bin/busybox", "--list-full").Output()
	if err != nil {
		return nil, fmt.Errorf("busybox --list-full: %w", err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dirs := map[string]bool{}
	dir := func(name string, mode int64) {
		if !dirs[name] {
			dirs[name] = true
			tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: name + "/", Mode: mode})
		}
	}
	file := func(name, src string) error {
		b, err := os.ReadFile(src)
		if err != nil {
			return err
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o755, Size: int64(len(b))}); err != nil {
			return err
		}
		_, err = tw.Write(b)
		return err
	}
	text := func(name, s string) {
		tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: int64(len(s))})
		tw.Write([]byte(s))
	}
	for _, d := range []string{"bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "root", "proc", "sys", "dev", "run", "www"} {
		dir(d, 0o755)
	}
	dir("tmp", 0o1777)
	if err := file("bin/busybox", "/bin/busybox"); err != nil {
		return nil, err
	}
	if err := file("bin/e2etool", tool); err != nil {
		return nil, err
	}
	text("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
	text("etc/group", "root:x:0:\nnogroup:x:65534:\n")
	for _, applet := range strings.Fields(string(list)) {
		applet = strings.TrimPrefix(applet, "/")
		if applet == "bin/busybox" {
			continue
		}
		dir(filepath.Dir(applet), 0o755)
		tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: applet, Linkname: "/bin/busybox", Mode: 0o777})
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
