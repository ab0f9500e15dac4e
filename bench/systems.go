package main

import (
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
)

// Where a system's client reaches the host's 127.0.0.1 from inside.
const (
	targetSlirp   = "10.0.2.2" // gonetns and slirp4netns: the gateway of 10.0.2.0/24
	targetGateway = "gateway"  // the namespace's default gateway (pasta maps it to the host's loopback)
	targetHost    = "127.0.0.1"
)

// childPort is the port the iperf3 server listens on inside a namespace
// for the published-port measurements.
const childPort = 5201

// system is one way of running a command with a network: gonetns, a peer,
// or the host itself (the reference: no namespace at all). The systems of
// the published-port table publish a host port into the namespace.
type system struct {
	name  string // key in BENCH_SYSTEMS, the JSON and the chart
	label string // column header
	ref   bool   // the host-loopback reference
	port  bool   // a published-port system
	optIn bool   // runs only when BENCH_SYSTEMS names it
	// argv wraps cmd, the command to run inside, for the given MTU and
	// (port systems) the host port to publish on 127.0.0.1.
	argv func(mtu, hostPort int, cmd []string) []string
	// netProc finds the process that moves the packets, given the pid
	// the harness started; nil for the reference.
	netProc func(pid int) (int, error)
	netName string // what netProc finds, for the report
	target  string // see the target constants

	// Filled in by probeSystems.
	available bool
	reason    string // why it is not available, or why it failed to start
	install   string // how to install it, when it is missing
	version   string
}

// paths of the tools; empty when not installed. rootlesskit is the
// system's (Debian 12: 1.1, with slirp4netns); rootlesskit3 is RootlessKit
// v3, installed by the benchmark's setup into a tools directory of its own
// (never over the system's), for its gvisor-tap-vsock network driver.
type tools struct {
	gonetns, rootlesskit, rootlesskit3, slirp4netns, pasta, iperf3 string
}

func findTools(gonetns, rootlesskit3 string) tools {
	look := func(name string) string {
		p, err := exec.LookPath(name)
		if err != nil {
			return ""
		}
		return p
	}
	if st, err := os.Stat(rootlesskit3); err != nil || st.IsDir() || st.Mode()&0o111 == 0 {
		rootlesskit3 = ""
	}
	return tools{
		gonetns:      gonetns,
		rootlesskit3: rootlesskit3,
		rootlesskit:  look("rootlesskit"),
		slirp4netns:  look("slirp4netns"),
		pasta:        look("pasta"),
		iperf3:       look("iperf3"),
	}
}

// Install lines for a missing peer (Debian package names).
const (
	aptRootlessKit = "sudo apt-get install -y rootlesskit slirp4netns"
	aptPasta       = "sudo apt-get install -y passt"
	aptIperf3      = "sudo apt-get install -y iperf3"
	// RootlessKit v3 comes from the Go module proxy, into the tools
	// directory the harness looks in (BENCH_ROOTLESSKIT3).
	installRootlessKit3 = "make bench-tools (GOBIN=$PWD/bin/tools go install " + rootlessKit3Module + ")"
	rootlessKit3Module  = "github.com/rootless-containers/rootlesskit/v3/cmd/rootlesskit@v3.0.1"
)

// self is the process we started.
func self(pid int) (int, error) { return pid, nil }

// slirpChild is the slirp4netns process RootlessKit starts as its child.
func slirpChild(pid int) (int, error) {
	if p, ok := childNamed(pid, "slirp4netns"); ok {
		return p, nil
	}
	return 0, fmt.Errorf("no slirp4netns child of rootlesskit (pid %d)", pid)
}

