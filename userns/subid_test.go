package userns

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestParseSubIDs(t *testing.T) {
	const file = `# comment line
alice:100000:65536

  bob:165536:65536
1000:300000:1000
alice:400000:10
alice:notanumber:5
alice:5
alice:500000:0
alice:4294967000:1000
carol:600000:65536
`
	tests := []struct {
		name     string
		user     string
		uid      int
		want     []Range
		wantBad  int // a line without three fields is bad whoever it names
		badMatch string
	}{
		{"by name, several ranges", "alice", 2000, []Range{{100000, 65536}, {400000, 10}}, 4, "count is 0"},
		{"by uid", "nobody-here", 1000, []Range{{300000, 1000}}, 1, "want name:start:count"},
		{"by name and by uid", "alice", 1000, []Range{{100000, 65536}, {300000, 1000}, {400000, 10}}, 4, "want name:start:count"},
		{"leading space in name", "bob", 1, []Range{{165536, 65536}}, 1, ""},
		{"no entry", "dave", 4242, nil, 1, ""},
		{"last entry", "carol", 3, []Range{{600000, 65536}}, 1, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, bad, err := ParseSubIDs(strings.NewReader(file), tt.user, tt.uid)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("ranges = %v, want %v", got, tt.want)
			}
			if len(bad) != tt.wantBad {
				t.Errorf("bad lines = %v, want %d of them", bad, tt.wantBad)
			}
			if tt.badMatch != "" {
				found := false
				for _, b := range bad {
					if strings.Contains(b.String(), tt.badMatch) {
						found = true
					}
				}
				if !found {
					t.Errorf("no bad line mentions %q: %v", tt.badMatch, bad)
				}
			}
		})
	}
}

func TestParseGetsubids(t *testing.T) {
	tests := []struct {
		in      string
		want    []Range
		wantErr bool
	}{
		{"0: alice 100000 65536\n", []Range{{100000, 65536}}, false},
		{"0: alice 100000 65536\n1: alice 200000 10\n", []Range{{100000, 65536}, {200000, 10}}, false},
		{"", nil, false},
		{"Error fetching ranges\n", nil, true},
		{"0: alice x 65536\n", nil, true},
		{"0: alice 1 0\n", nil, true},
	}
	for _, tt := range tests {
		got, err := ParseGetsubids([]byte(tt.in))
		if (err != nil) != tt.wantErr {
			t.Errorf("ParseGetsubids(%q) error = %v, want error %v", tt.in, err, tt.wantErr)
			continue
		}
		if !reflect.DeepEqual(got, tt.want) {
			t.Errorf("ParseGetsubids(%q) = %v, want %v", tt.in, got, tt.want)
		}
	}
}

func TestMapArgs(t *testing.T) {
	tests := []struct {
		name   string
		id     int
		ranges []Range
		want   string
	}{
		{"none", 1000, nil, "0 1000 1"},
		{"one range", 1000, []Range{{100000, 65536}}, "0 1000 1 1 100000 65536"},
		{"two ranges contiguous inside", 1000, []Range{{100000, 65536}, {300000, 10}}, "0 1000 1 1 100000 65536 65537 300000 10"},
		{"capped at 2^32-2", 1000, []Range{{1, 4294967295}}, "0 1000 1 1 1 4294967294"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := strings.Join(MapArgs(tt.id, tt.ranges), " "); got != tt.want {
				t.Errorf("MapArgs = %q, want %q", got, tt.want)
			}
		})
	}
	many := make([]Range, 400)
	for i := range many {
		many[i] = Range{uint32(100000 + 10*i), 10}
	}
	if lines := len(MapArgs(1, many)) / 3; lines != 340 {
		t.Errorf("400 ranges gave %d map lines, want the kernel's limit 340", lines)
	}
}

func TestMapLines(t *testing.T) {
	got := mapLines([]string{"0", "1000", "1", "1", "100000", "65536"})
	if got != "0 1000 1\n1 100000 65536" {
		t.Errorf("mapLines = %q", got)
	}
}

