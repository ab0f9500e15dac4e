package implicit

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
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

	nlmsgHdrLen    = 16 // struct nlmsghdr
	inetDiagReqLen = 56 // struct inet_diag_req_v2
	inetDiagMsgLen = 72 // struct inet_diag_msg

	// Attributes of an inet_diag_msg (enum in linux/inet_diag.h).
	inetDiagSKV6Only = 11 // u8: IPV6_V6ONLY, for AF_INET6 sockets in LISTEN or CLOSE
	inetDiagSockopt  = 22 // struct inet_diag_sockopt (Linux 5.10+)

	// sockoptTransparent is IP_TRANSPARENT in the first byte of struct
	// inet_diag_sockopt (bit fields from the least significant bit:
	// recverr, is_icsk, freebind, hdrincl, mc_loop, transparent, ...).
	sockoptTransparent = 1 << 5

	// nlaTypeMask strips the nested and byte-order flags off an
	// attribute's type (NLA_TYPE_MASK).
	nlaTypeMask = 0x3fff
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

// diagRequest encodes a dump request: nlmsghdr then inet_diag_req_v2.
// Netlink headers are in host byte order.
func diagRequest(seq uint32, q diagQuery) []byte {
	b := make([]byte, nlmsgHdrLen+inetDiagReqLen)
	ne := binary.NativeEndian
	ne.PutUint32(b[0:], uint32(len(b)))
	ne.PutUint16(b[4:], sockDiagByFamily)
	ne.PutUint16(b[6:], unix.NLM_F_REQUEST|unix.NLM_F_DUMP)
	ne.PutUint32(b[8:], seq)
	// b[12:16] pid 0: the kernel fills it in.
	r := b[nlmsgHdrLen:]
	r[0] = q.family // sdiag_family
	r[1] = q.proto  // sdiag_protocol
	// r[2] idiag_ext: no extensions wanted; the v6only and sockopt
	// attributes come without asking.
	ne.PutUint32(r[4:], q.states)
	// r[8:56]: inet_diag_sockid, all zero (no filter on addresses).
	return b
}

// errDiagDump wraps the errno of a dump the kernel refused.
var errDiagDump = errors.New("sock_diag dump failed")

// parseDiagDump parses one datagram of a sock_diag dump answering the
// request with sequence number seq, and appends the listening sockets it
// describes to out. done is true at the end of the dump (NLMSG_DONE).
// Messages of other sequence numbers (a dump abandoned earlier) are
// skipped; anything malformed is an error, as is a dump the kernel ended
// with an error (wrapping the errno).
func parseDiagDump(b []byte, proto string, seq uint32, out []Listener) (_ []Listener, done bool, err error) {
	ne := binary.NativeEndian
	for len(b) > 0 {
		if len(b) < nlmsgHdrLen {
			return out, false, fmt.Errorf("sock_diag: %d trailing bytes, shorter than a netlink header", len(b))
		}
		n := int(ne.Uint32(b[0:]))
		typ := ne.Uint16(b[4:])
		mseq := ne.Uint32(b[8:])
		if n < nlmsgHdrLen || n > len(b) {
			return out, false, fmt.Errorf("sock_diag: netlink message length %d, with %d bytes left", n, len(b))
		}
		payload := b[nlmsgHdrLen:n]
		// Messages are padded to 4 bytes; the last one may not be.
		adv := min(nlmAlign(n), len(b))
		b = b[adv:]
		if mseq != seq {
			continue
		}
		switch typ {
		case unix.NLMSG_DONE, unix.NLMSG_ERROR:
			if len(payload) < 4 {
				return out, false, fmt.Errorf("sock_diag: netlink message type %d without its error code", typ)
			}
			if e := int32(ne.Uint32(payload)); e < 0 {
				return out, false, fmt.Errorf("%w: %w", errDiagDump, syscall.Errno(-e))
			}
			if typ == unix.NLMSG_DONE {
				return out, true, nil
			}
		case sockDiagByFamily:
			l, ok, err := parseDiagMsg(payload, proto)
			if err != nil {
				return out, false, err
			}
			if ok {
				out = append(out, l)
			}
		default:
			// NLMSG_NOOP and the like.
		}
	}
	return out, false, nil
}

