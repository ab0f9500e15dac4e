package sandbox

import (
	"fmt"
	"net"
	"net/netip"
	"strings"

	"github.com/gonetns/gonetns/nat"
	"github.com/gonetns/gonetns/pcap"
)

// ParsePrefix parses the value of --allow or --deny (flag): a prefix such
// as 10.0.0.0/8 or 2001:db8::/32, or a single address (a /32 or /128).
func ParsePrefix(flag, s string) (netip.Prefix, error) {
	if a, err := netip.ParseAddr(s); err == nil && a.Zone() == "" {
		return netip.PrefixFrom(a, a.BitLen()), nil
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, invalidf("invalid %s=%s: give an address or a prefix, e.g. 192.0.2.1 or 10.0.0.0/8 or fd00::/8", flag, s)
	}
	return p, nil
}

// egressRules are the egress policy's rules, shorthands expanded: explicit
// rules first, then each shorthand prefix no explicit rule names.
func (c Config) egressRules() []nat.Rule {
	var rules []nat.Rule
	explicit := map[netip.Prefix]bool{}
	for _, p := range c.Allow {
		rules = append(rules, nat.Rule{Prefix: p, Allow: true, Origin: "--allow=" + p.String()})
		explicit[p] = true
	}
	for _, p := range c.Deny {
		rules = append(rules, nat.Rule{Prefix: p, Origin: "--deny=" + p.String()})
		explicit[p] = true
	}
	shorthand := func(flag string, prefixes []netip.Prefix) {
		for _, p := range prefixes {
			if !explicit[p] {
				rules = append(rules, nat.Rule{Prefix: p, Origin: flag})
			}
		}
	}
	if c.DenyMetadata {
		shorthand("--deny-metadata", nat.MetadataPrefixes)
	}
	if c.DenyPrivate {
		shorthand("--deny-private", nat.PrivatePrefixes)
	}
	return rules
}

// egressPolicy makes the policy of the rules; nil when there are none.
func (c Config) egressPolicy() (*nat.Policy, error) {
	rules := c.egressRules()
	if len(rules) == 0 {
		return nil, nil
	}
	p, err := nat.NewPolicy(rules)
	if err != nil {
		return nil, invalidf("invalid egress policy: %v", err)
	}
	return p, nil
}

// checkEgress validates the egress policy, the outbound addresses and
// the capture (c has its defaults).
func (c Config) checkEgress() error {
	builtinOnly := []struct {
		set  bool
		flag string
	}{
		{len(c.Allow) > 0, "--allow"}, {len(c.Deny) > 0, "--deny"}, {c.DenyMetadata, "--deny-metadata"},
		{c.DenyPrivate, "--deny-private"}, {c.OutboundAddr != "", "--outbound-addr"},
		{c.OutboundAddr6 != "", "--outbound-addr6"}, {c.PCAP != "", "--pcap"},
	}
	for _, o := range builtinOnly {
		if o.set && c.Net != NetBuiltin {
			return invalidf("%s needs --net=builtin: with --net=%s gonetns does not carry the sandbox's traffic", o.flag, c.Net)
		}
	}
	plan := planAddrs(c.CIDR, c.IPv6)
	for _, list := range []struct {
		flag     string
		prefixes []netip.Prefix
	}{{"--allow", c.Allow}, {"--deny", c.Deny}} {
		for _, p := range list.prefixes {
			for _, sub := range []netip.Prefix{plan.subnet, plan.subnet6} {
				if sub.IsValid() && p.IsValid() && p.Bits() >= sub.Bits() && sub.Contains(p.Addr()) {
					lo := hostLoopbackOf(sub)
					return invalidf("%s=%s would never match: addresses of the sandbox's subnet %s never leave it, and the gateway %s is judged as the host loopback it stands for: write %s=%s/%d (or use --disable-host-loopback)",
						list.flag, p, sub, gatewayOf(plan, sub), list.flag, lo, lo.BitLen())
				}
			}
		}
	}
	if _, err := c.egressPolicy(); err != nil {
		return err
	}
	for _, o := range []struct {
		flag, value string
		v6          bool
	}{{"--outbound-addr", c.OutboundAddr, false}, {"--outbound-addr6", c.OutboundAddr6, true}} {
		if _, _, err := parseOutbound(o.flag, o.value, o.v6); err != nil {
			return err
		}
	}
	if c.PCAPMaxSize != 0 && c.PCAPMaxSize < pcap.MinMaxSize {
		return invalidf("invalid --pcap-max-size=%d: use at least %d bytes (1 MiB); 0 means %d", c.PCAPMaxSize, pcap.MinMaxSize, pcap.DefaultMaxSize)
	}
	if c.PCAPMaxSize != 0 && c.PCAP == "" {
		return invalidf("--pcap-max-size needs --pcap=FILE")
	}
	return nil
}

