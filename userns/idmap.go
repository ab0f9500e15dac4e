package userns

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// minSubIDs is the number of subordinate ids most container images expect
// (uids up to 65534, "nobody", must exist).
const minSubIDs = 65536

// MapResult says which mapping was installed for the child.
type MapResult struct {
	// Full is true when the subordinate ranges are mapped (or, as root,
	// the whole id space); false for the single mapping 0 -> own id.
	Full bool
	// UIDMap and GIDMap are the lines written, as in /proc/PID/uid_map.
	UIDMap, GIDMap string
	// Warnings are for the person running gonetns: printed once.
	Warnings []string
}

// idMapper installs the uid and gid maps of a freshly cloned child.
type idMapper struct {
	uid, gid int
	user     string
	src      SubIDSource
	log      *slog.Logger
}

// mapPlan is what mapIDs will write, worked out before the child exists:
// looking up subordinate ids (possibly running getsubids) needs no pid.
type mapPlan struct {
	root               bool   // uid 0: map what this namespace has, one to one
	rootUIDs, rootGIDs string // the lines for root (identity over our own extents)
	denySetgroups      bool   // our namespace denies setgroups, so must the child's
	uidArgs, gidArgs   []string
	newuidmap          string // helpers; empty when falling back
	newgidmap          string
	fallbackReason     string // why only the single mapping, or ""
	warnings           []string
}

// plan looks up the subordinate ids and the helpers.
func (m *idMapper) plan() mapPlan {
	if m.uid == 0 {
		return rootPlan()
	}
	var p mapPlan
	ids, lookupErr := LookupSubIDs(m.src, m.user, m.uid)
	for _, b := range ids.Bad {
		m.log.Debug("ignoring unusable subordinate id line", "line", b)
	}
	newuidmap, uidHelperErr := findIDHelper("newuidmap")
	newgidmap, gidHelperErr := findIDHelper("newgidmap")
	switch {
	case lookupErr != nil:
		p.fallbackReason = lookupErr.Error()
	case len(ids.UIDs) == 0 || len(ids.GIDs) == 0:
		start := freeSubIDStart("/etc/subuid", "/etc/subgid")
		p.fallbackReason = fmt.Sprintf("user %s has no subordinate ids in %s. "+
			"To map 65536 ids, run as root: usermod --add-subuids %[3]d-%[4]d --add-subgids %[3]d-%[4]d %[1]s "+
			"(above every range /etc/subuid and /etc/subgid give now)", m.user, ids.From, start, start+65535)
	case uidHelperErr != nil:
		p.fallbackReason = uidHelperErr.Error()
	case gidHelperErr != nil:
		p.fallbackReason = gidHelperErr.Error()
	}
	if p.fallbackReason != "" {
		return p
	}
	for _, kind := range []struct {
		name   string
		ranges []Range
	}{{"subuid", ids.UIDs}, {"subgid", ids.GIDs}} {
		if n := total(kind.ranges); n < minSubIDs {
			p.warnings = append(p.warnings, fmt.Sprintf("user %s has only %d %s ids in %s; "+
				"images that use ids up to 65534 (nobody) need at least %d", m.user, n, kind.name, ids.From, minSubIDs))
		}
	}
	p.uidArgs, p.gidArgs = MapArgs(m.uid, ids.UIDs), MapArgs(m.gid, ids.GIDs)
	p.newuidmap, p.newgidmap = newuidmap, newgidmap
	return p
}