func nlmAlign(n int) int { return (n + 3) &^ 3 }

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
	attrs := b[inetDiagMsgLen:]
	for len(attrs) >= 4 {
		n := int(binary.NativeEndian.Uint16(attrs[0:]))
		typ := binary.NativeEndian.Uint16(attrs[2:]) & nlaTypeMask
		if n < 4 || n > len(attrs) {
			return Listener{}, false, fmt.Errorf("sock_diag: attribute length %d, with %d bytes left", n, len(attrs))
		}
		v := attrs[4:n]
		switch typ {
		case inetDiagSKV6Only:
			l.V6Only = len(v) >= 1 && v[0] != 0
		case inetDiagSockopt:
			transparent = len(v) >= 1 && v[0]&sockoptTransparent != 0
		}
		attrs = attrs[min(nlmAlign(n), len(attrs)):]
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
// thread uses it later. Not safe for concurrent use.
type sockDiag struct {
	fd  int
	seq uint32
	buf []byte
}

// diagRecvTimeout bounds one receive: the kernel answers a dump at once,
// so this only keeps a kernel that never answers from hanging the watcher
// (and the child's shutdown) for good.
const diagRecvTimeout = 5 * time.Second

// openSockDiag creates the netlink socket with create, which runs its
// argument in the namespace to scan.
func openSockDiag(create func(fn func() error) error) (*sockDiag, error) {
	fd := -1
	err := create(func() error {
		var err error
		fd, err = unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("open a sock_diag netlink socket: %w", err)
	}
	tv := unix.NsecToTimeval(diagRecvTimeout.Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("sock_diag socket: set its receive timeout: %w", err)
	}
	// 32 KiB is what the kernel puts in one datagram of a dump at most
	// (NLMSG_GOODSIZE is a page, the dump skb up to 32 KiB).
	return &sockDiag{fd: fd, buf: make([]byte, 64<<10)}, nil
}

// Listeners returns the namespace's listeners, sorted, in out's storage.
func (d *sockDiag) Listeners(out []Listener) ([]Listener, error) {
	out = out[:0]
	for _, q := range listenerQueries {
		var err error
		if out, err = d.dump(q, out); err != nil {
			return out, err
		}
	}
	slices.SortFunc(out, compareListeners)
	return slices.CompactFunc(out, func(a, b Listener) bool { return a == b }), nil
}

func (d *sockDiag) dump(q diagQuery, out []Listener) ([]Listener, error) {
	proto := "tcp"
	if q.proto == unix.IPPROTO_UDP {
		proto = "udp"
	}
	d.seq++
	kernel := &unix.SockaddrNetlink{Family: unix.AF_NETLINK}
	if err := unix.Sendto(d.fd, diagRequest(d.seq, q), 0, kernel); err != nil {
		return out, fmt.Errorf("sock_diag: request the %s sockets: %w", proto, err)
	}
	for {
		n, _, flags, _, err := unix.Recvmsg(d.fd, d.buf, nil, 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return out, fmt.Errorf("sock_diag: read the %s sockets: %w", proto, err)
		}
		if flags&unix.MSG_TRUNC != 0 {
			return out, fmt.Errorf("sock_diag: a datagram of the %s dump was larger than %d bytes", proto, len(d.buf))
		}
		var done bool
		if out, done, err = parseDiagDump(d.buf[:n], proto, d.seq, out); err != nil {
			return out, err
		}
		if done {
			return out, nil
		}
	}
}

// Close closes the netlink socket.
func (d *sockDiag) Close() error { return unix.Close(d.fd) }
