package sandbox

import (
	"encoding/json"
	"errors"
	"net/netip"
	"strings"
	"testing"
)

func prefixes(s ...string) []netip.Prefix {
	var ps []netip.Prefix
	for _, x := range s {
		ps = append(ps, netip.MustParsePrefix(x))
	}
	return ps
}

func TestParsePrefix(t *testing.T) {
	cases := []struct{ in, want, err string }{
		{"10.0.0.0/8", "10.0.0.0/8", ""},
		{"127.0.0.1", "127.0.0.1/32", ""},
		{"::1", "::1/128", ""},
		{"2001:db8::/32", "2001:db8::/32", ""},
		{"10.0.0.1/8", "10.0.0.1/8", ""}, // Validate says what is wrong
		{"10.0.0.0/33", "", "invalid --deny=10.0.0.0/33"},
		{"example.org", "", "give an address or a prefix"},
		{"fe80::1%eth0", "", "invalid --deny"},
		{"", "", "invalid --deny"},
	}
	for _, c := range cases {
		p, err := ParsePrefix("--deny", c.in)
		switch {
		case c.err != "" && (err == nil || !strings.Contains(err.Error(), c.err)):
			t.Errorf("ParsePrefix(%q) = %v, %v; want an error with %q", c.in, p, err, c.err)
		case c.err == "" && (err != nil || p.String() != c.want):
			t.Errorf("ParsePrefix(%q) = %v, %v; want %s", c.in, p, err, c.want)
		}
	}
}

func TestValidateEgress(t *testing.T) {
	cases := []struct {
		name string
		cfg  Config
		err  string // "" = valid
	}{
		{"deny loopback", Config{Deny: prefixes("127.0.0.1/32")}, ""},
		{"allow and deny both families", Config{Allow: prefixes("192.0.2.0/24", "2001:db8::/32"), Deny: prefixes("192.0.2.128/25")}, ""},
		{"shorthands", Config{DenyMetadata: true, DenyPrivate: true}, ""},
		{"an explicit allow overrides a shorthand", Config{DenyPrivate: true, Allow: prefixes("192.168.0.0/16")}, ""},
		{"host bits", Config{Deny: prefixes("10.0.0.1/8")}, "did you mean 10.0.0.0/8"},
		{"contradiction", Config{Deny: prefixes("10.0.0.0/8"), Allow: prefixes("10.0.0.0/8")}, "contradict"},
		{"the gateway", Config{Deny: prefixes("10.0.2.2/32")}, "--deny=10.0.2.2/32 would never match"},
		{"the gateway, advice", Config{Allow: prefixes("10.0.2.0/24")}, "write --allow=127.0.0.1/32"},
		{"the IPv6 gateway", Config{IPv6: true, Deny: prefixes("fd00::2/128")}, "write --deny=::1/128"},
		{"fd00::2 without --ipv6 is just an address", Config{Deny: prefixes("fd00::2/128")}, ""},
		{"a range holding the subnet is fine", Config{Deny: prefixes("10.0.0.0/8")}, ""},
		{"moved subnet", Config{CIDR: netip.MustParsePrefix("10.9.0.0/24"), Deny: prefixes("10.9.0.2/32")}, "subnet 10.9.0.0/24"},
		{"mapped", Config{Deny: prefixes("::ffff:127.0.0.1/128")}, "IPv4-mapped"},
		{"not with host", Config{Net: NetHost, PortDriver: PortsNone, Deny: prefixes("127.0.0.1/32")}, "--deny needs --net=builtin"},
		{"not with none", Config{Net: NetNone, DenyPrivate: true}, "--deny-private needs --net=builtin"},
		{"pcap not with none", Config{Net: NetNone, PCAP: "x.pcap"}, "--pcap needs --net=builtin"},
		{"pcap", Config{PCAP: "x.pcap", PCAPMaxSize: 1 << 20}, ""},
		{"pcap too small", Config{PCAP: "x.pcap", PCAPMaxSize: 1000}, "invalid --pcap-max-size=1000"},
		{"pcap size alone", Config{PCAPMaxSize: 1 << 30}, "--pcap-max-size needs --pcap"},
		{"outbound", Config{OutboundAddr: "127.0.0.2", OutboundAddr6: "::1"}, ""},
		{"outbound interface", Config{OutboundAddr: "eth0", OutboundAddr6: "wlp3s0"}, ""},
		{"outbound wrong family", Config{OutboundAddr: "::1"}, "use --outbound-addr6"},
		{"outbound6 wrong family", Config{OutboundAddr6: "127.0.0.1"}, "use --outbound-addr"},
		{"outbound unspecified", Config{OutboundAddr: "0.0.0.0"}, "unicast"},
		{"outbound6 link-local", Config{OutboundAddr6: "fe80::1"}, "link-local"},
		{"outbound junk", Config{OutboundAddr: "not an interface"}, "give an IP address or the name of an interface"},
		{"outbound not with host", Config{Net: NetHost, PortDriver: PortsNone, OutboundAddr: "127.0.0.2"}, "--outbound-addr needs --net=builtin"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := c.cfg.Validate()
			switch {
			case c.err == "" && err != nil:
				t.Errorf("Validate: %v", err)
			case c.err != "" && (err == nil || !strings.Contains(err.Error(), c.err)):
				t.Errorf("Validate = %v, want an error with %q", err, c.err)
			case err != nil && !errors.Is(err, ErrInvalidConfig):
				t.Errorf("Validate's error %v does not wrap ErrInvalidConfig", err)
			}
		})
	}
}