func gatewayOf(p addrPlan, sub netip.Prefix) netip.Addr {
	if sub == p.subnet6 {
		return p.gateway6
	}
	return p.gateway
}

func hostLoopbackOf(sub netip.Prefix) netip.Addr {
	if sub.Addr().Is6() {
		return netip.IPv6Loopback()
	}
	return netip.AddrFrom4([4]byte{127, 0, 0, 1})
}

// parseOutbound parses the value of --outbound-addr (v6 false) or
// --outbound-addr6: an address of the family, or an interface name.
func parseOutbound(flag, s string, v6 bool) (netip.Addr, string, error) {
	if s == "" {
		return netip.Addr{}, "", nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		if len(s) > 15 || strings.ContainsAny(s, "/ \t\n:%") {
			return netip.Addr{}, "", invalidf("invalid %s=%s: give an IP address or the name of an interface", flag, s)
		}
		return netip.Addr{}, s, nil
	}
	a = a.Unmap()
	switch {
	case a.Is4() && v6:
		return netip.Addr{}, "", invalidf("invalid %s=%s: an IPv4 address; use --outbound-addr", flag, s)
	case a.Is6() && !v6:
		return netip.Addr{}, "", invalidf("invalid %s=%s: an IPv6 address; use --outbound-addr6", flag, s)
	case a.IsUnspecified(), a.IsMulticast():
		return netip.Addr{}, "", invalidf("invalid %s=%s: give a unicast address of this host", flag, s)
	case v6 && a.IsLinkLocalUnicast():
		return netip.Addr{}, "", invalidf("invalid %s=%s: a link-local source reaches only its own link; give a global or unique local address", flag, s)
	}
	return a, "", nil
}

// resolveOutbound turns an --outbound-addr value into the address to bind
// to, looking the interface up, and checks that it can be bound to.
func resolveOutbound(flag, s string, v6 bool) (netip.Addr, error) {
	a, ifname, err := parseOutbound(flag, s, v6)
	if err != nil || s == "" {
		return netip.Addr{}, err
	}
	family := "IPv4"
	if v6 {
		family = "IPv6"
	}
	if ifname != "" {
		ifi, err := net.InterfaceByName(ifname)
		if err != nil {
			return netip.Addr{}, fmt.Errorf("%s=%s: no such interface or address: %w", flag, s, err)
		}
		addrs, err := ifi.Addrs()
		if err != nil {
			return netip.Addr{}, fmt.Errorf("%s=%s: addresses of the interface: %w", flag, s, err)
		}
		for _, ia := range addrs {
			n, ok := ia.(*net.IPNet)
			if !ok {
				continue
			}
			ip, ok := netip.AddrFromSlice(n.IP)
			if ip = ip.Unmap(); ok && ip.Is6() == v6 && !ip.IsLinkLocalUnicast() {
				a = ip
				break
			}
		}
		if !a.IsValid() {
			return netip.Addr{}, fmt.Errorf("%s=%s: the interface has no %s address (link-local ones do not count)", flag, s, family)
		}
	}
	// Bind once now, so a mistyped address fails here and not on every
	// connection of the sandbox.
	network := "udp4"
	if v6 {
		network = "udp6"
	}
	pc, err := net.ListenUDP(network, net.UDPAddrFromAddrPort(netip.AddrPortFrom(a, 0)))
	if err != nil {
		return netip.Addr{}, fmt.Errorf("%s=%s: cannot bind to %v (is it an %s address of this host?): %w", flag, s, a, family, err)
	}
	pc.Close()
	return a, nil
}
