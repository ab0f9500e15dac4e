package sandbox

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/gonetns/gonetns/port"
)

func TestConfigValidate(t *testing.T) {
	spec := port.Spec{Proto: "tcp", ParentPort: 8080, ChildPort: 80}
	cases := []struct {
		name string
		cfg  Config
		want string // "" means valid
	}{
		{"zero value", Config{}, ""},
		{"rootlesskit's net host", Config{Net: NetHost}, ""},
		{"none", Config{Net: NetNone, PortDriver: PortsNone}, ""},
		{"unknown net", Config{Net: "slirp"}, "builtin, none or host"},
		{"mtu low", Config{MTU: 1279}, "1280 to 65521"},
		{"mtu high", Config{MTU: 65522}, "1280 to 65521"},
		{"mtu max", Config{MTU: 65521}, ""},
		{"busy poll", Config{BusyPoll: 50 * time.Microsecond}, ""},
		{"busy poll max", Config{BusyPoll: MaxBusyPoll}, ""},
		{"busy poll too long", Config{BusyPoll: 2 * time.Millisecond}, "invalid --busy-poll=2ms: use auto, 0 (off) or up to 1ms"},
		{"busy poll set and off", Config{BusyPoll: 50 * time.Microsecond, DisableBusyPoll: true}, "set one of them"},
		{"busy poll off", Config{DisableBusyPoll: true}, ""},
		{"busy poll auto without the fast path", Config{DisableTCPFastPath: true}, ""},
		{"busy poll negative", Config{BusyPoll: -time.Microsecond}, "invalid --busy-poll"},
		{"busy poll without the fast path", Config{BusyPoll: 50 * time.Microsecond, DisableTCPFastPath: true}, "--busy-poll needs the TCP fast path"},
		{"busy poll without the event loop", Config{BusyPoll: 50 * time.Microsecond, DisableEventLoop: true}, "--busy-poll needs the event loop"},
		{"cidr v6", Config{CIDR: netip.MustParsePrefix("fd00::/64")}, "IPv4 subnet"},
		{"cidr host bits", Config{CIDR: netip.MustParsePrefix("10.0.2.1/24")}, "did you mean 10.0.2.0/24"},
		{"cidr too small", Config{CIDR: netip.MustParsePrefix("10.0.2.0/28")}, "/25 or shorter"},
		{"cidr loopback", Config{CIDR: netip.MustParsePrefix("127.0.0.0/8")}, "overlaps 127.0.0.0/8"},
		{"cidr this network", Config{CIDR: netip.MustParsePrefix("0.0.0.0/8")}, "overlaps 0.0.0.0/8"},
		{"cidr multicast", Config{CIDR: netip.MustParsePrefix("224.0.0.0/24")}, "overlaps 224.0.0.0/3"},
		{"cidr class e", Config{CIDR: netip.MustParsePrefix("240.0.0.0/24")}, "overlaps 224.0.0.0/3"},
		{"cidr covering loopback", Config{CIDR: netip.MustParsePrefix("64.0.0.0/2")}, "overlaps 127.0.0.0/8"},
		{"cidr private", Config{CIDR: netip.MustParsePrefix("192.168.100.0/24")}, ""},
		{"link unknown", Config{Link: "veth"}, "auto (the TAP when /dev/net/tun can be opened, else packet), tap or packet"},
		{"link tap", Config{Link: LinkTAP}, ""},
		{"link packet", Config{Link: LinkPacket}, ""},
		{"link packet, net host", Config{Link: LinkPacket, Net: NetHost}, "--link=packet needs --net=builtin"},
		{"link tap, net none", Config{Link: LinkTAP, Net: NetNone}, "--link=tap needs --net=builtin"},
		{"ifname long", Config{IfName: "0123456789abcdef"}, "up to 15"},
		{"ifname slash", Config{IfName: "a/b"}, "without '/'"},
		{"dns upstream zero port", Config{DNSUpstreams: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:0")}}, "--dns-upstream"},
		{"port driver unknown", Config{PortDriver: "pasta"}, "builtin, implicit or none"},
		{"ports with net host", Config{Net: NetHost, PortDriver: PortsBuiltin}, "needs a network namespace"},
		{"detach with net host", Config{Net: NetHost, DetachNetNS: true}, "--detach-netns needs"},
		{"detach", Config{DetachNetNS: true}, ""},
		{"publish without driver", Config{PortDriver: PortsNone, Publish: []port.Spec{spec}}, "--port-driver=none"},
		{"publish bad spec", Config{Publish: []port.Spec{{Proto: "tcp", ParentPort: 0, ChildPort: 80}}}, "parent port 0"},
		{"publish", Config{Publish: []port.Spec{spec}}, ""},
		{"propagation", Config{Propagation: "shared"}, "rprivate or rslave"},
		{"reaper", Config{Reaper: "yes"}, "auto, true or false"},
		{"evacuate without pidns", Config{EvacuateCgroup2: "evac", CgroupNS: true}, "needs --pidns and --cgroupns"},
		{"evacuate slash", Config{EvacuateCgroup2: "a/b", CgroupNS: true, PIDNS: true}, "without '/'"},
		{"evacuate", Config{EvacuateCgroup2: "evac", CgroupNS: true, PIDNS: true}, ""},
		{"subid source", Config{SubIDSource: "ldap"}, "subid"},
		{"copy-up tmp", Config{CopyUp: []string{"/tmp"}}, "/tmp is refused"},
		{"copy-up relative", Config{CopyUp: []string{"etc"}}, "must be absolute"},
	}
	for _, c := range cases {
		err := c.cfg.Validate()
		switch {
		case c.want == "" && err != nil:
			t.Errorf("%s: %v; want valid", c.name, err)
		case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want) || !errors.Is(err, ErrInvalidConfig)):
			t.Errorf("%s: %v; want an ErrInvalidConfig containing %q", c.name, err, c.want)
		}
	}
}

