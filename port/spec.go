package port

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// Grammar is the form of a publish spec, for messages and help texts.
const Grammar = "[PARENTIP:]PARENTPORT[:CHILDIP]:CHILDPORT/PROTO"

// GrammarDefaultTCP is the form ParseSpecDefaultTCP takes: Docker's, the
// protocol optional.
const GrammarDefaultTCP = "[PARENTIP:]PARENTPORT[:CHILDIP]:CHILDPORT[/PROTO]"

// grammarHelp ends every spec parse error.
func grammarHelp(grammar string) string {
	return "want " + grammar + " with PROTO one of tcp, tcp4, tcp6, udp, udp4, udp6 and IPv6 addresses in brackets, e.g. 8080:80/tcp, 127.0.0.1:8080:80/tcp or [::1]:8080:[::1]:80/tcp6"
}

// ErrInvalidSpec is wrapped by every error about a malformed or inconsistent
// publish spec.
var ErrInvalidSpec = errors.New("invalid port spec")

// Protos lists the protocols a Spec may name.
var Protos = []string{"tcp", "tcp4", "tcp6", "udp", "udp4", "udp6"}

// Spec says which host port to publish and where it leads inside the
// namespace. Its JSON is RootlessKit's port.Spec. A zero ParentIP means the
// unspecified address (both IPv4 and IPv6 for tcp and udp, 0.0.0.0 for tcp4
// and udp4, :: for tcp6 and udp6); a zero ChildIP means 127.0.0.1 (::1 for
// tcp6 and udp6).
type Spec struct {
	Proto      string     `json:"proto,omitempty"`
	ParentIP   netip.Addr `json:"parentIP,omitzero"`
	ParentPort int        `json:"parentPort,omitempty"`
	ChildIP    netip.Addr `json:"childIP,omitzero"`
	ChildPort  int        `json:"childPort,omitempty"`
}

// Status is one published port. Its JSON is RootlessKit's port.Status,
// plus gonetns's implicit flag (which RootlessKit's clients ignore).
type Status struct {
	ID   int  `json:"id"`
	Spec Spec `json:"spec"`
	// Implicit marks a port published by the implicit port driver because
	// something listens on it inside (see Implicit).
	Implicit bool `json:"implicit,omitempty"`
}

// ParseSpec parses [PARENTIP:]PARENTPORT[:CHILDIP]:CHILDPORT/PROTO, the
// grammar of RootlessKit's --publish and rootlessctl add-ports (which,
// unlike ParseSpec, require PARENTIP). IPv6 addresses go in brackets
// ([::1]:8080:[::1]:80/tcp6); IPv4 ones may ([127.0.0.1]:80). The result
// has passed Validate.
func ParseSpec(s string) (Spec, error) {
	return parse(s, "", Grammar)
}

// ParseSpecDefaultTCP is ParseSpec with the protocol optional, tcp when
// left out, as Docker's -p takes 8080:80.
func ParseSpecDefaultTCP(s string) (Spec, error) {
	return parse(s, "tcp", GrammarDefaultTCP)
}

func parse(s, defaultProto, grammar string) (Spec, error) {
	spec, err := parseSpec(s, defaultProto)
	if err == nil {
		err = spec.Validate()
	}
	if err != nil {
		return Spec{}, fmt.Errorf("%w %q: %w; %s", ErrInvalidSpec, s, unwrapInvalid(err), grammarHelp(grammar))
	}
	return spec, nil
}

// unwrapInvalid strips the ErrInvalidSpec prefix Validate puts on its
// errors, so that ParseSpec says it once.
func unwrapInvalid(err error) error {
	var v *validationError
	if errors.As(err, &v) {
		return v.reason
	}
	return err
}

// field is one colon-separated part of a spec; bracketed parts are
// addresses (IPv6 ones must be bracketed, IPv4 ones may be).
type field struct {
	text      string
	bracketed bool
}

