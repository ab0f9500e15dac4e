package dns

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// ParseUpstream parses the value of --dns-upstream: an IP address and an
// optional port, 53 when left out. An IPv6 address takes brackets when it
// has a port. Accepted forms:
//
//	1.1.1.1   1.1.1.1:5353   2606:4700::1111   [2606:4700::1111]   [2606:4700::1111]:53   [fe80::1%eth0]:53
//
// An IPv4-mapped IPv6 address is turned into plain IPv4.
func ParseUpstream(s string) (netip.AddrPort, error) {
	a, port, err := parseUpstream(strings.TrimSpace(s))
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("parse DNS upstream %q: %w (want IP or IP:PORT, e.g. 1.1.1.1, 1.1.1.1:53, [2606:4700::1111]:53)", s, err)
	}
	return netip.AddrPortFrom(a, port), nil
}

func parseUpstream(s string) (netip.Addr, uint16, error) {
	if s == "" {
		return netip.Addr{}, 0, errors.New("empty")
	}
	var (
		host = s
		port = uint16(53)
		err  error
	)
	switch {
	case strings.HasPrefix(s, "["):
		end := strings.IndexByte(s, ']')
		if end < 0 {
			return netip.Addr{}, 0, errors.New("missing ']'")
		}
		host = s[1:end]
		if rest := s[end+1:]; rest != "" {
			p, ok := strings.CutPrefix(rest, ":")
			if !ok {
				return netip.Addr{}, 0, fmt.Errorf("unexpected %q after ']'", rest)
			}
			if port, err = parsePort(p); err != nil {
				return netip.Addr{}, 0, err
			}
		}
		a, err := netip.ParseAddr(host)
		if err != nil {
			return netip.Addr{}, 0, err
		}
		if !a.Is6() {
			return netip.Addr{}, 0, errors.New("brackets are for IPv6 addresses only")
		}
		return check(a, port)
	case strings.Count(s, ":") >= 2:
		// A bare IPv6 address; a port would need brackets.
		a, err := netip.ParseAddr(s)
		if err != nil {
			return netip.Addr{}, 0, fmt.Errorf("%w (an IPv6 address with a port needs brackets: [ADDR]:PORT)", err)
		}
		return check(a, port)
	}
	if h, p, ok := strings.Cut(s, ":"); ok {
		host = h
		if port, err = parsePort(p); err != nil {
			return netip.Addr{}, 0, err
		}
	}
	a, err := netip.ParseAddr(host)
	if err != nil {
		if strings.ContainsFunc(host, func(r rune) bool { return r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' }) {
			return netip.Addr{}, 0, fmt.Errorf("%q is not an IP address; host names are not resolved for upstreams", host)
		}
		return netip.Addr{}, 0, err
	}
	return check(a, port)
}

func parsePort(p string) (uint16, error) {
	n, err := strconv.ParseUint(p, 10, 16)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("bad port %q: want 1-65535", p)
	}
	return uint16(n), nil
}

func check(a netip.Addr, port uint16) (netip.Addr, uint16, error) {
	a = a.Unmap()
	if a.IsUnspecified() {
		return netip.Addr{}, 0, fmt.Errorf("%s is not a resolver address", a)
	}
	if a.IsMulticast() {
		return netip.Addr{}, 0, fmt.Errorf("%s is a multicast address", a)
	}
	return a, port, nil
}
