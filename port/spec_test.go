package port

import (
	"encoding/json"
	"errors"
	"net/netip"
	"strconv"
	"strings"
	"testing"
)

var (
	ip4   = netip.MustParseAddr("127.0.0.1")
	ip6   = netip.MustParseAddr("::1")
	ipAny = netip.IPv4Unspecified()
)

func TestParseSpec(t *testing.T) {
	good := []struct {
		in   string
		want Spec
	}{
		{"8080:80/tcp", Spec{Proto: "tcp", ParentPort: 8080, ChildPort: 80}},
		{"127.0.0.1:8080:80/tcp", Spec{Proto: "tcp", ParentIP: ip4, ParentPort: 8080, ChildPort: 80}},
		{"127.0.0.1:8080:80/tcp4", Spec{Proto: "tcp4", ParentIP: ip4, ParentPort: 8080, ChildPort: 80}},
		{"127.0.0.1:8080:10.0.2.100:80/tcp", Spec{Proto: "tcp", ParentIP: ip4, ParentPort: 8080, ChildIP: netip.MustParseAddr("10.0.2.100"), ChildPort: 80}},
		{"8080:10.0.2.100:80/udp", Spec{Proto: "udp", ParentPort: 8080, ChildIP: netip.MustParseAddr("10.0.2.100"), ChildPort: 80}},
		{"0.0.0.0:53:53/udp4", Spec{Proto: "udp4", ParentIP: ipAny, ParentPort: 53, ChildPort: 53}},
		{"[::1]:8080:80/tcp", Spec{Proto: "tcp", ParentIP: ip6, ParentPort: 8080, ChildPort: 80}},
		{"[::1]:8080:[::2]:80/udp", Spec{Proto: "udp", ParentIP: ip6, ParentPort: 8080, ChildIP: netip.MustParseAddr("::2"), ChildPort: 80}},
		{"[::1]:8080:[::1]:80/tcp6", Spec{Proto: "tcp6", ParentIP: ip6, ParentPort: 8080, ChildIP: ip6, ChildPort: 80}},
		{"8080:[::1]:80/udp6", Spec{Proto: "udp6", ParentPort: 8080, ChildIP: ip6, ChildPort: 80}},
		{"[fe80::1%eth0]:8080:80/tcp", Spec{Proto: "tcp", ParentIP: netip.MustParseAddr("fe80::1%eth0"), ParentPort: 8080, ChildPort: 80}},
		{"127.0.0.1:8080:[::1]:80/tcp", Spec{Proto: "tcp", ParentIP: ip4, ParentPort: 8080, ChildIP: ip6, ChildPort: 80}},
		{"1:65535/tcp", Spec{Proto: "tcp", ParentPort: 1, ChildPort: 65535}},
		// The family suffix is the host side's; the child may be of the
		// other (Docker's [::]:P for an IPv4 container).
		{"8080:[::1]:80/udp4", Spec{Proto: "udp4", ParentPort: 8080, ChildIP: ip6, ChildPort: 80}},
		{"[::]:8080:10.0.2.100:80/tcp6", Spec{Proto: "tcp6", ParentIP: netip.IPv6Unspecified(), ParentPort: 8080, ChildIP: netip.MustParseAddr("10.0.2.100"), ChildPort: 80}},
		{"08080:080/tcp", Spec{Proto: "tcp", ParentPort: 8080, ChildPort: 80}},
		// IPv4 addresses in brackets, as RootlessKit accepts them.
		{"[::]:8080:[127.0.0.1]:80/tcp6", Spec{Proto: "tcp6", ParentIP: netip.IPv6Unspecified(), ParentPort: 8080, ChildIP: ip4, ChildPort: 80}},
		{"[::]:8080:[127.0.0.1]:80/tcp", Spec{Proto: "tcp", ParentIP: netip.IPv6Unspecified(), ParentPort: 8080, ChildIP: ip4, ChildPort: 80}},
		{"[127.0.0.1]:8080:80/tcp", Spec{Proto: "tcp", ParentIP: ip4, ParentPort: 8080, ChildPort: 80}},
		{"8080:[10.0.2.100]:80/udp", Spec{Proto: "udp", ParentPort: 8080, ChildIP: netip.MustParseAddr("10.0.2.100"), ChildPort: 80}},
	}
	for _, tc := range good {
		got, err := ParseSpec(tc.in)
		if err != nil {
			t.Errorf("ParseSpec(%q): %v", tc.in, err)
			continue
		}
		if got != tc.want {
			t.Errorf("ParseSpec(%q) = %+v, want %+v", tc.in, got, tc.want)
		}
		if again, err := ParseSpec(got.String()); err != nil || again != got {
			t.Errorf("ParseSpec(%q.String() = %q) = %+v, %v; want it back", tc.in, got.String(), again, err)
		}
	}

	bad := []struct{ in, want string }{
		{"", "missing /PROTO"},
		{"8080:80", "missing /PROTO"},
		{"127.0.0.1:8080:80", "missing /PROTO"},
		{"8080:80/", `unknown protocol ""`},
		{"8080:80/sctp", `unknown protocol "sctp"`},
		{"8080:80/TCP", `unknown protocol "TCP"`},
		{"8080/tcp", "at least PARENTPORT:CHILDPORT"},
		{"0:80/tcp", "parent port 0 is out of range"},
		{"8080:0/tcp", "child port 0 is out of range"},
		{"65536:80/tcp", "parent port 65536 is out of range"},
		{"8080:65536/tcp", "child port 65536 is out of range"},
		{"8080:99999999999999999999/tcp", "out of range"},
		{"-1:80/tcp", `parent port "-1" is not a number`},
		{"127.0.0.1:+80:80/tcp", `parent port "+80" is not a number`},
		{"8080:foo:80/tcp", `child IP "foo" is not an IP address`},
		{"localhost:8080:80/tcp", `parent IP "localhost" is not an IP address`},
		{"::1:8080:80/tcp", "put IPv6 addresses in brackets"},
		{"1:2:3:4:5/tcp", "at most 4"},
		{"[::1:8080:80/tcp", "without a closing ']'"},
		{"[::1]8080:80/tcp", "after ']'"},
		{"[::1]:[8080]:80/tcp", "brackets are only for addresses"},
		{"[127.0.0.1]:8080:80/tcp6", "parent IP 127.0.0.1 is IPv4 but the protocol is tcp6"},
		{"[::1]:8080:80/tcp4", "parent IP ::1 is IPv6 but the protocol is tcp4"},
		{"127.0.0.1:8080:80/tcp6", "parent IP 127.0.0.1 is IPv4 but the protocol is tcp6"},
		{"[::ffff:127.0.0.1]:8080:80/tcp", "IPv4-mapped"},
		{":8080:80/tcp", "empty parent IP"},
		{"127.0.0.1::80/tcp", "empty parent port"},
		{"127.0.0.1:8080::80/tcp", "empty child IP"},
		{"[fe80::1%a/b]:8080:80/tcp", "not an interface name"},
		{"8080:tcp", `"tcp" is a protocol, not a port: it goes after a slash, as in 8080:80/tcp`},
		{"127.0.0.1:8080:udp6", "as in 127.0.0.1:8080:80/udp6"},
	}
	for _, tc := range bad {
		_, err := ParseSpec(tc.in)
		if err == nil {
			t.Errorf("ParseSpec(%q) succeeded, want an error containing %q", tc.in, tc.want)
			continue
		}
		msg := err.Error()
		if !errors.Is(err, ErrInvalidSpec) || !strings.Contains(msg, tc.want) || !strings.Contains(msg, Grammar) || !strings.Contains(msg, `"`+tc.in+`"`) {
			t.Errorf("ParseSpec(%q): %q; want ErrInvalidSpec naming the input, %q and the grammar", tc.in, msg, tc.want)
		}
		if strings.Count(msg, ErrInvalidSpec.Error()) != 1 {
			t.Errorf("ParseSpec(%q): %q says %q more than once", tc.in, msg, ErrInvalidSpec)
		}
	}
}

