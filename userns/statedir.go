package userns

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Files of the state directory, named as RootlessKit names them.
const (
	LockFile   = "lock"
	ChildPID   = "child_pid"
	APISocket  = "api.sock"
	ResolvConf = "resolv.conf"
	HostsFile  = "hosts"
	// NetNS is a bind mount of the sandbox's network namespace, with
	// --detach-netns; only the child's mount namespace sees the mount.
	NetNS = "netns"
)

// ownFiles are the files a run creates in the state directory, removed
// when it ends (LockFile last).
var ownFiles = []string{ChildPID, APISocket, ResolvConf, HostsFile, NetNS}

// tempPrefix names the state directories gonetns makes when none is given.
const tempPrefix = "gonetns-"

// staleAge is how old the lock file of a default state directory must be
// before a later run may sweep it: a directory just being set up has no
// lock held for an instant, one of a live run has held it since then.
const staleAge = 10 * time.Second

// StateDir is the directory of one running gonetns: a lock held for the
// whole run, child_pid once the namespaces are set up, api.sock, and the
// resolv.conf and hosts files given to the namespace.
type StateDir struct {
	Path      string
	temporary bool
	lock      *os.File
	dir       *os.File // held with a shared flock, as systemd-tmpfiles asks
	// Swept lists default state directories of earlier runs that were
	// removed because their lock was free (their gonetns was killed).
	Swept []string
}

// emptyVarHint explains a state directory right under / that could not be
// made: most likely a variable of its path was empty, as
// --state-dir=$XDG_RUNTIME_DIR/gn is /gn when XDG_RUNTIME_DIR is unset.
func emptyVarHint(abs string, err error) string {
	if filepath.Dir(abs) != "/" || !errors.Is(err, fs.ErrPermission) {
		return ""
	}
	var unset []string
	for _, v := range []string{"XDG_RUNTIME_DIR", "HOME", "TMPDIR"} {
		if os.Getenv(v) == "" {
			unset = append(unset, "$"+v)
		}
	}
	if len(unset) == 0 {
		return ""
	}
	verb := " are"
	if len(unset) == 1 {
		verb = " is"
	}
	return fmt.Sprintf(" (%s is right under /: was a variable in --state-dir empty? %s%s unset or empty here)", abs, strings.Join(unset, ", "), verb)
}

// maxSocketPath is the longest path a unix socket can have (sun_path's
// 108 bytes with the NUL). A longer state directory failed at the API's
// listen with "bind: invalid argument"; under a long $XDG_RUNTIME_DIR
// every run did.
const maxSocketPath = 107

// socketFits reports whether the API socket's path in dir fits.
func socketFits(dir string) bool { return len(filepath.Join(dir, APISocket)) <= maxSocketPath }

// ErrStateDirBusy reports a state directory locked by another gonetns.
var ErrStateDirBusy = errors.New("state directory is in use")

// OpenStateDir creates (mode 0700) and locks the state directory. With an
// empty path it makes a new private directory under $XDG_RUNTIME_DIR, or
// /tmp when that is unset or unusable, removed again by Close.
func OpenStateDir(path string) (*StateDir, error) {
	d := &StateDir{Path: path}
	if path == "" {
		base := os.Getenv("XDG_RUNTIME_DIR")
		if base == "" || unix.Access(base, unix.W_OK|unix.X_OK) != nil || !socketFits(filepath.Join(base, tempPrefix+"1234567890")) {
			base = os.TempDir()
		}
		d.Swept = sweepStale(base)
		p, err := os.MkdirTemp(base, tempPrefix)
		if err != nil {
			return nil, fmt.Errorf("create a state directory under %s: %w (set --state-dir)", base, err)
		}
		d.Path, d.temporary = p, true
	} else {
		abs, err := filepath.Abs(path)
		if err != nil {
			return nil, fmt.Errorf("state directory %q: %w", path, err)
		}
		d.Path = abs
		if !socketFits(abs) {
			return nil, fmt.Errorf("state directory %s is too long for its socket: %s would be %d bytes, and a unix socket's path has at most %d; choose a shorter --state-dir",
				abs, APISocket, len(filepath.Join(abs, APISocket)), maxSocketPath)
		}
		if err := os.MkdirAll(abs, 0o700); err != nil {
			return nil, fmt.Errorf("create state directory: %w%s", err, emptyVarHint(abs, err))
		}
	}
	if err := checkOwnDir(d.Path); err != nil {
		d.removeTemp()
		return nil, err
	}
	if err := os.Chmod(d.Path, 0o700); err != nil {
		d.removeTemp()
		return nil, fmt.Errorf("state directory: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(d.Path, LockFile), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		d.removeTemp()
		return nil, fmt.Errorf("state directory lock: %w", err)
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		d.removeTemp()
		if errors.Is(err, unix.EWOULDBLOCK) {
			who := ""
			if b, err := os.ReadFile(filepath.Join(d.Path, ChildPID)); err == nil {
				who = fmt.Sprintf(" (its namespace's child pid is %s)", strings.TrimSpace(string(b)))
			}
			return nil, fmt.Errorf("%w: %s is locked by another gonetns%s; stop it or choose another --state-dir", ErrStateDirBusy, d.Path, who)
		}
		return nil, fmt.Errorf("lock %s: %w", lock.Name(), err)
	}
	d.lock = lock
	// Leftovers of an earlier run that died without cleaning up.
	for _, name := range ownFiles {
		os.Remove(filepath.Join(d.Path, name))
	}
	// systemd-tmpfiles leaves a directory alone while it is flocked: keep
	// a default one under /tmp from being cleaned away under a long run.
	if dir, err := os.Open(d.Path); err == nil {
		if unix.Flock(int(dir.Fd()), unix.LOCK_SH|unix.LOCK_NB) == nil {
			d.dir = dir
		} else {
			dir.Close()
		}
	}
	return d, nil
}

// sweepStale removes the default state directories under base that
// belong to this user and whose gonetns is gone: their lock file exists,
// is older than staleAge and can be locked. It returns what it removed.
func sweepStale(base string) []string {
	dirs, _ := filepath.Glob(filepath.Join(base, tempPrefix+"*"))
	var swept []string
	for _, dir := range dirs {
		if checkOwnDir(dir) != nil {
			continue
		}
		lockPath := filepath.Join(dir, LockFile)
		fi, err := os.Lstat(lockPath)
		if err != nil || !fi.Mode().IsRegular() || time.Since(fi.ModTime()) < staleAge {
			continue
		}
		f, err := os.OpenFile(lockPath, os.O_RDWR|unix.O_NOFOLLOW, 0)
		if err != nil {
			continue
		}
		if unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) == nil {
			if os.RemoveAll(dir) == nil {
				swept = append(swept, dir)
			}
		}
		f.Close()
	}
	return swept
}

