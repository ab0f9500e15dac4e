package main

import (
	"net/netip"
	"regexp"
	"strings"
	"testing"

	"github.com/gonetns/gonetns/internal/e2etest"
)

// A --cidr that overlaps a network of the host is run, with a warning that
// names the host's interface and a subnet to use instead; that subnet,
// used, draws no warning.
func TestCIDROverlapWarned(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	// A host interface of the test's own: the host's end of a veth pair.
	cn := e2etest.NewClientNetns(t)
	subnet := netip.PrefixFrom(cn.HostIP4, 24).Masked()
	res := r.MustRun(t, quick, "--cidr="+subnet.String(), "true")
	if !strings.Contains(res.Stderr, "--cidr="+subnet.String()+" overlaps the host's network "+subnet.String()+" ("+cn.HostIf+"'s address "+cn.HostIP4.String()+")") {
		t.Fatalf("no warning naming %s for --cidr=%s:\n%s", cn.HostIf, subnet, res)
	}
	m := regexp.MustCompile(`e\.g\. --cidr=(\S+)`).FindStringSubmatch(res.Stderr)
	if m == nil {
		t.Fatalf("the warning suggests no other subnet:\n%s", res.Stderr)
	}
	res = r.MustRun(t, quick, "--cidr="+m[1], "true")
	if strings.Contains(res.Stderr, "overlaps") {
		t.Errorf("the suggested --cidr=%s overlaps too:\n%s", m[1], res)
	}
}
