package userns

import (
	"bufio"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
)

// evacuateCgroup2 moves every process of this process's cgroup v2 group G
// into G/name and enables G's controllers for its subgroups, as
// RootlessKit's --evacuate-cgroup2 does: a group with processes in it
// cannot delegate controllers (the "no internal processes" rule), so the
// command, whose cgroup namespace is rooted at G, could not create groups
// with controllers otherwise. Without cgroup v2 it warns and does nothing.
func evacuateCgroup2(name string, log *slog.Logger) error {
	if err := ValidateCgroupName(name); err != nil {
		return err
	}
	mount, err := cgroup2Mount("/proc/self/mountinfo")
	if err != nil {
		return fmt.Errorf("--evacuate-cgroup2: %w", err)
	}
	if mount == "" {
		log.Warn("--evacuate-cgroup2: no cgroup v2 filesystem is mounted; nothing is evacuated")
		return nil
	}
	group, err := cgroup2Group("/proc/self/cgroup")
	if err != nil {
		return fmt.Errorf("--evacuate-cgroup2: %w", err)
	}
	if group == "" {
		log.Warn("--evacuate-cgroup2: this process is in no cgroup v2 group; nothing is evacuated")
		return nil
	}
	ns, _ := os.Readlink("/proc/self/ns/cgroup")
	if err := checkEvacuable(group, ns); err != nil {
		return err
	}
	oldPath := filepath.Join(mount, group)
	newPath := filepath.Join(oldPath, name)
	if err := os.MkdirAll(newPath, 0o755); err != nil {
		return fmt.Errorf("--evacuate-cgroup2: create %s: %w (the group must be delegated to you, e.g. by systemd's Delegate=yes)", newPath, err)
	}
	procs, err := os.ReadFile(filepath.Join(oldPath, "cgroup.procs"))
	if err != nil {
		return fmt.Errorf("--evacuate-cgroup2: %w", err)
	}
	var moveErrs []error
	for _, pid := range strings.Fields(string(procs)) {
		if err := os.WriteFile(filepath.Join(newPath, "cgroup.procs"), []byte(pid), 0o644); err != nil {
			moveErrs = append(moveErrs, fmt.Errorf("move process %s: %w", pid, err))
		}
	}
	if err := errors.Join(moveErrs...); err != nil {
		log.Warn("--evacuate-cgroup2: some processes could not be moved", "group", newPath, "err", err)
	}
	ctrls, err := os.ReadFile(filepath.Join(oldPath, "cgroup.controllers"))
	if err != nil {
		return fmt.Errorf("--evacuate-cgroup2: %w", err)
	}
	for _, c := range strings.Fields(string(ctrls)) {
		if err := os.WriteFile(filepath.Join(oldPath, "cgroup.subtree_control"), []byte("+"+c), 0o644); err != nil {
			log.Warn("--evacuate-cgroup2: cannot enable a controller for subgroups", "controller", c, "group", oldPath, "err", err)
		}
	}
	log.Debug("evacuated cgroup", "from", oldPath, "to", newPath)
	return nil
}

// initialCgroupNS is the initial cgroup namespace as /proc/PID/ns/cgroup
// names it (the kernel's PROC_CGROUP_INIT_INO).
const initialCgroupNS = "cgroup:[4026531835]"

// checkEvacuable refuses to evacuate the machine's root group: group "/"
// seen from the initial cgroup namespace ns holds every process of the
// machine that no service put elsewhere, PID 1 among them. As root there,
// --evacuate-cgroup2 moved them all (other users' too) into the new
// group and enabled the root's controllers for its subgroups, and left
// it so. Group "/" of a cgroup namespace of its own (a container's) is
// that container's group, which is what the option is for; without
// cgroup namespaces (ns "") "/" is the machine's.
func checkEvacuable(group, ns string) error {
	if group == "/" && (ns == initialCgroupNS || ns == "") {
		return errors.New("--evacuate-cgroup2: gonetns is in the machine's root cgroup, where it would move every process of the machine: run it in a group of its own (systemd-run --user --scope -p Delegate=yes gonetns ..., or as a systemd user service with Delegate=yes)")
	}
	return nil
}

// ValidateCgroupName checks the subgroup name of --evacuate-cgroup2.
func ValidateCgroupName(name string) error {
	if name == "" || strings.ContainsAny(name, "/\x00") || name == "." || name == ".." {
		return fmt.Errorf("invalid --evacuate-cgroup2=%q: give the name of a subgroup, without '/'", name)
	}
	return nil
}

// cgroup2Mount returns the mount point of the cgroup2 filesystem from a
// mountinfo file, "" if there is none (with hybrid cgroups it is e.g.
// /sys/fs/cgroup/unified).
func cgroup2Mount(mountinfo string) (string, error) {
	f, err := os.Open(mountinfo)
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// id parent major:minor root mountpoint options [optional...] - fstype source superoptions
		fields := strings.Fields(sc.Text())
		for i, fld := range fields {
			if fld == "-" && i+1 < len(fields) && fields[i+1] == "cgroup2" && len(fields) > 4 {
				return unescapeMountinfo(fields[4]), nil
			}
		}
	}
	return "", sc.Err()
}

// unescapeMountinfo undoes mountinfo's octal escapes (\040 for a space).
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v byte
			ok := true
			for _, c := range []byte(s[i+1 : i+4]) {
				if c < '0' || c > '7' {
					ok = false
					break
				}
				v = v*8 + c - '0'
			}
			if ok {
				b.WriteByte(v)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// cgroup2Group returns this process's cgroup v2 group ("0::/path" in
// /proc/self/cgroup), "" if it has none.
func cgroup2Group(file string) (string, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return "", err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if g, ok := strings.CutPrefix(l, "0::"); ok {
			return g, nil
		}
	}
	return "", nil
}