// allSystems lists every system in table order: gonetns first, then the
// peers, then the reference; then the published-port systems.
func allSystems(t tools, euid int) []*system {
	gonetnsWith := func(flags ...string) func(mtu, hostPort int, cmd []string) []string {
		return func(mtu, hostPort int, cmd []string) []string {
			a := append([]string{t.gonetns, "--mtu=" + strconv.Itoa(mtu)}, flags...)
			if hostPort != 0 {
				a = append(a, "-p", publishSpec(hostPort))
			}
			return append(a, cmd...)
		}
	}
	gonetns := gonetnsWith()
	rootlesskit := func(bin, net, portDriver string) func(mtu, hostPort int, cmd []string) []string {
		return func(mtu, hostPort int, cmd []string) []string {
			a := []string{bin, "--net=" + net, "--mtu=" + strconv.Itoa(mtu)}
			if portDriver != "" {
				a = append(a, "--port-driver="+portDriver, "-p", publishSpec(hostPort))
			}
			return append(a, cmd...)
		}
	}
	pasta := func(mtu, hostPort int, cmd []string) []string {
		// -f: stay in the foreground, so the process we start is the one
		// that moves the packets. No automatic port forwarding in either
		// direction (-t/-u/-T/-U auto are the defaults): it would bind
		// host ports and scan /proc every second.
		a := []string{t.pasta, "--config-net", "-m", strconv.Itoa(mtu), "-f", "-q", "-u", "none", "-T", "none", "-U", "none"}
		if hostPort != 0 {
			a = append(a, "-t", "127.0.0.1/"+strconv.Itoa(hostPort)+":"+strconv.Itoa(childPort))
		} else {
			a = append(a, "-t", "none")
		}
		if euid == 0 {
			// As root pasta drops to "nobody" by default, which cannot
			// set up the namespace's id map here; keep root.
			a = append(a, "--runas", "0")
		}
		return append(append(a, "--"), cmd...)
	}
	host := func(_, _ int, cmd []string) []string { return cmd }
	return []*system{
		{name: "gonetns", label: "gonetns", argv: gonetns, netProc: self, netName: "gonetns (parent)", target: targetSlirp},
		// The same network on the packet link (a veth pair read through
		// AF_PACKET sockets), which gonetns takes where /dev/net/tun
		// cannot be opened.
		{name: "gonetns-packet", label: "gonetns --link=packet", argv: gonetnsWith("--link=packet"), netProc: self, netName: "gonetns (parent)", target: targetSlirp},
		// TCP through the netstack's own TCP instead of the fast path:
		// what the fast path changes.
		{name: "gonetns-netstack", label: "gonetns --tcp-fast-path=false", argv: gonetnsWith("--tcp-fast-path=false"), netProc: self, netName: "gonetns (parent)", target: targetSlirp},
		{name: "slirp4netns", label: "rootlesskit + slirp4netns", argv: rootlesskit(t.rootlesskit, "slirp4netns", ""), netProc: slirpChild, netName: "slirp4netns", target: targetSlirp},
		{name: "pasta", label: "pasta", argv: pasta, netProc: self, netName: "pasta", target: targetGateway},
		// RootlessKit v3's gVisor network runs in its parent process; its
		// gateway (10.0.2.1) is the host's loopback.
		{name: "gvisor-tap-vsock", label: "rootlesskit v3 gvisor-tap-vsock", argv: rootlesskit(t.rootlesskit3, "gvisor-tap-vsock", ""), netProc: self, netName: "rootlesskit (parent)", target: targetGateway},
		{name: "host", label: "host loopback (no namespace)", ref: true, argv: host, target: targetHost},
		// Without the event loop (the TAP and the host sockets read on
		// goroutines in Go's poller): beside gonetns, what the loop changes.
		{name: "gonetns-noloop", label: "gonetns --event-loop=false", optIn: true, argv: gonetnsWith("--event-loop=false"), netProc: self, netName: "gonetns (parent)", target: targetSlirp},
		// The event loop never polling between events (--busy-poll=0;
		// the default, auto, polls where idle CPUs halt at once): what
		// polling takes off a round trip there, and what it costs in CPU.
		{name: "gonetns-nopoll", label: "gonetns --busy-poll=0", optIn: true, argv: gonetnsWith("--busy-poll=0"), netProc: self, netName: "gonetns (parent)", target: targetSlirp},
		// gonetns whose network process does not confine itself: beside
		// gonetns, what Landlock and the seccomp filter cost.
		{name: "gonetns-unconfined", label: "gonetns --confine-network-process=false", optIn: true, argv: gonetnsWith("--confine-network-process=false"), netProc: self, netName: "gonetns (parent)", target: targetSlirp},

		{name: "gonetns-port", label: "gonetns -p", port: true, argv: gonetns, netProc: self, netName: "gonetns (parent)"},
		{name: "rootlesskit-builtin", label: "rootlesskit builtin", port: true, argv: rootlesskit(t.rootlesskit, "slirp4netns", "builtin"), netProc: self, netName: "rootlesskit (parent)"},
		{name: "rootlesskit-slirp4netns", label: "rootlesskit slirp4netns driver", port: true, argv: rootlesskit(t.rootlesskit, "slirp4netns", "slirp4netns"), netProc: slirpChild, netName: "slirp4netns"},
		{name: "pasta-port", label: "pasta -t", port: true, argv: pasta, netProc: self, netName: "pasta"},
	}
}

