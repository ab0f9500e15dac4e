package layers

import (
	"bufio"
	"bytes"
	"os/exec"
	"strings"
	"testing"
)

const module = "github.com/gonetns/gonetns/"

// layers lists gonetns's packages from the bottom up. A package may import
// packages of lower layers only: not its own layer's, not a higher one's.
var layers = [][]string{
	// Plumbing that knows nothing of gonetns.
	{"internal/rawconn", "internal/sockaddr", "internal/backoff", "internal/limitlog", "internal/netlink", "internal/e2etest/e2etool", "internal/layers", "confine"},
	// Vocabulary and devices: message framing, routes, conntrack, epoll
	// sets, the port vocabulary, the TCP relay, the layer-2 device.
	{"internal/wire", "internal/route", "internal/conntrack", "internal/epoll", "port", "relay", "tap", "internal/e2etest"},
	{"tap/taptest", "veth", "stack/internal/link", "stack/internal/tcpfast", "pcap", "dns", "internal/flowtable"},
	{"stack", "internal/fdbudget"},
	// What the sandbox is made of.
	{"nat", "portfwd", "implicit", "api", "slirpapi", "userns", "stack/stacktest"},
	{"portfwd/portfwdtest", "sandbox"},
	// Programs.
	{"cmd/gonetns", "examples/embed", "bench", "bench/soak"},
}

func TestLayers(t *testing.T) {
	layer := make(map[string]int)
	for i, l := range layers {
		for _, p := range l {
			layer[p] = i
		}
	}
	cmd := exec.Command("go", "list", "-f", "{{.ImportPath}} {{join .Imports \" \"}}", module+"...")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list (needs the go command on PATH): %v\n%s", err, stderr.Bytes())
	}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		pkg := strings.TrimPrefix(fields[0], module)
		l, ok := layer[pkg]
		if !ok {
			t.Errorf("package %s is in no layer: add it to the table in %s", pkg, "internal/layers/layers_test.go")
			continue
		}
		for _, imp := range fields[1:] {
			if !strings.HasPrefix(imp, module) {
				continue
			}
			imp = strings.TrimPrefix(imp, module)
			if il, ok := layer[imp]; ok && il >= l {
				t.Errorf("%s (layer %d) imports %s (layer %d): a package imports only lower layers", pkg, l, imp, il)
			}
		}
	}
}