func TestConfigDefaults(t *testing.T) {
	c := Config{}.withDefaults()
	if c.Net != NetBuiltin || c.MTU != 65520 || c.CIDR != netip.MustParsePrefix("10.0.2.0/24") || c.IfName != "tap0" || c.Link != LinkAuto ||
		c.PortDriver != PortsBuiltin || c.Propagation != "rprivate" || c.Reaper != "auto" || c.SubIDSource != SubIDAuto || c.Logger == nil {
		t.Errorf("defaults: %+v", c)
	}
	if h := (Config{Net: NetHost}).withDefaults(); h.PortDriver != PortsNone {
		t.Errorf("with net host the port driver defaults to %q, want none", h.PortDriver)
	}
}

func TestAddrPlan(t *testing.T) {
	p := planAddrs(netip.MustParsePrefix("192.168.7.0/24"), true)
	if p.gateway.String() != "192.168.7.2" || p.dns.String() != "192.168.7.3" || p.child.String() != "192.168.7.100" ||
		p.gateway6.String() != "fd00::2" || p.dns6.String() != "fd00::3" || p.child6.String() != "fd00::100" {
		t.Errorf("address plan: %+v", p)
	}
}

func TestFreeSubnet(t *testing.T) {
	p := netip.MustParsePrefix
	for _, c := range []struct {
		bits  int
		taken []netip.Prefix
		want  string
	}{
		{24, nil, "10.0.2.0/24"},
		{24, []netip.Prefix{p("10.0.2.0/24")}, "10.0.3.0/24"},
		{24, []netip.Prefix{p("10.0.0.0/16"), p("10.1.0.0/24")}, "10.1.1.0/24"},
		{25, []netip.Prefix{p("10.0.2.0/25")}, "10.0.2.128/25"},
		{16, []netip.Prefix{p("10.0.5.0/24")}, "10.1.0.0/16"},
		{24, []netip.Prefix{p("10.0.0.0/8")}, "172.16.0.0/24"},
		{24, []netip.Prefix{p("10.0.0.0/8"), p("172.16.0.0/12"), p("192.168.0.0/17")}, "192.168.128.0/24"},
		{24, []netip.Prefix{p("10.0.0.0/8"), p("172.16.0.0/12"), p("192.168.0.0/16")}, "invalid Prefix"},
	} {
		got, _ := freeSubnet(c.bits, c.taken)
		if got.String() != c.want {
			t.Errorf("freeSubnet(%d, %v) = %v, want %s", c.bits, c.taken, got, c.want)
		}
	}
}

// TestBusyPollResolved: --busy-poll=0 and a duration are what they say;
// auto polls where idle CPUs halt at once and the event loop runs, and
// says why.
func TestBusyPollResolved(t *testing.T) {
	halts, _ := idleCPUsHalt()
	auto := time.Duration(0)
	if halts {
		auto = DefaultBusyPoll
	}
	for _, tc := range []struct {
		name string
		cfg  Config
		want time.Duration
		why  string
	}{
		{"off", Config{DisableBusyPoll: true}, 0, "--busy-poll=0"},
		{"set", Config{BusyPoll: 20 * time.Microsecond}, 20 * time.Microsecond, "--busy-poll"},
		{"auto", Config{}, auto, "auto: "},
		{"auto without the fast path", Config{DisableTCPFastPath: true}, 0, "auto: no event loop"},
		{"auto without the event loop", Config{DisableEventLoop: true}, 0, "auto: no event loop"},
	} {
		got, why := tc.cfg.busyPoll()
		if got != tc.want || !strings.HasPrefix(why, tc.why) {
			t.Errorf("%s: %v (%s), want %v (%s...)", tc.name, got, why, tc.want, tc.why)
		}
	}
}

// TestHaltsWithoutPolling: the cpuidle drivers under which an idle CPU
// halts at once, and those that choose or poll.
func TestHaltsWithoutPolling(t *testing.T) {
	for _, tc := range []struct {
		driver, pollNS string
		want           bool
	}{
		{"none", "", true},
		{"", "", true},
		{"haltpoll", "0", true},
		{"haltpoll", "200000", false},
		{"intel_idle", "", false},
		{"acpi_idle", "", false},
		{"psci_idle", "", false},
	} {
		if got, why := haltsWithoutPolling(tc.driver, tc.pollNS); got != tc.want || why == "" {
			t.Errorf("haltsWithoutPolling(%q, %q) = %v (%q), want %v", tc.driver, tc.pollNS, got, why, tc.want)
		}
	}
}