func TestLookupSubIDsStatic(t *testing.T) {
	dir := t.TempDir()
	uidFile := filepath.Join(dir, "subuid")
	gidFile := filepath.Join(dir, "subgid")
	os.WriteFile(uidFile, []byte("alice:100000:65536\nbroken\n"), 0o644)
	os.WriteFile(gidFile, []byte("alice:200000:65536\n"), 0o644)
	old := subIDFiles
	subIDFiles.uid, subIDFiles.gid = uidFile, gidFile
	t.Cleanup(func() { subIDFiles = old })

	ids, err := LookupSubIDs(SubIDStatic, "alice", 1000)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(ids.UIDs, []Range{{100000, 65536}}) || !reflect.DeepEqual(ids.GIDs, []Range{{200000, 65536}}) {
		t.Errorf("got %+v", ids)
	}
	if len(ids.Bad) != 1 || !strings.Contains(ids.Bad[0], uidFile) {
		t.Errorf("bad lines = %v, want one naming %s", ids.Bad, uidFile)
	}
	subIDFiles.uid = filepath.Join(dir, "missing")
	ids, err = LookupSubIDs(SubIDStatic, "alice", 1000)
	if err != nil || len(ids.UIDs) != 0 {
		t.Errorf("missing file: ids=%+v err=%v, want no ranges and no error", ids, err)
	}
}

func TestParseSubIDSource(t *testing.T) {
	for _, s := range []string{"auto", "static", "dynamic"} {
		if _, err := ParseSubIDSource(s); err != nil {
			t.Errorf("%s: %v", s, err)
		}
	}
	if _, err := ParseSubIDSource("ldap"); err == nil || !strings.Contains(err.Error(), "auto, static or dynamic") {
		t.Errorf("ldap: err = %v", err)
	}
}

func TestRootPlan(t *testing.T) {
	dir := t.TempDir()
	old := selfMaps
	selfMaps = dir
	t.Cleanup(func() { selfMaps = old })
	write := func(name, s string) { os.WriteFile(filepath.Join(dir, name), []byte(s), 0o644) }

	// On the host: the whole id space.
	write("uid_map", "         0          0 4294967295\n")
	write("gid_map", "         0          0 4294967295\n")
	write("setgroups", "allow\n")
	p := rootPlan()
	if p.rootUIDs != "0 0 4294967295" || p.rootGIDs != "0 0 4294967295" || p.denySetgroups {
		t.Errorf("host root plan = %+v", p)
	}
	// Inside a sandbox with subordinate ids: those ids, to themselves.
	write("uid_map", "         0       1001          1\n         1     100000      65536\n")
	write("gid_map", "         0       1001          1\n")
	write("setgroups", "deny\n")
	p = rootPlan()
	if p.rootUIDs != "0 0 1\n1 1 65536" || p.rootGIDs != "0 0 1" || !p.denySetgroups {
		t.Errorf("nested root plan = %+v", p)
	}
}

// The advice for a user with no subordinate ids names a range no line of
// the files has.
func TestFreeSubIDStart(t *testing.T) {
	dir := t.TempDir()
	write := func(name, s string) string {
		p := dir + "/" + name
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	for _, tc := range []struct {
		uid, gid string
		want     uint64
	}{
		{"", "", 100000},
		{"alice:100000:65536\n", "alice:100000:65536\n", 196608},
		{"alice:100000:65536\nbob:165536:65536\n", "alice:100000:65536\n", 262144},
		{"# comment\nbad line\nalice:1000:10\n", "", 100000},
		{"alice:100000:65536\n", "carol:300000:1000\n", 327680},
	} {
		if got := freeSubIDStart(write("subuid", tc.uid), write("subgid", tc.gid), dir+"/missing"); got != tc.want {
			t.Errorf("subuid %q subgid %q: %d, want %d", tc.uid, tc.gid, got, tc.want)
		}
	}
}
