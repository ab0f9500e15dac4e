package implicit

import (
	"cmp"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"net"
	"net/netip"
	"slices"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/netlink"
)

// Dumps recorded from Linux 6.18 on x86-64 (netlink headers are in host
// byte order: little-endian) in a new network namespace holding
// tcp4 127.0.0.1:8080, tcp6 [::]:8443 (IPV6_V6ONLY), tcp [::]:9090 (dual
// stack), udp4 0.0.0.0:5353, udp4 127.0.0.1:6000 with IP_TRANSPARENT,
// udp6 [::1]:5300, plus a TCP connection and a connected UDP socket (which
// the kernel leaves out: the requests ask for LISTEN and CLOSE only). All
// with sequence number 100.
var (
	recordedTCP4 = mustHex("7c00000014000200640000005d280000020a00001f9000007f00000100000000000000000000000000000000000000000000000000000000000000003f100000000000000000000001000000001000000000000037191900050008000000000008000f00000000000c00150001000000000000000600160052000000")
	recordedTCP6 = mustHex("8400000014000200640000005d2800000a0a000020fb00000000000000000000000000000000000000000000000000000000000000000000000000004010000000000000000000000000000000100000000000003b191900050008000000000005000b000100000008000f00000000000c001500010000000000000006001600120000008400000014000200640000005d2800000a0a0000238200000000000000000000000000000000000000000000000000000000000000000000000000004110000000000000000000000000000000100000000000003d191900050008000000000005000b000000000008000f00000000000c00150001000000000000000600160012000000")
	recordedUDP4 = mustHex("7c00000014000200640000005d2800000207000014e900000000000000000000000000000000000000000000000000000000000000000000000000004210000000000000000000000000000000000000000000003f191900050008000000000008000f00000000000c001500010000000000000006001600500000007c00000014000200640000005d28000002070000177000007f000001000000000000000000000000000000000000000000000000000000000000000043100000000000000000000000000000000000000000000043191900050008000000000008000f00000000000c00150001000000000000000600160070000000")
	recordedUDP6 = mustHex("8400000014000200640000005d2800000a07000014b4000000000000000000000000000000000001000000000000000000000000000000000000000044100000000000000000000000000000000000000000000040191900050008000000000005000b000100000008000f00000000000c00150001000000000000000600160010000000")
	recordedDone = mustHex("1400000003000200640000005d28000000000000")
	// The answer to a dump of protocol 250: NLMSG_DONE carrying -ENOENT,
	// sequence number 7.
	recordedNoProto = mustHex("1400000003000200070000005d280000feffffff")
)

func mustHex(s string) []byte {
	b, err := hex.DecodeString(s)
	if err != nil {
		panic(err)
	}
	return b
}

func cat(bs ...[]byte) []byte { return slices.Concat(bs...) }

// nlmsg builds one netlink message, padded to 4 bytes.
func nlmsg(typ uint16, seq uint32, payload []byte) []byte {
	n := unix.NLMSG_HDRLEN + len(payload)
	b := make([]byte, netlink.Align(n))
	binary.NativeEndian.PutUint32(b[0:], uint32(n))
	binary.NativeEndian.PutUint16(b[4:], typ)
	binary.NativeEndian.PutUint32(b[8:], seq)
	copy(b[unix.NLMSG_HDRLEN:], payload)
	return b
}

// diagMsg builds an inet_diag_msg with attributes (type, value pairs).
func diagMsg(family, state uint8, ap netip.AddrPort, attrs ...any) []byte {
	b := make([]byte, inetDiagMsgLen)
	b[0], b[1] = family, state
	binary.BigEndian.PutUint16(b[4:], ap.Port())
	a16 := ap.Addr().As16()
	if family == unix.AF_INET {
		copy(b[8:], ap.Addr().Unmap().AsSlice())
	} else {
		copy(b[8:], a16[:])
	}
	for i := 0; i+1 < len(attrs); i += 2 {
		v := attrs[i+1].([]byte)
		a := make([]byte, netlink.Align(4+len(v)))
		binary.NativeEndian.PutUint16(a[0:], uint16(4+len(v)))
		binary.NativeEndian.PutUint16(a[2:], uint16(attrs[i].(int)))
		copy(a[4:], v)
		b = append(b, a...)
	}
	return b
}

func errMsg(seq uint32, errno syscall.Errno) []byte {
	p := make([]byte, 4)
	binary.NativeEndian.PutUint32(p, uint32(-int32(errno)))
	return nlmsg(unix.NLMSG_ERROR, seq, p)
}

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