func TestEgressRulesAndInfo(t *testing.T) {
	cfg := Config{DenyPrivate: true, DenyMetadata: true, Allow: prefixes("192.168.0.0/16", "0.0.0.0/0", "::/0")}.withDefaults()
	p, err := cfg.egressPolicy()
	if err != nil {
		t.Fatal(err)
	}
	n := &network{cfg: cfg, policy: p}
	b, _ := json.Marshal(n.egressInfo())
	got := string(b)
	for _, want := range []string{
		`"default":"deny"`,
		`{"prefix":"169.254.169.254/32","action":"deny","origin":"--deny-metadata"}`,
		`{"prefix":"192.168.0.0/16","action":"allow","origin":"--allow=192.168.0.0/16"}`,
		`{"prefix":"10.0.0.0/8","action":"deny","origin":"--deny-private"}`,
		`{"prefix":"0.0.0.0/0","action":"allow","origin":"--allow=0.0.0.0/0"}`,
	} {
		if !strings.Contains(got, want) {
			t.Errorf("egress info lacks %s:\n%s", want, got)
		}
	}
	if strings.Contains(got, `"192.168.0.0/16","action":"deny"`) {
		t.Errorf("the shorthand's 192.168.0.0/16 was kept next to the explicit --allow:\n%s", got)
	}
	for addr, allowed := range map[string]bool{"192.168.1.1": true, "10.1.1.1": false, "169.254.169.254": false, "192.0.2.1": true, "fd00::1": false, "2001:db8::1": true} {
		if p.Allows(netip.MustParseAddr(addr)) != allowed {
			t.Errorf("%s: allowed %v, want %v", addr, !allowed, allowed)
		}
	}
	none := &network{cfg: Config{}.withDefaults()}
	if b, _ := json.Marshal(none.egressInfo()); string(b) != `{"default":"allow","rules":[]}` {
		t.Errorf("egress info without rules: %s", b)
	}
}

func TestResolveOutbound(t *testing.T) {
	cases := []struct {
		flag, in string
		v6       bool
		want     string
		err      string
	}{
		{"--outbound-addr", "", false, "invalid IP", ""},
		{"--outbound-addr", "127.0.0.2", false, "127.0.0.2", ""},
		{"--outbound-addr", "lo", false, "127.0.0.1", ""},
		{"--outbound-addr6", "lo", true, "::1", ""},
		{"--outbound-addr6", "::1", true, "::1", ""},
		{"--outbound-addr", "192.0.2.77", false, "", "cannot bind to 192.0.2.77"},
		{"--outbound-addr", "no-such-if0", false, "", "no such interface"},
	}
	for _, c := range cases {
		a, err := resolveOutbound(c.flag, c.in, c.v6)
		switch {
		case c.err != "" && (err == nil || !strings.Contains(err.Error(), c.err)):
			t.Errorf("%s=%s: %v, %v; want an error with %q", c.flag, c.in, a, err, c.err)
		case c.err == "" && (err != nil || a.String() != c.want):
			t.Errorf("%s=%s: %v, %v; want %s", c.flag, c.in, a, err, c.want)
		}
	}
}
