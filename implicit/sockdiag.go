package implicit

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/netlink"
)

// Listener is a socket that accepts traffic in the sandbox's network
// namespace: a TCP socket in the LISTEN state, or a UDP socket that is
// bound to a port and not connected (what `ss -lntu` lists). It is what
// the implicit port driver publishes.
type Listener struct {
	// Proto is "tcp" or "udp".
	Proto string `json:"proto"`
	// Addr is the address and port the socket is bound to; the address
	// is unspecified (0.0.0.0 or ::) for all addresses of its family.
	Addr netip.AddrPort `json:"addr"`
	// V6Only is set for an IPv6 socket that refuses IPv4 (IPV6_V6ONLY);
	// an IPv6 socket on :: without it also takes IPv4 (dual stack).
	V6Only bool `json:"v6only,omitempty"`
}

func (l Listener) String() string {
	s := l.Proto + " " + l.Addr.String()
	if l.Addr.Addr().Is6() && !l.Addr.Addr().Is4In6() && !l.V6Only && l.Addr.Addr().IsUnspecified() {
		s += " (dual stack)"
	}
	return s
}

func compareListeners(a, b Listener) int {
	return cmp.Or(cmp.Compare(a.Proto, b.Proto), a.Addr.Compare(b.Addr), cmpBool(a.V6Only, b.V6Only))
}

func cmpBool(a, b bool) int {
	switch {
	case a == b:
		return 0
	case a:
		return 1
	}
	return -1
}

// The sock_diag interface (linux/sock_diag.h, linux/inet_diag.h): one
// request dumps the sockets of one family and protocol whose state is in a
// bit mask, filtered in the kernel, so a namespace with thousands of
// connections costs no more to scan than one with none (the kernel skips
// the established-connection table when only LISTEN is asked for).
const (
	sockDiagByFamily = 20 // SOCK_DIAG_BY_FAMILY

	// Socket states (include/net/tcp_states.h). A UDP socket is TCP_CLOSE
	// until it is connected (TCP_ESTABLISHED).
	stateClose  = 7
	stateListen = 10

	inetDiagReqLen = 56 // struct inet_diag_req_v2
	inetDiagMsgLen = 72 // struct inet_diag_msg

	// Attributes of an inet_diag_msg (enum in linux/inet_diag.h).
	inetDiagSKV6Only = 11 // u8: IPV6_V6ONLY, for AF_INET6 sockets in LISTEN or CLOSE
	inetDiagSockopt  = 22 // struct inet_diag_sockopt (Linux 5.10+)

	// sockoptTransparent is IP_TRANSPARENT in the first byte of struct
	// inet_diag_sockopt (bit fields from the least significant bit:
	// recverr, is_icsk, freebind, hdrincl, mc_loop, transparent, ...).
	sockoptTransparent = 1 << 5
)

// diagQuery is one dump: a family, a protocol and the states wanted.
type diagQuery struct {
	family uint8
	proto  uint8
	states uint32
}

// listenerQueries are the four dumps of one scan: TCP sockets in LISTEN
// and unconnected UDP sockets, IPv4 and IPv6.
var listenerQueries = []diagQuery{
	{unix.AF_INET, unix.IPPROTO_TCP, 1 << stateListen},
	{unix.AF_INET6, unix.IPPROTO_TCP, 1 << stateListen},
	{unix.AF_INET, unix.IPPROTO_UDP, 1 << stateClose},
	{unix.AF_INET6, unix.IPPROTO_UDP, 1 << stateClose},
}

// diagRequest encodes the body of a dump request: struct
// inet_diag_req_v2, in host byte order.
func diagRequest(q diagQuery) []byte {
	r := make([]byte, inetDiagReqLen)
	r[0] = q.family // sdiag_family
	r[1] = q.proto  // sdiag_protocol
	// r[2] idiag_ext: no extensions wanted; the v6only and sockopt
	// attributes come without asking.
	binary.NativeEndian.PutUint32(r[4:], q.states)
	// r[8:56]: inet_diag_sockid, all zero (no filter on addresses).
	return r
}

// errDiagDump wraps the errno of a dump the kernel refused.
var errDiagDump = errors.New("sock_diag dump failed")

// parseDiagDump parses one datagram of a sock_diag dump answering the
// request with sequence number seq, and appends the listening sockets it
// describes to out. done is true at the end of the dump (NLMSG_DONE).
// Messages of other sequence numbers (a dump abandoned earlier) are
// skipped; anything malformed is an error, as is a dump the kernel ended
// with an error (wrapping the errno and errDiagDump).
func parseDiagDump(b []byte, proto string, seq uint32, out []Listener) (_ []Listener, done bool, err error) {
	done, err = netlink.ParseAnswer(b, seq, func(m netlink.Message) (bool, error) {
		var err error
		out, err = appendDiagMsg(m, proto, out)
		return false, err
	})
	return out, done, diagError(err)
}