func parseSpec(s, defaultProto string) (Spec, error) {
	slash := strings.LastIndexByte(s, '/')
	if slash < 0 {
		// 8080:tcp: a protocol where a port was expected.
		if i := strings.LastIndexByte(s, ':'); i >= 0 && validProto(s[i+1:]) {
			return Spec{}, fmt.Errorf("%q is a protocol, not a port: it goes after a slash, as in %s:80/%s", s[i+1:], s[:i], s[i+1:])
		}
		if defaultProto == "" {
			return Spec{}, errors.New("missing /PROTO at the end")
		}
		s, slash = s+"/"+defaultProto, len(s)
	}
	spec := Spec{Proto: s[slash+1:]}
	if !validProto(spec.Proto) {
		return Spec{}, fmt.Errorf("unknown protocol %q", spec.Proto)
	}
	fields, err := splitFields(s[:slash])
	if err != nil {
		return Spec{}, err
	}
	var parentIP, parentPort, childIP, childPort *field
	switch len(fields) {
	case 2:
		parentPort, childPort = &fields[0], &fields[1]
	case 3:
		// PARENTIP:PARENTPORT:CHILDPORT or PARENTPORT:CHILDIP:CHILDPORT. A
		// port is all digits and an address never is, so the first field
		// decides.
		if fields[0].bracketed || !allDigits(fields[0].text) {
			parentIP, parentPort, childPort = &fields[0], &fields[1], &fields[2]
		} else {
			parentPort, childIP, childPort = &fields[0], &fields[1], &fields[2]
		}
	case 4:
		parentIP, parentPort, childIP, childPort = &fields[0], &fields[1], &fields[2], &fields[3]
	default:
		if len(fields) < 2 {
			return Spec{}, errors.New("need at least PARENTPORT:CHILDPORT before /PROTO")
		}
		return Spec{}, fmt.Errorf("%d colon-separated parts, at most 4 allowed (put IPv6 addresses in brackets)", len(fields))
	}
	if parentIP != nil {
		if spec.ParentIP, err = parseIP("parent IP", *parentIP); err != nil {
			return Spec{}, err
		}
	}
	if childIP != nil {
		if spec.ChildIP, err = parseIP("child IP", *childIP); err != nil {
			return Spec{}, err
		}
	}
	if spec.ParentPort, err = parsePort("parent port", *parentPort); err != nil {
		return Spec{}, err
	}
	if spec.ChildPort, err = parsePort("child port", *childPort); err != nil {
		return Spec{}, err
	}
	return spec, nil
}

// splitFields splits s at colons outside brackets.
func splitFields(s string) ([]field, error) {
	var fields []field
	for {
		var f field
		if strings.HasPrefix(s, "[") {
			end := strings.IndexByte(s, ']')
			if end < 0 {
				return nil, errors.New("'[' without a closing ']'")
			}
			f = field{text: s[1:end], bracketed: true}
			s = s[end+1:]
			if s != "" && s[0] != ':' {
				return nil, fmt.Errorf("%q after ']', want ':'", s)
			}
		} else {
			end := strings.IndexByte(s, ':')
			if end < 0 {
				end = len(s)
			}
			f = field{text: s[:end]}
			s = s[end:]
		}
		fields = append(fields, f)
		if s == "" {
			return fields, nil
		}
		s = s[1:] // the ':'
	}
}

func allDigits(s string) bool {
	for _, c := range s {
		if c < '0' || c > '9' {
			return false
		}
	}
	return s != ""
}

func parseIP(what string, f field) (netip.Addr, error) {
	if f.text == "" {
		return netip.Addr{}, fmt.Errorf("empty %s", what)
	}
	ip, err := netip.ParseAddr(f.text)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("%s %q is not an IP address", what, f.text)
	}
	// Brackets are needed around IPv6 addresses and allowed around IPv4
	// ones, as RootlessKit's parser allows them (-p
	// [::]:8080:[127.0.0.1]:80/tcp6 forwards IPv6 clients to an IPv4
	// server inside).
	if !f.bracketed && ip.Is6() {
		// Unreachable through splitFields (the colons split it), kept for
		// safety.
		return netip.Addr{}, fmt.Errorf("%s %s is IPv6: put it in brackets", what, f.text)
	}
	return ip, nil
}