func TestSpecJSON(t *testing.T) {
	for _, tc := range []struct {
		spec Spec
		json string
	}{
		{Spec{Proto: "tcp", ParentIP: ip4, ParentPort: 8080, ChildPort: 80},
			`{"proto":"tcp","parentIP":"127.0.0.1","parentPort":8080,"childPort":80}`},
		{Spec{Proto: "tcp6", ParentIP: ip6, ParentPort: 8080, ChildIP: ip6, ChildPort: 80},
			`{"proto":"tcp6","parentIP":"::1","parentPort":8080,"childIP":"::1","childPort":80}`},
		{Spec{Proto: "udp", ParentPort: 53, ChildPort: 53},
			`{"proto":"udp","parentPort":53,"childPort":53}`},
	} {
		b, err := json.Marshal(tc.spec)
		if err != nil || string(b) != tc.json {
			t.Errorf("Marshal(%+v) = %s, %v; want %s", tc.spec, b, err, tc.json)
		}
		var back Spec
		if err := json.Unmarshal([]byte(tc.json), &back); err != nil || back != tc.spec {
			t.Errorf("Unmarshal(%s) = %+v, %v; want %+v", tc.json, back, err, tc.spec)
		}
	}
	// RootlessKit clients may send empty strings for omitted addresses.
	var s Spec
	if err := json.Unmarshal([]byte(`{"proto":"tcp","parentIP":"","parentPort":1,"childIP":"","childPort":2}`), &s); err != nil || s.ParentIP.IsValid() || s.ChildIP.IsValid() {
		t.Errorf("empty IP strings: %+v, %v; want zero addresses", s, err)
	}
	b, _ := json.Marshal(Status{ID: 3, Spec: Spec{Proto: "udp4", ParentPort: 5, ChildPort: 6}})
	if want := `{"id":3,"spec":{"proto":"udp4","parentPort":5,"childPort":6}}`; string(b) != want {
		t.Errorf("Status JSON %s, want %s", b, want)
	}
}

