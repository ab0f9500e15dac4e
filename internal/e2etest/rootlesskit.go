package e2etest

import (
	"os"
	"path/filepath"
	"sync"
	"testing"
)

// KitEnv selects what the drop-in tests run as RootlessKit:
//
//	unset, "" or "gonetns"  gonetns under RootlessKit's three names (what CI runs)
//	"1.1"                   Debian's RootlessKit package, in /usr/bin
//	"v3"                    RootlessKit v3.0.1, installed by scripts/test-setup.sh in RootlessKitV3Dir
//	a directory             the rootlesskit, rootlessctl and rootlesskit-docker-proxy in it
//
// A reference program missing from the directory comes from /usr/bin.
const KitEnv = "GONETNS_E2E_ROOTLESSKIT"

// RootlessKitV3Dir is where scripts/test-setup.sh installs RootlessKit
// v3.0.1 (go install), the reference the drop-in tests compare with.
const RootlessKitV3Dir = "/usr/local/libexec/gonetns-test/rootlesskit-v3.0.1"

// The names gonetns answers to as a drop-in, and the program each one is.
var kitNames = []string{"rootlesskit", "rootlessctl", "rootlesskit-docker-proxy"}

// Kit is the implementation of RootlessKit under test.
type Kit struct {
	Name    string            // "gonetns", or the reference's directory
	Gonetns bool              // gonetns runs under RootlessKit's names
	Prog    map[string]string // name in kitNames -> the program it runs
}

// SelectedKit returns the implementation KitEnv selects (gonetns by
// default), checking that its programs exist.
func SelectedKit(t testing.TB) Kit {
	t.Helper()
	v := os.Getenv(KitEnv)
	switch v {
	case "", "gonetns":
		return GonetnsKit(t)
	case "1.1":
		v = "/usr/bin"
	case "v3":
		v = RootlessKitV3Dir
	}
	return ReferenceKit(t, v)
}

// GonetnsKit is gonetns under all of RootlessKit's names.
func GonetnsKit(t testing.TB) Kit {
	t.Helper()
	bin := Binary(t)
	k := Kit{Name: "gonetns", Gonetns: true, Prog: map[string]string{}}
	for _, n := range kitNames {
		k.Prog[n] = bin
	}
	return k
}

// ReferenceKit returns RootlessKit's own programs from dir (falling back to
// /usr/bin for the ones dir lacks).
func ReferenceKit(t testing.TB, dir string) Kit {
	t.Helper()
	k := Kit{Name: dir, Prog: map[string]string{}}
	for _, n := range kitNames {
		for _, d := range []string{dir, "/usr/bin"} {
			if p := filepath.Join(d, n); isExecutable(p) {
				k.Prog[n] = p
				break
			}
		}
		if k.Prog[n] == "" {
			t.Fatalf("%s=%s: no %s in %s or /usr/bin: %s", KitEnv, os.Getenv(KitEnv), n, dir, setupHint)
		}
	}
	return k
}

func isExecutable(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular() && st.Mode().Perm()&0o111 != 0
}

// Network helpers RootlessKit runs and gonetns replaces: left out of the
// PATH of a gonetns run, so that a test passes only if gonetns needs none.
var networkHelpers = []string{"slirp4netns", "pasta", "passt", "vpnkit", "lxc-user-nic"}

var (
	pathMu    sync.Mutex
	pathCache = map[string]string{}
)

// ToolPath returns a PATH for the drop-in tests: one directory of symlinks
// to everything in /usr/sbin, /usr/bin, /sbin and /bin, except
// RootlessKit's programs, which point at k's, and (for gonetns) the
// network helpers RootlessKit would run. /usr/local/bin is left out on
// purpose: it may hold an unrelated docker client.
func ToolPath(t testing.TB, k Kit) string {
	t.Helper()
	pathMu.Lock()
	defer pathMu.Unlock()
	if p, ok := pathCache[k.Name]; ok {
		return p
	}
	dir, err := os.MkdirTemp(filepath.Dir(Binary(t)), "path-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	skip := map[string]bool{"docker-rootlesskit": true}
	for _, n := range kitNames {
		skip[n] = true
	}
	if k.Gonetns {
		for _, n := range networkHelpers {
			skip[n] = true
		}
	}
	for _, src := range []string{"/usr/sbin", "/usr/bin", "/sbin", "/bin"} {
		ents, err := os.ReadDir(src)
		if err != nil {
			continue
		}
		for _, e := range ents {
			name := e.Name()
			if skip[name] {
				continue
			}
			err := os.Symlink(filepath.Join(src, name), filepath.Join(dir, name))
			if err != nil && !os.IsExist(err) {
				t.Fatal(err)
			}
		}
	}
	for n, p := range k.Prog {
		if err := os.Symlink(p, filepath.Join(dir, n)); err != nil {
			t.Fatal(err)
		}
	}
	pathCache[k.Name] = dir
	return dir
}