func parsePort(what string, f field) (int, error) {
	if f.bracketed {
		return 0, fmt.Errorf("%s [%s]: brackets are only for addresses", what, f.text)
	}
	if f.text == "" {
		return 0, fmt.Errorf("empty %s", what)
	}
	if !allDigits(f.text) {
		return 0, fmt.Errorf("%s %q is not a number", what, f.text)
	}
	p, err := strconv.ParseUint(f.text, 10, 16)
	if err != nil || p == 0 {
		return 0, fmt.Errorf("%s %s is out of range 1..65535", what, f.text)
	}
	return int(p), nil
}

func validProto(p string) bool {
	for _, q := range Protos {
		if p == q {
			return true
		}
	}
	return false
}

// validationError carries Validate's reason; it matches ErrInvalidSpec.
type validationError struct {
	reason error
}

func (e *validationError) Error() string { return ErrInvalidSpec.Error() + ": " + e.reason.Error() }
func (e *validationError) Unwrap() error { return e.reason }
func (e *validationError) Is(target error) bool {
	return target == ErrInvalidSpec
}

// Validate checks a spec that did not come from ParseSpec (a REST request,
// a literal): known protocol, ports in 1..65535, a parent IP of the family
// the protocol names (tcp4, tcp6: the family of the host's side; the child
// IP may be of either, as with RootlessKit: Docker publishes [::]:P for an
// IPv4 container), no IPv4-mapped IPv6 addresses. Its errors wrap
// ErrInvalidSpec.
func (s Spec) Validate() error {
	if err := s.validate(); err != nil {
		return &validationError{reason: err}
	}
	return nil
}

func (s Spec) validate() error {
	if s.Proto == "" {
		return fmt.Errorf("missing protocol, want one of %s", strings.Join(Protos, ", "))
	}
	if !validProto(s.Proto) {
		return fmt.Errorf("unknown protocol %q, want one of %s", s.Proto, strings.Join(Protos, ", "))
	}
	if s.ParentPort < 1 || s.ParentPort > 65535 {
		return fmt.Errorf("parent port %d is out of range 1..65535", s.ParentPort)
	}
	if s.ChildPort < 1 || s.ChildPort > 65535 {
		return fmt.Errorf("child port %d is out of range 1..65535", s.ChildPort)
	}
	if err := checkAddr("parent IP", s.ParentIP); err != nil {
		return err
	}
	if err := checkAddr("child IP", s.ChildIP); err != nil {
		return err
	}
	ip := s.ParentIP
	switch {
	case !ip.IsValid():
	case strings.HasSuffix(s.Proto, "4") && !ip.Is4():
		return fmt.Errorf("parent IP %s is IPv6 but the protocol is %s: use %s6 or an IPv4 address", ip, s.Proto, s.Proto[:3])
	case strings.HasSuffix(s.Proto, "6") && !ip.Is6():
		return fmt.Errorf("parent IP %s is IPv4 but the protocol is %s: use %s4 or an IPv6 address", ip, s.Proto, s.Proto[:3])
	}
	return nil
}

// checkAddr refuses addresses a socket cannot be given as they are.
func checkAddr(what string, ip netip.Addr) error {
	if !ip.IsValid() {
		return nil
	}
	if z := ip.Zone(); z != "" && !validZone(z) {
		return fmt.Errorf("%s %s: zone %q is not an interface name", what, ip, z)
	}
	if ip.Is4In6() {
		return fmt.Errorf("%s %s is IPv4-mapped IPv6: write it as %s", what, ip, ip.Unmap())
	}
	return nil
}