func TestSpecDefaults(t *testing.T) {
	for _, tc := range []struct {
		spec           string
		network, laddr string
		child          string
	}{
		{"8080:80/tcp", "tcp", ":8080", "127.0.0.1:80"},
		{"8080:80/tcp4", "tcp4", "0.0.0.0:8080", "127.0.0.1:80"},
		{"8080:80/tcp6", "tcp6", "[::]:8080", "[::1]:80"},
		{"8080:80/udp", "udp", ":8080", "127.0.0.1:80"},
		{"8080:80/udp6", "udp6", "[::]:8080", "[::1]:80"},
		// RootlessKit's (and Go's) rule: the unspecified address with tcp
		// or udp is both families; tcp4 and tcp6 pick one.
		{"0.0.0.0:8080:80/tcp", "tcp", ":8080", "127.0.0.1:80"},
		{"[::]:8080:80/udp", "udp", ":8080", "127.0.0.1:80"},
		{"0.0.0.0:8080:80/tcp4", "tcp4", "0.0.0.0:8080", "127.0.0.1:80"},
		{"[::]:8080:80/tcp6", "tcp6", "[::]:8080", "[::1]:80"},
		{"[::1]:8080:80/tcp", "tcp6", "[::1]:8080", "127.0.0.1:80"},
		{"127.0.0.1:8080:10.0.2.100:80/udp", "udp4", "127.0.0.1:8080", "10.0.2.100:80"},
	} {
		s, err := ParseSpec(tc.spec)
		if err != nil {
			t.Fatal(err)
		}
		if n, a, c := s.ListenNetwork(), hostPort(s.ListenAddr()), s.ChildAddr().String(); n != tc.network || a != tc.laddr || c != tc.child {
			t.Errorf("%s: listen %s %s, child %s; want %s %s, %s", tc.spec, n, a, c, tc.network, tc.laddr, tc.child)
		}
	}
}

func TestSpecOverlaps(t *testing.T) {
	for _, tc := range []struct {
		a, b string
		want bool
	}{
		{"127.0.0.1:80:80/tcp", "127.0.0.1:80:81/tcp", true},
		{"127.0.0.1:80:80/tcp", "127.0.0.1:80:80/tcp4", true},
		{"80:80/tcp", "127.0.0.1:80:80/tcp4", true},
		{"80:80/tcp", "[::1]:80:80/tcp6", true},
		{"80:80/tcp", "80:80/tcp4", true},
		{"80:80/tcp4", "80:80/tcp6", false},
		{"80:80/tcp4", "[::1]:80:80/tcp", false},
		{"0.0.0.0:80:80/tcp", "127.0.0.2:80:80/tcp4", true},
		{"0.0.0.0:80:80/tcp", "[::1]:80:80/tcp6", true},
		{"0.0.0.0:80:80/tcp4", "[::1]:80:80/tcp6", false},
		{"127.0.0.1:80:80/tcp", "127.0.0.2:80:80/tcp", false},
		{"127.0.0.1:80:80/tcp", "127.0.0.1:81:80/tcp", false},
		{"80:80/tcp", "80:80/udp", false},
		{"80:80/udp", "127.0.0.1:80:80/udp4", true},
		{"[::]:80:80/udp6", "[::1]:80:80/udp", true},
	} {
		a, errA := ParseSpec(tc.a)
		b, errB := ParseSpec(tc.b)
		if errA != nil || errB != nil {
			t.Fatal(errA, errB)
		}
		if got := a.Overlaps(b); got != tc.want || b.Overlaps(a) != got {
			t.Errorf("%s overlaps %s: %v (and back %v), want %v", tc.a, tc.b, got, b.Overlaps(a), tc.want)
		}
	}
}

