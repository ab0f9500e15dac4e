package main

import (
	"fmt"
	"strings"
	"testing"

	"github.com/gonetns/gonetns/internal/e2etest"
)

// containerOpts is the smallest set of options that lets gonetns run in a
// container of rootless Docker (docs/packet-link.md): Docker's default
// seccomp profile refuses the system calls that make namespaces. Rootless
// Docker applies no AppArmor profile; its masked paths only keep gonetns
// from mounting a sysfs of the sandbox's own (a warning).
var containerOpts = []string{"--security-opt", "seccomp=unconfined"}

// TestInsideDockerContainer runs gonetns inside a container of rootless
// Docker started with no --device /dev/net/tun, the case no peer covers:
// with Docker's default profile it stops and names what is missing; with
// containerOpts it makes a sandbox of its own on the packet link and
// fetches a page from a server on the host, through its own network and
// then Docker's (gonetns as rootlesskit).
func TestInsideDockerContainer(t *testing.T) {
	host := startHostHTTP(t)
	d := e2etest.NewDocker(t, e2etest.DockerConfig{Kit: e2etest.GonetnsKit(t), Flags: []string{"--disable-host-loopback=false"}})
	d.Start(t)
	d.ImportBusybox(t)
	// Inside, gonetns's subnet must not be Docker's sandbox's: 10.0.2.2 is
	// then the host's loopback two networks out, not gonetns's own gateway.
	run := func(opts []string, flags ...string) (string, error) {
		args := append([]string{"run", "--rm", "-v", e2etest.Binary(t) + ":/gonetns:ro"}, opts...)
		args = append(append(args, e2etest.BusyboxImage, "/gonetns", "--cidr=10.0.3.0/24"), flags...)
		args = append(args, "sh", "-c",
			fmt.Sprintf("test -e /dev/net/tun || echo no-tun; wget -q -O- http://10.0.2.2:%d/ && /gonetns ctl info --json | tr -d ' \\n'", host.port))
		return d.Run(dockerTimeout, args...)
	}
	out, err := run(nil)
	if err == nil || !strings.Contains(err.Error(), "exit status 125") || !strings.Contains(err.Error(), "seccomp filter") ||
		!strings.Contains(err.Error(), "--security-opt seccomp=unconfined") {
		t.Errorf("with Docker's default profile: want gonetns to stop (125) naming the seccomp filter and the option that lifts it:\n%s\n%v", out, err)
	}
	// With a PID namespace too: the masked paths keep gonetns from
	// mounting a /proc of its own, which it says and goes on without.
	for _, flags := range [][]string{nil, {"--pidns"}} {
		out, err = run(containerOpts, flags...)
		if err != nil || !strings.HasPrefix(out, "no-tun\nhello from the host\n") || !strings.Contains(out, `"link":"packet"`) {
			t.Errorf("with %s, gonetns %s: want the host's page through the packet link:\n%s\n%v", strings.Join(containerOpts, " "), strings.Join(flags, " "), out, err)
		}
	}
}
