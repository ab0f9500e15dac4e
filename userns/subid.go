package userns

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
)

// Range is a block of subordinate ids: Count ids starting at Start on the
// host.
type Range struct {
	Start uint32
	Count uint32
}

// SubIDSource says where subordinate ids come from.
type SubIDSource string

// The sources RootlessKit also accepts.
const (
	// SubIDAuto uses the getsubids command when it is installed and knows
	// the user, the files otherwise.
	SubIDAuto SubIDSource = "auto"
	// SubIDStatic reads /etc/subuid and /etc/subgid.
	SubIDStatic SubIDSource = "static"
	// SubIDDynamic runs getsubids (shadow-utils 4.11+), which asks NSS, so
	// that ranges kept in LDAP or SSSD are found too.
	SubIDDynamic SubIDSource = "dynamic"
)

// ParseSubIDSource validates the --subid-source flag.
func ParseSubIDSource(s string) (SubIDSource, error) {
	switch v := SubIDSource(s); v {
	case SubIDAuto, SubIDStatic, SubIDDynamic:
		return v, nil
	}
	return "", fmt.Errorf("invalid --subid-source %q: use auto, static or dynamic", s)
}

// BadLine is a line of a subordinate id file that could not be used.
type BadLine struct {
	Line   int
	Text   string
	Reason string
}

func (b BadLine) String() string {
	return fmt.Sprintf("line %d %q: %s", b.Line, b.Text, b.Reason)
}

// ParseSubIDs reads a subuid(5)/subgid(5) file and returns the ranges that
// belong to the user, named either by login name or by numeric id, in file
// order. Lines that do not parse are returned in bad (and otherwise
// ignored), so that one broken line does not hide the user's ranges.
func ParseSubIDs(r io.Reader, name string, id int) (ranges []Range, bad []BadLine, err error) {
	idStr := strconv.Itoa(id)
	sc := bufio.NewScanner(r)
	n := 0
	for sc.Scan() {
		n++
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		fields := strings.Split(line, ":")
		if len(fields) != 3 {
			bad = append(bad, BadLine{n, line, "want name:start:count"})
			continue
		}
		owner := strings.TrimSpace(fields[0])
		if owner != name && owner != idStr {
			continue
		}
		start, err1 := strconv.ParseUint(strings.TrimSpace(fields[1]), 10, 32)
		count, err2 := strconv.ParseUint(strings.TrimSpace(fields[2]), 10, 32)
		switch {
		case err1 != nil:
			bad = append(bad, BadLine{n, line, "start is not a number below 2^32"})
			continue
		case err2 != nil:
			bad = append(bad, BadLine{n, line, "count is not a number below 2^32"})
			continue
		case count == 0:
			bad = append(bad, BadLine{n, line, "count is 0"})
			continue
		case start+count-1 > 1<<32-2:
			bad = append(bad, BadLine{n, line, "range runs past the largest id 4294967294"})
			continue
		}
		ranges = append(ranges, Range{Start: uint32(start), Count: uint32(count)})
	}
	if err := sc.Err(); err != nil {
		return nil, bad, err
	}
	return ranges, bad, nil
}

// ParseGetsubids reads the output of getsubids(1): lines such as
// "0: alice 100000 65536".
func ParseGetsubids(out []byte) ([]Range, error) {
	var ranges []Range
	for i, line := range strings.Split(string(out), "\n") {
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		f := strings.Fields(line)
		if len(f) != 4 || !strings.HasSuffix(f[0], ":") {
			return nil, fmt.Errorf("getsubids output line %d %q: want \"N: user start count\"", i+1, line)
		}
		start, err1 := strconv.ParseUint(f[2], 10, 32)
		count, err2 := strconv.ParseUint(f[3], 10, 32)
		if err1 != nil || err2 != nil || count == 0 {
			return nil, fmt.Errorf("getsubids output line %d %q: bad start or count", i+1, line)
		}
		ranges = append(ranges, Range{Start: uint32(start), Count: uint32(count)})
	}
	return ranges, nil
}