// ParseSpecDefaultTCP: Docker's -p, the protocol optional.
func TestParseSpecDefaultTCP(t *testing.T) {
	for in, want := range map[string]Spec{
		"8080:80":                {Proto: "tcp", ParentPort: 8080, ChildPort: 80},
		"127.0.0.1:8080:80":      {Proto: "tcp", ParentIP: ip4, ParentPort: 8080, ChildPort: 80},
		"[::1]:8080:[::1]:80":    {Proto: "tcp", ParentIP: ip6, ParentPort: 8080, ChildIP: ip6, ChildPort: 80},
		"8080:80/udp":            {Proto: "udp", ParentPort: 8080, ChildPort: 80},
		"127.0.0.1:53:53/udp4":   {Proto: "udp4", ParentIP: ip4, ParentPort: 53, ChildPort: 53},
		"[::1]:8080:80/tcp6":     {Proto: "tcp6", ParentIP: ip6, ParentPort: 8080, ChildPort: 80},
		"0.0.0.0:8080:8080/tcp4": {Proto: "tcp4", ParentIP: ipAny, ParentPort: 8080, ChildPort: 8080},
	} {
		got, err := ParseSpecDefaultTCP(in)
		if err != nil || got != want {
			t.Errorf("ParseSpecDefaultTCP(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	for in, want := range map[string]string{
		"8080":     "at least PARENTPORT:CHILDPORT",
		"8080:tcp": `"tcp" is a protocol, not a port`,
		"8080:80/": `unknown protocol ""`,
	} {
		_, err := ParseSpecDefaultTCP(in)
		if err == nil || !errors.Is(err, ErrInvalidSpec) || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), GrammarDefaultTCP) {
			t.Errorf("ParseSpecDefaultTCP(%q): %v; want ErrInvalidSpec with %q and the grammar", in, err, want)
		}
	}
}

func FuzzParseSpec(f *testing.F) {
	for _, s := range []string{
		"8080:80/tcp", "127.0.0.1:8080:80/tcp", "127.0.0.1:8080:10.0.2.100:80/udp4",
		"[::1]:8080:[::1]:80/tcp6", "8080:[::1]:80/udp6", "[fe80::1%eth0]:1:2/tcp",
		"0:0/tcp", "65536:1/udp", "[::1:80/tcp", "::1:8080:80/tcp", "a:b:c:d:e/tcp", "/", "[]:1:2/tcp",
		"[::ffff:1.2.3.4]:1:2/tcp", "1:2/tcp/udp", "[%]:1:2/tcp",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		spec, err := ParseSpec(s)
		if err != nil {
			if !errors.Is(err, ErrInvalidSpec) || !strings.Contains(err.Error(), Grammar) {
				t.Fatalf("ParseSpec(%q): error %q does not wrap ErrInvalidSpec or show the grammar", s, err)
			}
			return
		}
		if err := spec.Validate(); err != nil {
			t.Fatalf("ParseSpec(%q) = %+v, which Validate rejects: %v", s, spec, err)
		}
		again, err := ParseSpec(spec.String())
		if err != nil || again != spec {
			t.Fatalf("ParseSpec(%q) = %+v; its String %q parses to %+v, %v", s, spec, spec.String(), again, err)
		}
		b, err := json.Marshal(spec)
		if err != nil {
			t.Fatal(err)
		}
		var back Spec
		if err := json.Unmarshal(b, &back); err != nil || back != spec {
			t.Fatalf("JSON %s of %+v comes back as %+v, %v", b, spec, back, err)
		}
		_ = spec.ListenAddr()
		_ = spec.ChildAddr()
	})
}

// hostPort formats a listen address as net.Listen takes it: the zero
// address is ":PORT" (all addresses, both families).
func hostPort(ap netip.AddrPort) string {
	if !ap.Addr().IsValid() {
		return ":" + strconv.Itoa(int(ap.Port()))
	}
	return ap.String()
}