// mapIDs writes /proc/PID/{uid,gid}_map as planned. As root the whole id
// space is mapped one to one. Otherwise the subordinate ranges are mapped
// with the setuid helpers newuidmap/newgidmap (run side by side); when there
// are no ranges or no helpers, or a helper fails, it falls back to mapping
// only the user's own ids (what `unshare -r` does) and explains in a
// warning what to install or add.
func (m *idMapper) mapIDs(pid int, p mapPlan) (MapResult, error) {
	if p.root {
		if err := writeMap(pid, "uid_map", p.rootUIDs); err != nil {
			return MapResult{}, err
		}
		if p.denySetgroups {
			if err := os.WriteFile(fmt.Sprintf("/proc/%d/setgroups", pid), []byte("deny"), 0); err != nil {
				return MapResult{}, fmt.Errorf("deny setgroups like our own namespace does: %w", err)
			}
		}
		if err := writeMap(pid, "gid_map", p.rootGIDs); err != nil {
			return MapResult{}, err
		}
		return MapResult{Full: true, UIDMap: p.rootUIDs, GIDMap: p.rootGIDs}, nil
	}
	warnings := p.warnings
	reason := p.fallbackReason
	if reason == "" {
		gidErr := make(chan error, 1)
		go func() { gidErr <- runIDHelper(p.newgidmap, pid, p.gidArgs) }()
		uerr := runIDHelper(p.newuidmap, pid, p.uidArgs)
		gerr := <-gidErr
		switch {
		case uerr == nil && gerr == nil:
			return MapResult{Full: true, UIDMap: mapLines(p.uidArgs), GIDMap: mapLines(p.gidArgs), Warnings: warnings}, nil
		case uerr == nil:
			// The uid map is in place and cannot be rewritten; give the
			// gids the single mapping.
			warnings = append(warnings, fmt.Sprintf("%v; mapping only gid %d to 0", gerr, m.gid))
			if err := writeSingleGID(pid, m.gid); err != nil {
				return MapResult{}, err
			}
			return MapResult{Full: false, UIDMap: mapLines(p.uidArgs), GIDMap: fmt.Sprintf("0 %d 1", m.gid), Warnings: warnings}, nil
		case gerr == nil:
			warnings = append(warnings, fmt.Sprintf("%v; mapping only uid %d to 0", uerr, m.uid))
			single := fmt.Sprintf("0 %d 1", m.uid)
			if err := writeMap(pid, "uid_map", single); err != nil {
				return MapResult{}, err
			}
			return MapResult{Full: false, UIDMap: single, GIDMap: mapLines(p.gidArgs), Warnings: warnings}, nil
		}
		reason = uerr.Error()
	}

	warnings = append(warnings, "only uid "+fmt.Sprint(m.uid)+" and gid "+fmt.Sprint(m.gid)+
		" are mapped (to 0) because "+reason+". Inside, chown to other ids and programs that switch users (apt, su, sshd) will fail.")
	if err := writeSingleGID(pid, m.gid); err != nil {
		return MapResult{}, err
	}
	single := fmt.Sprintf("0 %d 1", m.uid)
	if err := writeMap(pid, "uid_map", single); err != nil {
		return MapResult{}, err
	}
	return MapResult{Full: false, UIDMap: single, GIDMap: fmt.Sprintf("0 %d 1", m.gid), Warnings: warnings}, nil
}

// selfMaps is where rootPlan reads the namespace's own maps; tests point
// it elsewhere.
var selfMaps = "/proc/self"

// rootPlan maps, for uid 0, every id of gonetns's own user namespace to
// itself: the whole id space on the host, and inside another sandbox
// (gonetns in gonetns, or in a rootless container) just the ids that
// sandbox has, which is all uid 0 there may map.
func rootPlan() mapPlan {
	p := mapPlan{root: true}
	p.rootUIDs = identityMap(selfMaps + "/uid_map")
	p.rootGIDs = identityMap(selfMaps + "/gid_map")
	if b, err := os.ReadFile(selfMaps + "/setgroups"); err == nil && strings.TrimSpace(string(b)) == "deny" {
		p.denySetgroups = true
	}
	return p
}

// identityMap turns the extents of a uid_map/gid_map file into lines that
// map the same ids to themselves one level down.
func identityMap(path string) string {
	const all = "0 0 4294967295"
	b, err := os.ReadFile(path)
	if err != nil {
		return all
	}
	var lines []string
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f := strings.Fields(l)
		if len(f) != 3 {
			continue
		}
		lines = append(lines, f[0]+" "+f[0]+" "+f[2])
	}
	if len(lines) == 0 {
		return all
	}
	return strings.Join(lines, "\n")
}