func TestParseDiagDump(t *testing.T) {
	const seq = 100
	listen4 := func(a string) []byte { return nlmsg(sockDiagByFamily, seq, diagMsg(unix.AF_INET, stateListen, ap(a))) }
	tests := []struct {
		name    string
		proto   string
		in      []byte
		want    []Listener
		done    bool
		wantErr string
		errno   syscall.Errno
		seq     uint32 // 0: seq
	}{
		{name: "recorded tcp4", proto: "tcp", in: cat(recordedTCP4, recordedDone), done: true,
			want: []Listener{{"tcp", ap("127.0.0.1:8080"), false}}},
		{name: "recorded tcp6: v6only and dual stack", proto: "tcp", in: recordedTCP6,
			want: []Listener{{"tcp", ap("[::]:8443"), true}, {"tcp", ap("[::]:9090"), false}}},
		{name: "recorded udp4: the IP_TRANSPARENT socket left out", proto: "udp", in: recordedUDP4,
			want: []Listener{{"udp", ap("0.0.0.0:5353"), false}}},
		{name: "recorded udp6", proto: "udp", in: cat(recordedUDP6, recordedDone), done: true,
			want: []Listener{{"udp", ap("[::1]:5300"), true}}},
		{name: "recorded done alone", proto: "udp", in: recordedDone, done: true},
		{name: "recorded error: unknown protocol", proto: "tcp", in: recordedNoProto, seq: 7, wantErr: "sock_diag dump failed", errno: syscall.ENOENT},
		{name: "recorded error of another request", proto: "tcp", in: recordedNoProto},
		{name: "NLMSG_ERROR", proto: "tcp", in: errMsg(seq, syscall.EPERM), wantErr: "operation not permitted", errno: syscall.EPERM},
		{name: "NLMSG_ERROR 0 (an ack) is no error", proto: "tcp", in: cat(errMsg(seq, 0), listen4("10.0.2.100:22")),
			want: []Listener{{"tcp", ap("10.0.2.100:22"), false}}},
		{name: "other sequence numbers skipped", proto: "tcp",
			in:   cat(nlmsg(sockDiagByFamily, seq-1, diagMsg(unix.AF_INET, stateListen, ap("1.2.3.4:1"))), errMsg(seq-1, syscall.EIO), listen4("0.0.0.0:80")),
			want: []Listener{{"tcp", ap("0.0.0.0:80"), false}}},
		{name: "NLMSG_NOOP skipped", proto: "tcp", in: cat(nlmsg(unix.NLMSG_NOOP, seq, nil), listen4("0.0.0.0:81")),
			want: []Listener{{"tcp", ap("0.0.0.0:81"), false}}},
		{name: "tcp not in LISTEN skipped", proto: "tcp",
			in: nlmsg(sockDiagByFamily, seq, diagMsg(unix.AF_INET, 1, ap("127.0.0.1:80")))},
		{name: "udp connected skipped", proto: "udp",
			in: nlmsg(sockDiagByFamily, seq, diagMsg(unix.AF_INET, 1, ap("127.0.0.1:53")))},
		{name: "port 0 skipped", proto: "udp",
			in: nlmsg(sockDiagByFamily, seq, diagMsg(unix.AF_INET, stateClose, ap("0.0.0.0:0")))},
		{name: "transparent tcp listener kept", proto: "tcp",
			in:   nlmsg(sockDiagByFamily, seq, diagMsg(unix.AF_INET, stateListen, ap("0.0.0.0:3128"), inetDiagSockopt, []byte{sockoptTransparent, 0})),
			want: []Listener{{"tcp", ap("0.0.0.0:3128"), false}}},
		{name: "nested flag on an attribute type", proto: "udp",
			in:   nlmsg(sockDiagByFamily, seq, diagMsg(unix.AF_INET6, stateClose, ap("[::]:53"), inetDiagSKV6Only|0x8000, []byte{1})),
			want: []Listener{{"udp", ap("[::]:53"), true}}},
		{name: "unknown attributes and an empty v6only", proto: "tcp",
			in:   nlmsg(sockDiagByFamily, seq, diagMsg(unix.AF_INET6, stateListen, ap("[fd00::100]:80"), 99, []byte{1, 2, 3}, inetDiagSKV6Only, []byte{})),
			want: []Listener{{"tcp", ap("[fd00::100]:80"), false}}},
		{name: "last message unpadded", proto: "tcp", in: listen4("0.0.0.0:82")[:unix.NLMSG_HDRLEN+inetDiagMsgLen],
			want: []Listener{{"tcp", ap("0.0.0.0:82"), false}}},
		{name: "listeners before an error are kept", proto: "tcp", in: cat(listen4("0.0.0.0:83"), errMsg(seq, syscall.ENOBUFS)),
			want: []Listener{{"tcp", ap("0.0.0.0:83"), false}}, wantErr: "no buffer space", errno: syscall.ENOBUFS},
		{name: "empty", proto: "tcp", in: nil},
		{name: "trailing bytes", proto: "tcp", in: []byte{1, 2, 3}, wantErr: "shorter than a netlink header"},
		{name: "length beyond the datagram", proto: "tcp", in: recordedTCP4[:100], wantErr: "netlink message length 124"},
		{name: "length below a header", proto: "tcp", in: cat([]byte{8, 0, 0, 0}, recordedDone[4:]), wantErr: "netlink message length 8"},
		{name: "done without its code", proto: "tcp", in: nlmsg(unix.NLMSG_DONE, seq, nil), wantErr: "without its error code"},
		{name: "short socket record", proto: "tcp", in: nlmsg(sockDiagByFamily, seq, make([]byte, 71)), wantErr: "socket record of 71 bytes"},
		{name: "unknown family", proto: "tcp",
			in: nlmsg(sockDiagByFamily, seq, diagMsg(unix.AF_UNIX, stateListen, ap("0.0.0.0:1"))), wantErr: "address family 1"},
		{name: "attribute longer than the record", proto: "tcp",
			in: nlmsg(sockDiagByFamily, seq, cat(diagMsg(unix.AF_INET, stateListen, ap("0.0.0.0:1")), []byte{200, 0, 11, 0, 1})), wantErr: "attribute length 200"},
		{name: "attribute shorter than its header", proto: "tcp",
			in: nlmsg(sockDiagByFamily, seq, cat(diagMsg(unix.AF_INET, stateListen, ap("0.0.0.0:1")), []byte{2, 0, 11, 0})), wantErr: "attribute length 2"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := cmp.Or(tt.seq, seq)
			got, done, err := parseDiagDump(tt.in, tt.proto, s, nil)
			if tt.wantErr == "" && err != nil || tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)) {
				t.Fatalf("error %v, want one with %q", err, tt.wantErr)
			}
			if tt.errno != 0 && (!errors.Is(err, tt.errno) || !errors.Is(err, errDiagDump)) {
				t.Errorf("error %v does not match %v and errDiagDump", err, tt.errno)
			}
			if done != tt.done {
				t.Errorf("done = %v, want %v", done, tt.done)
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("listeners\n got %v\nwant %v", got, tt.want)
			}
		})
	}
}