// appendDiagMsg appends the listener a message of a dump describes, if it
// is one.
func appendDiagMsg(m netlink.Message, proto string, out []Listener) ([]Listener, error) {
	if m.Type != sockDiagByFamily {
		return out, nil // an acknowledgement and the like
	}
	l, ok, err := parseDiagMsg(m.Data, proto)
	if ok {
		out = append(out, l)
	}
	return out, err
}

// diagError marks the errno of a dump the kernel ended with an error.
func diagError(err error) error {
	var errno unix.Errno
	if errors.As(err, &errno) {
		return fmt.Errorf("%w: %w", errDiagDump, errno)
	}
	return err
}

// parseDiagMsg parses one inet_diag_msg with its attributes. ok is false
// for a socket that is not a listener (a state the request did not ask
// for, port 0, or one of IP_TRANSPARENT UDP; see below).
func parseDiagMsg(b []byte, proto string) (l Listener, ok bool, err error) {
	if len(b) < inetDiagMsgLen {
		return Listener{}, false, fmt.Errorf("sock_diag: socket record of %d bytes, want at least %d", len(b), inetDiagMsgLen)
	}
	family, state := b[0], b[1]
	// inet_diag_sockid at b[4:52]: ports and addresses in network byte
	// order.
	port := binary.BigEndian.Uint16(b[4:])
	var addr netip.Addr
	switch family {
	case unix.AF_INET:
		addr = netip.AddrFrom4([4]byte(b[8:12]))
	case unix.AF_INET6:
		addr = netip.AddrFrom16([16]byte(b[8:24]))
	default:
		return Listener{}, false, fmt.Errorf("sock_diag: socket of address family %d, want %d or %d", family, unix.AF_INET, unix.AF_INET6)
	}
	l = Listener{Proto: proto, Addr: netip.AddrPortFrom(addr, port)}
	var transparent bool
	err = netlink.Attrs(b[inetDiagMsgLen:], func(typ uint16, v []byte) {
		switch typ {
		case inetDiagSKV6Only:
			l.V6Only = len(v) >= 1 && v[0] != 0
		case inetDiagSockopt:
			transparent = len(v) >= 1 && v[0]&sockoptTransparent != 0
		}
	})
	if err != nil {
		return Listener{}, false, fmt.Errorf("sock_diag: %w", err)
	}
	switch {
	case proto == "tcp" && state != stateListen, proto == "udp" && state != stateClose:
		return Listener{}, false, nil
	case port == 0:
		return Listener{}, false, nil
	case proto == "udp" && transparent:
		// An unconnected UDP socket with IP_TRANSPARENT is a relay's
		// (gonetns's own, for client source addresses, between its bind
		// and its connect), not a server: servers do not need it.
		return Listener{}, false, nil
	}
	return l, true, nil
}

// sockDiag scans a network namespace for listeners over a NETLINK_SOCK_DIAG
// socket, which belongs to the namespace it was created in whichever
// thread uses it later.
type sockDiag struct {
	nl *netlink.Conn
}

// openSockDiag creates the netlink socket with create, which runs its
// argument in the namespace to scan.
func openSockDiag(create func(fn func() error) error) (*sockDiag, error) {
	var nl *netlink.Conn
	err := create(func() error {
		var err error
		nl, err = netlink.Open(unix.NETLINK_SOCK_DIAG)
		return err
	})
	if err != nil {
		return nil, err
	}
	return &sockDiag{nl: nl}, nil
}

// Listeners returns the namespace's listeners, sorted, in out's storage.
func (d *sockDiag) Listeners(out []Listener) ([]Listener, error) {
	out = out[:0]
	for _, q := range listenerQueries {
		proto := "tcp"
		if q.proto == unix.IPPROTO_UDP {
			proto = "udp"
		}
		err := d.nl.Dump(sockDiagByFamily, diagRequest(q), func(m netlink.Message) error {
			var err error
			out, err = appendDiagMsg(m, proto, out)
			return err
		})
		if err != nil {
			return out, fmt.Errorf("sock_diag: list the %s sockets: %w", proto, diagError(err))
		}
	}
	slices.SortFunc(out, compareListeners)
	return slices.CompactFunc(out, func(a, b Listener) bool { return a == b }), nil
}

// Close closes the netlink socket.
func (d *sockDiag) Close() error { return d.nl.Close() }
