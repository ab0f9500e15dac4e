package userns

import (
	"errors"
	"io/fs"
	"os"
	"strings"
	"testing"
)

// --state-dir=$XDG_RUNTIME_DIR/gn with the variable empty is /gn: the
// error says so instead of only "mkdir /gn: permission denied".
func TestStateDirEmptyVariableHint(t *testing.T) {
	perm := &os.PathError{Op: "mkdir", Path: "/gn", Err: fs.ErrPermission}
	t.Setenv("XDG_RUNTIME_DIR", "")
	t.Setenv("TMPDIR", "/tmp")
	t.Setenv("HOME", "/root")
	if h := emptyVarHint("/gn", perm); !strings.Contains(h, "was a variable in --state-dir empty? $XDG_RUNTIME_DIR is unset or empty here") {
		t.Errorf("hint %q", h)
	}
	for _, c := range []struct {
		path string
		err  error
	}{
		{"/run/user/1000/gn", perm},                    // not right under /
		{"/gn", errors.New("no space left on device")}, // not a permission problem
	} {
		if h := emptyVarHint(c.path, c.err); h != "" {
			t.Errorf("emptyVarHint(%q, %v) = %q, want none", c.path, c.err, h)
		}
	}
	t.Setenv("XDG_RUNTIME_DIR", "/run/user/1000")
	if h := emptyVarHint("/gn", perm); h != "" {
		t.Errorf("with every variable set: %q, want none", h)
	}
}

// A state directory whose api.sock would not fit a unix socket's path is
// refused up front, with why; under a $XDG_RUNTIME_DIR that long, the
// default one goes under the temporary directory. Both failed at the
// API's listen with "bind: invalid argument".
func TestStateDirSocketPathLength(t *testing.T) {
	long := t.TempDir() + "/" + strings.Repeat("x", maxSocketPath)
	if _, err := OpenStateDir(long); err == nil || !strings.Contains(err.Error(), "too long for its socket") {
		t.Errorf("OpenStateDir of a %d-byte path: %v; want it refused", len(long), err)
	}
	if _, err := os.Stat(long); err == nil {
		t.Errorf("the refused state directory was made")
	}
	xdg := t.TempDir() + "/" + strings.Repeat("z", maxSocketPath-20)
	if err := os.MkdirAll(xdg, 0o700); err != nil {
		t.Fatal(err)
	}
	t.Setenv("XDG_RUNTIME_DIR", xdg)
	d, err := OpenStateDir("")
	if err != nil {
		t.Fatalf("default state directory under a long $XDG_RUNTIME_DIR: %v", err)
	}
	defer d.Close()
	if strings.HasPrefix(d.Path, xdg) || !socketFits(d.Path) {
		t.Errorf("default state directory %s: want it under the temporary directory", d.Path)
	}
}