// writeSingleGID maps the user's own gid; an unprivileged writer must deny
// setgroups(2) first (user_namespaces(7)).
func writeSingleGID(pid, gid int) error {
	if err := os.WriteFile(fmt.Sprintf("/proc/%d/setgroups", pid), []byte("deny"), 0); err != nil {
		return fmt.Errorf("deny setgroups for the single gid mapping: %w", err)
	}
	return writeMap(pid, "gid_map", fmt.Sprintf("0 %d 1", gid))
}

func writeMap(pid int, file, content string) error {
	path := fmt.Sprintf("/proc/%d/%s", pid, file)
	if err := os.WriteFile(path, []byte(content+"\n"), 0); err != nil {
		return fmt.Errorf("write %s %q: %w", path, content, err)
	}
	return nil
}

func mapLines(args []string) string {
	var b strings.Builder
	for i := 0; i+2 < len(args); i += 3 {
		if i > 0 {
			b.WriteByte('\n')
		}
		b.WriteString(args[i] + " " + args[i+1] + " " + args[i+2])
	}
	return b.String()
}

// freeSubIDStart is where a new user's 65536 subordinate ids can start
// without overlapping the ranges of files (name:start:count lines):
// 100000, as useradd starts, or past the last range, on a multiple of
// 65536. The advice of a fixed 100000-165535 overlapped the first user's.
func freeSubIDStart(files ...string) uint64 {
	end := uint64(100000)
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			fields := strings.Split(strings.TrimSpace(line), ":")
			if len(fields) != 3 {
				continue
			}
			start, err1 := strconv.ParseUint(fields[1], 10, 32)
			count, err2 := strconv.ParseUint(fields[2], 10, 32)
			if err1 == nil && err2 == nil && start+count > end {
				end = start + count
			}
		}
	}
	if end == 100000 {
		return end
	}
	return (end + 65535) / 65536 * 65536
}

// errNoIDHelper marks a missing or unusable newuidmap/newgidmap.
var errNoIDHelper = errors.New("id mapping helper unusable")

// findIDHelper locates newuidmap/newgidmap and checks that it can do its
// job: it must be setuid root or carry file capabilities (Fedora ships
// them with cap_setuid/cap_setgid instead of the setuid bit).
func findIDHelper(name string) (string, error) {
	path, err := exec.LookPath(name)
	if err != nil {
		// Not in $PATH (env -i, a service's short PATH): the system's
		// directories, where the package puts it. gonetns mapped one id
		// and said the helper was not installed.
		path, err = lookPath(name, []string{"PATH=" + defaultPath})
	}
	if err != nil {
		return "", fmt.Errorf("%w: %s is not in $PATH or %s (install the uidmap package: sudo apt-get install uidmap, or shadow-utils on Fedora)", errNoIDHelper, name, defaultPath)
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return "", fmt.Errorf("%w: stat %s: %v", errNoIDHelper, path, err)
	}
	setuidRoot := st.Mode&unix.S_ISUID != 0 && st.Uid == 0
	if !setuidRoot && !hasFileCaps(path) {
		return "", fmt.Errorf("%w: %s is neither setuid root nor has file capabilities (fix: sudo chmod u+s %s, or sudo setcap cap_setuid,cap_setgid+ep %s)", errNoIDHelper, path, path, path)
	}
	return path, nil
}

func hasFileCaps(path string) bool {
	sz, err := unix.Getxattr(path, "security.capability", nil)
	return err == nil && sz > 0
}

func runIDHelper(path string, pid int, mapArgs []string) error {
	args := append([]string{fmt.Sprint(pid)}, mapArgs...)
	var out bytes.Buffer
	c := exec.Command(path, args...)
	c.Stdout = &out
	c.Stderr = &out
	if err := c.Run(); err != nil {
		return fmt.Errorf("%s %s failed: %w: %s", path, strings.Join(args, " "), err, strings.TrimSpace(out.String()))
	}
	return nil
}