func TestDiagRequest(t *testing.T) {
	b := diagRequest(diagQuery{unix.AF_INET6, unix.IPPROTO_UDP, 1 << stateClose})
	want := mustHex("0a110000" + "80000000" + strings.Repeat("00", 48))
	if !slices.Equal(b, want) {
		t.Errorf("request\n got %x\nwant %x", b, want)
	}
}

// The real kernel, in this test's own network namespace (no privileges
// needed): the test's listeners are found with the right flags, its
// connected sockets are not.
func TestSockDiagListeners(t *testing.T) {
	d, err := openSockDiag(here)
	if err != nil {
		t.Fatalf("sock_diag is unavailable (the implicit port driver needs CONFIG_INET_DIAG, INET_TCP_DIAG, INET_UDP_DIAG): %v", err)
	}
	defer d.Close()
	var want []Listener
	listen := func(network, addr string, v6only bool) {
		t.Helper()
		var la net.Addr
		if strings.HasPrefix(network, "tcp") {
			l, err := net.Listen(network, addr)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Close() })
			la = l.Addr()
		} else {
			c, err := net.ListenPacket(network, addr)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { c.Close() })
			la = c.LocalAddr()
		}
		a := netip.MustParseAddrPort(la.String())
		want = append(want, Listener{network[:3], netip.AddrPortFrom(a.Addr().Unmap(), a.Port()), v6only})
		if a.Addr().Is4In6() { // not expected from Go, but keep the test honest
			t.Fatalf("%s %s came back IPv4-mapped", network, addr)
		}
	}
	listen("tcp4", "0.0.0.0:0", false)
	listen("tcp4", "127.0.0.1:0", false)
	listen("tcp6", "[::]:0", true)
	listen("tcp", ":0", false) // Go makes this dual stack
	listen("tcp6", "[::1]:0", true)
	listen("udp4", "127.0.0.1:0", false)
	listen("udp", ":0", false)
	listen("udp6", "[::1]:0", true)
	// Connected sockets, which must not show.
	srv := want[1].Addr
	tc, err := net.Dial("tcp", srv.String())
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	uc, err := net.Dial("udp", want[5].Addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer uc.Close()
	notWant := []netip.AddrPort{netip.MustParseAddrPort(tc.LocalAddr().String()), netip.MustParseAddrPort(uc.LocalAddr().String())}

	got, err := d.Listeners(nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range want {
		if !slices.Contains(got, w) {
			t.Errorf("%v missing from %v", w, got)
		}
	}
	for _, l := range got {
		if slices.Contains(notWant, l.Addr) {
			t.Errorf("a connected socket is listed: %v", l)
		}
	}
	if !slices.IsSortedFunc(got, compareListeners) {
		t.Errorf("not sorted: %v", got)
	}
	// A second scan into the same storage gives the same, as far as this
	// test's sockets go: other processes' listeners (other packages'
	// tests, run beside this one) come and go between the scans.
	again, err := d.Listeners(got[:0:0])
	mine := func(ls []Listener) []Listener {
		return slices.DeleteFunc(slices.Clone(ls), func(l Listener) bool { return !slices.Contains(want, l) })
	}
	if err != nil || !slices.Equal(mine(again), mine(got)) || !slices.IsSortedFunc(again, compareListeners) {
		t.Errorf("second scan: %v %v; the first: %v", mine(again), err, mine(got))
	}
}

func TestSockstatFingerprint(t *testing.T) {
	v4 := "sockets: used 37\nTCP: inuse 3 orphan 0 tw 313 alloc 6 mem 185\nUDP: inuse 1 mem 14\nUDPLITE: inuse 0\nRAW: inuse 0\nFRAG: inuse 0 memory 0\n"
	v6 := "TCP6: inuse 12\nUDP6: inuse 0\nUDPLITE6: inuse 0\nRAW6: inuse 0\nFRAG6: inuse 0 memory 0\n"
	tests := []struct{ in, want string }{
		{v4, "3,1,0,0,0,"},
		{v6, "12,0,0,0,0,"},
		// Memory, TIME-WAIT and allocation counts do not count.
		{strings.NewReplacer("tw 313", "tw 9", "mem 185", "mem 1", "alloc 6", "alloc 60").Replace(v4), "3,1,0,0,0,"},
		{"", ""},
		{"inuse ", ","},
		{"inuse x inuse 7", ",7,"},
		{"TCP: inuse 18446744073709551616999", "18446744073709551616999,"},
	}
	for _, tt := range tests {
		if got := string(sockstatFingerprint([]byte(tt.in), nil)); got != tt.want {
			t.Errorf("sockstatFingerprint(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

// The real counters of this test's namespace move when a listener opens.
func TestSockstatProbe(t *testing.T) {
	p, err := openSockstat(here)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	before, err := p.read(nil)
	if err != nil || len(before) == 0 {
		t.Fatalf("read: %q %v", before, err)
	}
	l, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	after, err := p.read(nil)
	if err != nil {
		t.Fatal(err)
	}
	if slices.Equal(before, after) {
		t.Errorf("a new listener left the counters at %q", after)
	}
}

func FuzzParseDiagDump(f *testing.F) {
	for _, b := range [][]byte{recordedTCP4, recordedTCP6, recordedUDP4, recordedUDP6, recordedDone, recordedNoProto,
		cat(recordedTCP4, recordedDone), errMsg(100, syscall.EPERM),
		nlmsg(sockDiagByFamily, 100, diagMsg(unix.AF_INET6, stateClose, ap("[::]:53"), inetDiagSKV6Only, []byte{1}, inetDiagSockopt, []byte{0x20, 0}))} {
		f.Add(b, false)
		f.Add(b, true)
	}
	f.Fuzz(func(t *testing.T, b []byte, udp bool) {
		proto := "tcp"
		if udp {
			proto = "udp"
		}
		got, done, err := parseDiagDump(b, proto, 100, nil)
		if err != nil && done {
			t.Fatalf("done with an error: %v", err)
		}
		for _, l := range got {
			if l.Proto != proto || !l.Addr.IsValid() || l.Addr.Port() == 0 {
				t.Fatalf("bad listener %+v from %x", l, b)
			}
		}
		sockstatFingerprint(b, nil)
	})
}
