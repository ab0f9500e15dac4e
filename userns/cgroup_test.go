package userns

import (
	"strings"
	"testing"
)

// The machine's root group is never evacuated; a container's (group "/"
// of a cgroup namespace of its own) and any group below the root are.
func TestCheckEvacuable(t *testing.T) {
	for _, tc := range []struct {
		group, ns string
		refused   bool
	}{
		{"/", initialCgroupNS, true},
		{"/", "cgroup:[4026532731]", false},
		{"/user.slice/user-1000.slice/session-3.scope", initialCgroupNS, false},
		{"/docker/abc", "cgroup:[4026532731]", false},
		{"/", "", true}, // no cgroup namespaces: "/" is the machine's
	} {
		err := checkEvacuable(tc.group, tc.ns)
		if (err != nil) != tc.refused || err != nil && !strings.Contains(err.Error(), "root cgroup") {
			t.Errorf("group %s in %q: %v; refused %v wanted", tc.group, tc.ns, err, tc.refused)
		}
	}
}