// validZone accepts what can name a network interface (or its index):
// 1 to 15 printable ASCII bytes, no '/', '%', brackets or spaces.
func validZone(z string) bool {
	if len(z) > 15 {
		return false
	}
	for i := 0; i < len(z); i++ {
		c := z[i]
		if c <= ' ' || c >= 0x7f || strings.IndexByte("/%[]", c) >= 0 {
			return false
		}
	}
	return true
}

// String formats s in the ParseSpec grammar, IPv6 addresses in brackets;
// ParseSpec(s.String()) gives s back for a valid s.
func (s Spec) String() string {
	var b strings.Builder
	writeIP := func(ip netip.Addr) {
		if ip.Is6() {
			b.WriteString("[" + ip.String() + "]:")
		} else {
			b.WriteString(ip.String() + ":")
		}
	}
	if s.ParentIP.IsValid() {
		writeIP(s.ParentIP)
	}
	b.WriteString(strconv.Itoa(s.ParentPort) + ":")
	if s.ChildIP.IsValid() {
		writeIP(s.ChildIP)
	}
	b.WriteString(strconv.Itoa(s.ChildPort) + "/" + s.Proto)
	return b.String()
}

// Transport is "tcp" or "udp".
func (s Spec) Transport() string { return s.Proto[:3] }

// ListenNetwork and ListenAddr are what the host listener binds. With no
// parent IP, or an unspecified one (0.0.0.0 or ::), "tcp" and "udp" bind
// both families on one dual-stack socket, as RootlessKit's builtin driver
// does (Go's behaviour, documented in its docs/port.md): tcp4 and tcp6
// (udp4, udp6) are the way to bind one family. A specific parent IP binds
// its own family.
func (s Spec) ListenNetwork() string {
	switch {
	case !s.ParentIP.IsValid() || s.ParentIP.IsUnspecified():
		return s.Proto
	case s.ParentIP.Is4():
		return s.Transport() + "4"
	default:
		return s.Transport() + "6"
	}
}

func (s Spec) ListenAddr() netip.AddrPort {
	ip := s.ParentIP
	switch {
	case strings.HasSuffix(s.Proto, "6") && !ip.IsValid():
		ip = netip.IPv6Unspecified()
	case strings.HasSuffix(s.Proto, "4") && !ip.IsValid():
		ip = netip.IPv4Unspecified()
	case s.Proto == "tcp" || s.Proto == "udp":
		if ip.IsUnspecified() {
			// ":PORT", which Go binds dual-stack.
			ip = netip.Addr{}
		}
	}
	return netip.AddrPortFrom(ip, uint16(s.ParentPort))
}

// ChildAddr is the address the child dials inside the namespace.
func (s Spec) ChildAddr() netip.AddrPort {
	ip := s.ChildIP
	if !ip.IsValid() {
		if strings.HasSuffix(s.Proto, "6") {
			ip = netip.IPv6Loopback()
		} else {
			ip = netip.AddrFrom4([4]byte{127, 0, 0, 1})
		}
	}
	return netip.AddrPortFrom(ip, uint16(s.ChildPort))
}

// families is the set of address families a spec's listener covers: 4, 6
// or both.
func (s Spec) families() (v4, v6 bool) {
	switch s.ListenNetwork() {
	case "tcp4", "udp4":
		return true, false
	case "tcp6", "udp6":
		return false, true
	default:
		return true, true
	}
}

// Overlaps reports whether s and o would listen on the same transport port
// for an address both cover: tcp on all addresses and tcp4 on 127.0.0.1
// overlap, tcp4 and tcp6 do not, tcp and udp never do.
func (s Spec) Overlaps(o Spec) bool {
	if s.Transport() != o.Transport() || s.ParentPort != o.ParentPort {
		return false
	}
	s4, s6 := s.families()
	o4, o6 := o.families()
	if !(s4 && o4) && !(s6 && o6) {
		return false
	}
	a, b := s.ParentIP, o.ParentIP
	if !a.IsValid() || !b.IsValid() || a.IsUnspecified() || b.IsUnspecified() {
		return true
	}
	return a == b
}