func publishSpec(hostPort int) string {
	return fmt.Sprintf("127.0.0.1:%d:%d/tcp", hostPort, childPort)
}

func systemNames() []string {
	var names []string
	for _, s := range allSystems(tools{}, 1) {
		names = append(names, s.name)
	}
	return names
}

func knownSystem(name string) bool { return slices.Contains(systemNames(), name) }

// probeSystems decides which systems can run here, without running them:
// installed tools, RootlessKit's network drivers. Versions come from
// machine facts.
func probeSystems(systems []*system, t tools, v versions) {
	rk3Nets := rootlessKitNets(t.rootlesskit3)
	for _, s := range systems {
		s.available = true
		switch s.name {
		case "gonetns", "gonetns-packet", "gonetns-netstack", "gonetns-port", "gonetns-unconfined", "gonetns-noloop", "gonetns-nopoll":
			s.version = v.gonetns
		case "slirp4netns", "rootlesskit-builtin", "rootlesskit-slirp4netns":
			s.version = strings.TrimSpace("rootlesskit " + v.rootlesskit + ", slirp4netns " + v.slirp4netns)
			switch {
			case t.rootlesskit == "":
				s.available, s.reason, s.install = false, "rootlesskit is not installed", aptRootlessKit
			case t.slirp4netns == "":
				s.available, s.reason, s.install = false, "slirp4netns is not installed", aptRootlessKit
			}
		case "gvisor-tap-vsock":
			s.version = "rootlesskit " + v.rootlesskit3
			switch {
			case t.rootlesskit3 == "":
				s.available, s.reason, s.install = false, "RootlessKit v3 is not installed in the tools directory", installRootlessKit3
			case !slices.Contains(rk3Nets, "gvisor-tap-vsock"):
				s.available, s.reason = false, "not available in rootlesskit "+v.rootlesskit3+" (its --net drivers: "+strings.Join(rk3Nets, ", ")+"); RootlessKit v3 has it"
			}
		case "pasta", "pasta-port":
			s.version = "passt " + v.passt
			if t.pasta == "" {
				s.available, s.reason, s.install = false, "pasta is not installed", aptPasta
			}
		case "host":
			s.version = "kernel " + v.kernel
		}
	}
}

// rootlessKitNets lists the --net drivers RootlessKit's help names, e.g.
// "network driver [host, slirp4netns, vpnkit, lxc-user-nic(experimental)]".
func rootlessKitNets(path string) []string {
	if path == "" {
		return nil
	}
	out, _ := exec.Command(path, "--help").CombinedOutput()
	return parseRootlessKitNets(string(out))
}

func parseRootlessKitNets(help string) []string {
	for _, line := range strings.Split(help, "\n") {
		if !strings.Contains(line, "--net ") && !strings.Contains(line, "--net=") {
			continue
		}
		open, end := strings.Index(line, "["), strings.Index(line, "]")
		if open < 0 || end < open {
			continue
		}
		var nets []string
		for _, f := range strings.Split(line[open+1:end], ",") {
			f = strings.TrimSpace(f)
			if i := strings.Index(f, "("); i >= 0 {
				f = f[:i]
			}
			if f != "" {
				nets = append(nets, f)
			}
		}
		return nets
	}
	return nil
}

// isRoot reports whether the harness runs as root (for diagnoses).
func isRoot() bool { return os.Geteuid() == 0 }