// SubIDs are the subordinate ranges of one user, and where they came from.
type SubIDs struct {
	UIDs, GIDs []Range
	// From names the source: "/etc/subuid and /etc/subgid" or "getsubids".
	From string
	// Bad lists unusable lines of the files (static source only).
	Bad []string
}

// subIDFiles are the paths LookupSubIDs reads; tests point them elsewhere.
var subIDFiles = struct{ uid, gid string }{"/etc/subuid", "/etc/subgid"}

// LookupSubIDs finds the subordinate uids and gids of the user.
func LookupSubIDs(src SubIDSource, name string, uid int) (SubIDs, error) {
	if src == SubIDDynamic || src == SubIDAuto {
		ids, err := getsubids(name)
		switch {
		case err == nil:
			return ids, nil
		case src == SubIDDynamic:
			return SubIDs{}, err
		}
		// auto: fall through to the files.
	}
	var ids SubIDs
	ids.From = subIDFiles.uid + " and " + subIDFiles.gid
	var err error
	if ids.UIDs, err = readSubIDFile(subIDFiles.uid, name, uid, &ids.Bad); err != nil {
		return ids, err
	}
	if ids.GIDs, err = readSubIDFile(subIDFiles.gid, name, uid, &ids.Bad); err != nil {
		return ids, err
	}
	return ids, nil
}

func readSubIDFile(path, name string, uid int, badOut *[]string) ([]Range, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read subordinate ids: %w", err)
	}
	defer f.Close()
	ranges, bad, err := ParseSubIDs(f, name, uid)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	for _, b := range bad {
		*badOut = append(*badOut, path+" "+b.String())
	}
	return ranges, nil
}

func getsubids(name string) (SubIDs, error) {
	path, err := exec.LookPath("getsubids")
	if err != nil {
		return SubIDs{}, fmt.Errorf("--subid-source=dynamic needs the getsubids command (shadow-utils 4.11 or later; Debian package uidmap): %w", err)
	}
	run := func(args ...string) ([]Range, error) {
		var stderr bytes.Buffer
		c := exec.Command(path, args...)
		c.Stderr = &stderr
		out, err := c.Output()
		if err != nil {
			return nil, fmt.Errorf("%s %s: %w: %s", path, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
		}
		return ParseGetsubids(out)
	}
	var ids SubIDs
	ids.From = "getsubids"
	var gidErr error
	done := make(chan struct{})
	go func() {
		defer close(done)
		ids.GIDs, gidErr = run("-g", name)
	}()
	ids.UIDs, err = run(name)
	<-done
	if err != nil {
		return ids, err
	}
	return ids, gidErr
}

// MapArgs builds the mapping arguments of newuidmap(1)/newgidmap(1) after
// the pid: the user's own id becomes 0 and the subordinate ranges follow
// from 1 on, contiguously: "0 ID 1 1 S1 C1 1+C1 S2 C2 ...". Ranges that
// would push the namespace's ids past 2^32-2 are cut; the kernel's limit of
// 340 lines is respected.
func MapArgs(id int, ranges []Range) []string {
	const maxLines = 340
	args := []string{"0", strconv.Itoa(id), "1"}
	next := uint64(1)
	for _, r := range ranges {
		if len(args)/3 >= maxLines {
			break
		}
		count := uint64(r.Count)
		if next+count-1 > 1<<32-2 {
			count = 1<<32 - 1 - next
		}
		if count == 0 {
			break
		}
		args = append(args, strconv.FormatUint(next, 10), strconv.FormatUint(uint64(r.Start), 10), strconv.FormatUint(count, 10))
		next += count
	}
	return args
}

// total returns how many ids the ranges hold.
func total(ranges []Range) uint64 {
	var n uint64
	for _, r := range ranges {
		n += uint64(r.Count)
	}
	return n
}
