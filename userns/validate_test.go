package userns

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestValidateCopyUp(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "f")
	os.WriteFile(file, nil, 0o644)
	tests := []struct {
		dirs    []string
		wantErr string
	}{
		{nil, ""},
		{[]string{"/etc"}, ""},
		{[]string{"/etc", "/run"}, ""},
		{[]string{"etc"}, "must be absolute"},
		{[]string{"/tmp"}, "/tmp is refused"},
		{[]string{"/tmp/"}, "/tmp is refused"},
		{[]string{"/"}, "not possible"},
		{[]string{dir + "/nope"}, "no such file"},
		{[]string{file}, "not a directory"},
		{[]string{"/etc", "/etc/"}, "given twice"},
		{[]string{"/proc"}, "/proc is a kernel filesystem"},
		{[]string{"/sys/fs"}, "/sys is a kernel filesystem"},
		{[]string{"/dev"}, "/dev is a kernel filesystem"},
		{[]string{"/devices"}, "no such file"},
	}
	for _, tt := range tests {
		err := ValidateCopyUp(tt.dirs)
		switch {
		case tt.wantErr == "" && err != nil:
			t.Errorf("%v: unexpected error %v", tt.dirs, err)
		case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
			t.Errorf("%v: error %v, want one containing %q", tt.dirs, err, tt.wantErr)
		}
	}
}

func TestParseReaper(t *testing.T) {
	for in, want := range map[string]bool{"": false, "auto": false, "true": true, "false": false} {
		got, err := ParseReaper(in)
		if err != nil || got != want {
			t.Errorf("ParseReaper(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	if _, err := ParseReaper("yes"); err == nil {
		t.Error("ParseReaper(yes) accepted")
	}
}

func TestDiagnose(t *testing.T) {
	if os.Getuid() == 0 {
		// Diagnose leaves out hints that do not apply to root; the
		// unprivileged cases are checked only when run as a user, the
		// rest always.
		t.Log("running as root: user-only hints are not expected")
	}
	tests := []struct {
		name  string
		files map[string]string // under /proc/sys, or /proc/self for self/...
		err   error
		want  []string
		root  bool // hint applies to root too
	}{
		{"docker default profile", map[string]string{"user/max_user_namespaces": "100", "self/status": "Name:\tgonetns\nSeccomp:\t2\nSeccomp_filters:\t1\n"},
			unix.EPERM, []string{"Seccomp: 2", "--security-opt seccomp=unconfined"}, true},
		{"apparmor profile", map[string]string{"user/max_user_namespaces": "100", "self/status": "Seccomp:\t0\n", "self/attr/current": "docker-default (enforce)\n"},
			errors.New("mount tmpfs on /run: permission denied"), []string{"docker-default (enforce)", "--security-opt apparmor=unconfined"}, true},
		{"seccomp, another error", map[string]string{"user/max_user_namespaces": "100", "self/status": "Seccomp:\t2\n"}, errors.New("something else"), nil, true},
		{"max_user_namespaces=0", map[string]string{"user/max_user_namespaces": "0"}, unix.ENOSPC, []string{"user.max_user_namespaces=28633"}, true},
		{"limit reached", map[string]string{"user/max_user_namespaces": "5"}, unix.ENOSPC, []string{"limit of user namespaces is reached"}, true},
		{"debian knob", map[string]string{"kernel/unprivileged_userns_clone": "0", "user/max_user_namespaces": "100"}, unix.EPERM, []string{"kernel.unprivileged_userns_clone=1"}, false},
		{"ubuntu apparmor", map[string]string{"kernel/apparmor_restrict_unprivileged_userns": "1", "user/max_user_namespaces": "100"}, errors.New("set mount propagation: operation not permitted"), []string{"apparmor_restrict_unprivileged_userns=0", "apparmor_parser"}, false},
		{"plain EPERM", map[string]string{"user/max_user_namespaces": "100"}, unix.EPERM, []string{"seccomp"}, true},
		{"nothing wrong", map[string]string{"user/max_user_namespaces": "100"}, errors.New("something else"), nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir, self := t.TempDir(), t.TempDir()
			for name, v := range tt.files {
				p := filepath.Join(dir, name)
				if rest, ok := strings.CutPrefix(name, "self/"); ok {
					p = filepath.Join(self, rest)
				}
				os.MkdirAll(filepath.Dir(p), 0o755)
				os.WriteFile(p, []byte(v+"\n"), 0o644)
			}
			oldSys, oldSelf := procSys, procSelf
			procSys, procSelf = dir, self
			defer func() { procSys, procSelf = oldSys, oldSelf }()
			got := Diagnose(tt.err)
			if !tt.root && os.Getuid() == 0 {
				if strings.Contains(got, tt.want[0]) {
					t.Errorf("root got a user-only hint: %q", got)
				}
				return
			}
			if tt.want == nil && got != "" {
				t.Errorf("Diagnose = %q, want nothing", got)
			}
			for _, w := range tt.want {
				if !strings.Contains(got, w) {
					t.Errorf("Diagnose = %q, want it to mention %q", got, w)
				}
			}
		})
	}
}

func TestStateDir(t *testing.T) {
	base := t.TempDir()
	path := filepath.Join(base, "state")
	d, err := OpenStateDir(path)
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(path)
	if err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("state dir mode = %v, %v; want 0700", st.Mode(), err)
	}
	if err := d.writeChildPID(1234); err != nil {
		t.Fatal(err)
	}
	_, err = OpenStateDir(path)
	if !errors.Is(err, ErrStateDirBusy) || !strings.Contains(err.Error(), "1234") {
		t.Fatalf("second open: %v, want ErrStateDirBusy naming pid 1234", err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(path, ChildPID)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("child_pid left behind: %v", err)
	}
	d2, err := OpenStateDir(path)
	if err != nil {
		t.Fatalf("reopen after close: %v", err)
	}
	d2.Close()

	t.Setenv("XDG_RUNTIME_DIR", base)
	tmp, err := OpenStateDir("")
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Dir(tmp.Path) != base {
		t.Errorf("temporary state dir %s not under XDG_RUNTIME_DIR %s", tmp.Path, base)
	}
	tmp.Close()
	if _, err := os.Stat(tmp.Path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("temporary state dir not removed: %v", err)
	}
}
