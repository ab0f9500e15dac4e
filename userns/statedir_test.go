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