// checkOwnDir refuses a state directory that is a symlink or belongs to
// someone else: gonetns writes sockets and files there and chmods it.
func checkOwnDir(path string) error {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return fmt.Errorf("state directory %s is not a directory (a symlink?): give a real directory with --state-dir", path)
	}
	if int(st.Uid) != os.Getuid() {
		return fmt.Errorf("state directory %s belongs to uid %d, not to you (uid %d): choose another --state-dir", path, st.Uid, os.Getuid())
	}
	return nil
}

// Join returns the path of a file in the state directory.
func (d *StateDir) Join(name string) string { return filepath.Join(d.Path, name) }

// WriteFile writes a file into the state directory atomically (rename).
func (d *StateDir) WriteFile(name string, data []byte, perm os.FileMode) error {
	tmp, err := os.CreateTemp(d.Path, "."+name+".")
	if err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", d.Join(name), err)
	}
	if err := tmp.Chmod(perm); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", d.Join(name), err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", d.Join(name), err)
	}
	if err := os.Rename(tmp.Name(), d.Join(name)); err != nil {
		return fmt.Errorf("write %s: %w", d.Join(name), err)
	}
	return nil
}

// writeChildPID records the child's pid, for nsenter(1) and rootlessctl.
func (d *StateDir) writeChildPID(pid int) error {
	return d.WriteFile(ChildPID, []byte(strconv.Itoa(pid)), 0o644)
}

// Close removes what this run created, the lock included, and the
// directory itself when that leaves it empty (a temporary one is removed
// entirely; in a given one, files of others are kept, and so is the
// directory then). Idempotent.
func (d *StateDir) Close() error {
	if d.lock == nil {
		return nil
	}
	for _, name := range ownFiles {
		os.Remove(d.Join(name))
	}
	// The child's scratch directories: empty (their mounts lived in the
	// child's namespace), but the child may not have been able to remove
	// them once a copy-up hid their path.
	if scratch, err := filepath.Glob(d.Join(scratchPrefix + "*")); err == nil {
		for _, s := range scratch {
			os.Remove(s)
		}
	}
	if d.temporary {
		d.removeTemp()
	} else {
		// The lock goes while it is held, then the directory if it is
		// empty now: RootlessKit leaves no state directory behind, and
		// containerd-rootless.sh refuses to start while one exists.
		os.Remove(d.Join(LockFile))
		os.Remove(d.Path)
	}
	if d.dir != nil {
		d.dir.Close()
		d.dir = nil
	}
	err := d.lock.Close()
	d.lock = nil
	return err
}

// removeTemp removes a temporary state directory and everything in it.
// Not os.RemoveAll(d.Path), which opens the directory's parent to remove
// it from there: a network process confined to the state directory (see
// package confine) may remove the directory from its parent but not read
// that parent.
func (d *StateDir) removeTemp() {
	if !d.temporary {
		return
	}
	if ents, err := os.ReadDir(d.Path); err == nil {
		for _, e := range ents {
			os.RemoveAll(d.Join(e.Name()))
		}
	}
	os.Remove(d.Path)
}
