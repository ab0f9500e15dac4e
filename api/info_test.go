package api

import (
	"encoding/json"
	"net/netip"
	"strings"
	"testing"
)

// What a RootlessKit client sees: none of gonetns's own fields.
func TestRootlessKitFields(t *testing.T) {
	on := true
	i := Info{
		NetworkDriver: &NetworkDriverInfo{Driver: "gonetns", ChildIP: netip.MustParseAddr("10.0.2.100"), Link: "packet",
			Egress: &EgressInfo{Default: "allow"}},
		PortDriver: &PortDriverInfo{Driver: "builtin", SourceIPTransparent: &on},
	}
	b, err := json.Marshal(i.RootlessKitFields())
	if err != nil {
		t.Fatal(err)
	}
	for _, field := range []string{"link", "egress", "sourceIPTransparent"} {
		if strings.Contains(string(b), `"`+field+`"`) {
			t.Errorf("RootlessKit's fields include %q: %s", field, b)
		}
	}
	if i.NetworkDriver.Link != "packet" {
		t.Error("RootlessKitFields changed the original")
	}
}
