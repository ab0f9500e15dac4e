package nat

import (
	"cmp"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
)

// Rule allows or denies the host addresses of a prefix.
type Rule struct {
	Prefix netip.Prefix
	Allow  bool
	// Origin is the flag the rule came from (e.g. "--deny-private"), for
	// messages; optional.
	Origin string
}

func (r Rule) String() string {
	if r.Allow {
		return "allow " + r.Prefix.String()
	}
	return "deny " + r.Prefix.String()
}

// The shorthands' prefixes.
var (
	// MetadataPrefixes are the cloud instance metadata services
	// (--deny-metadata): AWS, GCP, Azure and most others answer on
	// 169.254.169.254, AWS over IPv6 on fd00:ec2::254.
	MetadataPrefixes = []netip.Prefix{
		netip.MustParsePrefix("169.254.169.254/32"),
		netip.MustParsePrefix("fd00:ec2::254/128"),
	}
	// PrivatePrefixes are the private and link-local ranges
	// (--deny-private): RFC 1918, IPv4 link-local (RFC 3927), unique
	// local IPv6 (RFC 4193) and IPv6 link-local.
	PrivatePrefixes = []netip.Prefix{
		netip.MustParsePrefix("10.0.0.0/8"),
		netip.MustParsePrefix("172.16.0.0/12"),
		netip.MustParsePrefix("192.168.0.0/16"),
		netip.MustParsePrefix("169.254.0.0/16"),
		netip.MustParsePrefix("fc00::/7"),
		netip.MustParsePrefix("fe80::/10"),
	}
)

// Policy is the egress policy: which host addresses the sandbox's TCP
// connections, UDP flows and ICMP echo may go to. It judges the address a
// host socket would be connected to — the destination the sandbox asked
// for, or for the gateway the host loopback address it stands for — so
// that denying 127.0.0.1/32 closes the gateway too, while denying private
// ranges leaves it (the host's loopback is no private range).
//
// Among the rules whose prefix contains the address, the most specific
// (longest prefix) decides. An address no rule covers is denied when any
// rule allows (an allow-list: --allow alone means deny the rest), and
// allowed otherwise. A nil *Policy allows everything.
type Policy struct {
	rules        []Rule // longest prefix first
	defaultAllow bool
}

// NewPolicy checks the rules and makes a Policy of them. Prefixes must be
// masked (no host bits) and not IPv4-mapped; the same prefix may appear
// more than once only with the same verdict.
func NewPolicy(rules []Rule) (*Policy, error) {
	p := &Policy{defaultAllow: true}
	seen := make(map[netip.Prefix]Rule, len(rules))
	for _, r := range rules {
		if err := checkPrefix(r.Prefix); err != nil {
			return nil, fmt.Errorf("%s: %w", origin(r), err)
		}
		if old, ok := seen[r.Prefix]; ok {
			if old.Allow != r.Allow {
				return nil, fmt.Errorf("%s and %s contradict each other: give %s once", origin(old), origin(r), r.Prefix)
			}
			continue
		}
		seen[r.Prefix] = r
		p.rules = append(p.rules, r)
		if r.Allow {
			p.defaultAllow = false
		}
	}
	slices.SortStableFunc(p.rules, func(a, b Rule) int { return cmp.Compare(b.Prefix.Bits(), a.Prefix.Bits()) })
	return p, nil
}

func origin(r Rule) string {
	if r.Origin != "" {
		return fmt.Sprintf("%s (%s)", r.Origin, r)
	}
	return r.String()
}

func checkPrefix(p netip.Prefix) error {
	switch {
	case !p.IsValid():
		return fmt.Errorf("invalid prefix %v", p)
	case p.Addr().Is4In6():
		return fmt.Errorf("%v is an IPv4-mapped IPv6 prefix, which never matches: write the IPv4 prefix", p)
	case p.Masked() != p:
		return fmt.Errorf("%v has host bits set; did you mean %v?", p, p.Masked())
	}
	return nil
}

// Allows reports whether the sandbox's traffic may go to the host address
// addr.
func (p *Policy) Allows(addr netip.Addr) bool {
	if p == nil {
		return true
	}
	addr = addr.Unmap()
	for _, r := range p.rules {
		if r.Prefix.Contains(addr) {
			return r.Allow
		}
	}
	return p.defaultAllow
}

// Rules returns the rules, most specific first.
func (p *Policy) Rules() []Rule {
	if p == nil {
		return nil
	}
	return slices.Clone(p.rules)
}

// DefaultAllow reports the verdict for addresses no rule covers.
func (p *Policy) DefaultAllow() bool { return p == nil || p.defaultAllow }

// refusalLog says at debug level, once per protocol and destination, that
// the policy refused the sandbox's traffic, so a refused destination the
// sandbox retries does not flood the log. It remembers a bounded number of
// destinations and forgets them all when full.
type refusalLog struct {
	mu   sync.Mutex
	seen map[refusal]struct{}
}

type refusal struct {
	proto string
	dst   netip.Addr
}

const maxRefusalsRemembered = 4096

// first reports whether this is the first refusal of proto to dst.
func (l *refusalLog) first(proto string, dst netip.Addr) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.seen == nil || len(l.seen) >= maxRefusalsRemembered {
		l.seen = make(map[refusal]struct{})
	}
	k := refusal{proto, dst}
	if _, ok := l.seen[k]; ok {
		return false
	}
	l.seen[k] = struct{}{}
	return true
}

// allowed asks the egress policy whether traffic of proto ("tcp", "udp",
// "icmp") that the sandbox sends to dst may go to host, dst's host address.
// The first refusal of each destination is logged.
func (n *NAT) allowed(proto string, dst, host netip.Addr) bool {
	if n.cfg.Policy.Allows(host) {
		return true
	}
	if n.log.Enabled(n.ctx, slog.LevelDebug) && n.refusals.first(proto, dst) {
		n.log.Debug("refused by the egress policy (--allow, --deny); further refusals of this destination are not logged",
			"proto", proto, "dst", dst, "host", host)
	}
	return false
}
