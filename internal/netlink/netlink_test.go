package netlink

import (
	"encoding/binary"
	"errors"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// msg builds one netlink message, padded to 4 bytes.
func msg(typ uint16, seq uint32, payload []byte) []byte {
	n := unix.NLMSG_HDRLEN + len(payload)
	b := make([]byte, Align(n))
	binary.NativeEndian.PutUint32(b[0:], uint32(n))
	binary.NativeEndian.PutUint16(b[4:], typ)
	binary.NativeEndian.PutUint32(b[8:], seq)
	copy(b[unix.NLMSG_HDRLEN:], payload)
	return b
}

func code(errno syscall.Errno) []byte {
	return binary.NativeEndian.AppendUint32(nil, uint32(-int32(errno)))
}

func TestParseAnswer(t *testing.T) {
	const seq = 9
	const data = 100 // a message type of an answer
	tests := []struct {
		name    string
		in      []byte
		stopAt  int // answer reports done at this message (1-based); 0: never
		want    []string
		done    bool
		wantErr string
		errno   syscall.Errno
	}{
		{name: "messages then done", in: slices.Concat(msg(data, seq, []byte("a")), msg(data, seq, []byte("bc")), msg(unix.NLMSG_DONE, seq, code(0))),
			want: []string{"a", "bc"}, done: true},
		{name: "done without a code", in: msg(unix.NLMSG_DONE, seq, nil), wantErr: "without its error code"},
		{name: "done with an errno", in: slices.Concat(msg(data, seq, []byte("a")), msg(unix.NLMSG_DONE, seq, code(syscall.ENOENT))),
			want: []string{"a"}, errno: syscall.ENOENT},
		{name: "error", in: msg(unix.NLMSG_ERROR, seq, code(syscall.EPERM)), errno: syscall.EPERM},
		{name: "an ack goes to answer", in: slices.Concat(msg(unix.NLMSG_ERROR, seq, code(0)), msg(data, seq, []byte("x"))),
			want: []string{"\x00\x00\x00\x00", "x"}},
		{name: "answer ends it", in: slices.Concat(msg(data, seq, []byte("a")), msg(data, seq, []byte("b"))), stopAt: 1,
			want: []string{"a"}, done: true},
		{name: "other sequence numbers and noops skipped",
			in:   slices.Concat(msg(data, seq-1, []byte("old")), msg(unix.NLMSG_ERROR, seq-1, code(syscall.EIO)), msg(unix.NLMSG_NOOP, seq, nil), msg(data, seq, []byte("new"))),
			want: []string{"new"}},
		{name: "last message unpadded", in: msg(data, seq, []byte("a"))[:unix.NLMSG_HDRLEN+1], want: []string{"a"}},
		{name: "empty", in: nil},
		{name: "trailing bytes", in: []byte{1, 2, 3}, wantErr: "shorter than a netlink header"},
		{name: "length beyond the datagram", in: msg(data, seq, make([]byte, 20))[:30], wantErr: "netlink message length 36"},
		{name: "length below a header", in: slices.Concat([]byte{8, 0, 0, 0}, msg(data, seq, nil)[4:]), wantErr: "netlink message length 8"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got []string
			done, err := ParseAnswer(tt.in, seq, func(m Message) (bool, error) {
				got = append(got, string(m.Data))
				return len(got) == tt.stopAt, nil
			})
			switch {
			case tt.errno != 0:
				if !errors.Is(err, tt.errno) {
					t.Fatalf("error %v, want %v", err, tt.errno)
				}
			case tt.wantErr != "":
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !errors.Is(err, ErrMalformed) {
					t.Fatalf("error %v, want ErrMalformed with %q", err, tt.wantErr)
				}
			case err != nil:
				t.Fatal(err)
			}
			if done != tt.done {
				t.Errorf("done = %v, want %v", done, tt.done)
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("messages %q, want %q", got, tt.want)
			}
		})
	}
}

func TestAttrs(t *testing.T) {
	b := AppendAttr(nil, 1, []byte("abc"))
	b = AppendUint32Attr(b, 2|unix.NLA_F_NESTED, 7)
	b = AppendAttr(b, 3, nil)
	if len(b) != 8+8+4 {
		t.Fatalf("%d bytes, want 20 (padded): %x", len(b), b)
	}
	var types []uint16
	if err := Attrs(b, func(typ uint16, _ []byte) { types = append(types, typ) }); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(types, []uint16{1, 2, 3}) {
		t.Errorf("types %v, want [1 2 3] (the nested flag stripped)", types)
	}
	if got := FindAttr(b, 2); binary.NativeEndian.Uint32(got) != 7 {
		t.Errorf("FindAttr(2) = %x", got)
	}
	if got := FindAttr(b, 1); string(got) != "abc" {
		t.Errorf("FindAttr(1) = %q", got)
	}
	if got := FindAttr(b, 4); got != nil {
		t.Errorf("FindAttr(4) = %x, want nil", got)
	}
	bad := slices.Concat(b, []byte{200, 0, 5, 0, 1})
	if err := Attrs(bad, func(uint16, []byte) {}); err == nil || !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), "attribute length 200") {
		t.Errorf("an attribute past the end: %v", err)
	}
	if got := FindAttr(bad, 3); got == nil {
		t.Error("FindAttr lost an attribute before the malformed one")
	}
}

// The real kernel, in the test's own network namespace (no privileges
// needed: lo is there to ask about).
func TestGetDumpRequest(t *testing.T) {
	c, err := Open(unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ifi := unix.IfInfomsg{Family: unix.AF_UNSPEC}
	lo := AppendAttr(StructBytes(&ifi), unix.IFLA_IFNAME, []byte("lo\x00"))
	reply, err := c.Get(unix.RTM_GETLINK, lo)
	if err != nil {
		t.Fatal(err)
	}
	if len(reply) < unix.SizeofIfInfomsg || binary.NativeEndian.Uint32(reply[4:]) != 1 {
		t.Fatalf("lo's answer %x does not say index 1", reply)
	}
	if name := FindAttr(reply[unix.SizeofIfInfomsg:], unix.IFLA_IFNAME); string(name) != "lo\x00" {
		t.Errorf("IFLA_IFNAME %q, want lo", name)
	}

	var names []string
	err = c.Dump(unix.RTM_GETLINK, StructBytes(&ifi), func(m Message) error {
		if m.Type != unix.RTM_NEWLINK || len(m.Data) < unix.SizeofIfInfomsg {
			t.Errorf("a dumped message of type %d, %d bytes", m.Type, len(m.Data))
			return nil
		}
		names = append(names, strings.TrimSuffix(string(FindAttr(m.Data[unix.SizeofIfInfomsg:], unix.IFLA_IFNAME)), "\x00"))
		return nil
	})
	if err != nil || !slices.Contains(names, "lo") {
		t.Fatalf("dump of the links: %q, %v", names, err)
	}
	// The dump's end was consumed: the next exchange is answered as itself.
	if _, err := c.Get(unix.RTM_GETLINK, lo); err != nil {
		t.Fatalf("Get after a dump: %v", err)
	}

	// A refusal comes back as the kernel's errno.
	missing := AppendAttr(StructBytes(&ifi), unix.IFLA_IFNAME, []byte("gonetns-none\x00"))
	if _, err := c.Get(unix.RTM_GETLINK, missing); !errors.Is(err, unix.ENODEV) {
		t.Errorf("Get of a missing link: %v, want ENODEV", err)
	}
	// A change the kernel refuses (of a link that does not exist: ENODEV
	// for root, EPERM for anyone else) is its errno, not an
	// acknowledgement.
	none := unix.IfInfomsg{Family: unix.AF_UNSPEC, Index: 1 << 30}
	if err := c.Request(unix.RTM_NEWLINK, 0, StructBytes(&none)); !errors.Is(err, unix.ENODEV) && !errors.Is(err, unix.EPERM) {
		t.Errorf("RTM_NEWLINK of a link that does not exist: %v, want ENODEV (or EPERM unprivileged)", err)
	}

	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Get(unix.RTM_GETLINK, lo); err == nil || !strings.Contains(err.Error(), "closed") {
		t.Errorf("Get after Close: %v", err)
	}
	c.Close() // idempotent
}

// A message the kernel never answers (a control message type, with no
// acknowledgement asked for) ends in ErrTimeout, not a hang.
func TestRecvTimeout(t *testing.T) {
	c, err := Open(unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.setRecvTimeout(50 * time.Millisecond); err != nil {
		t.Fatal(err)
	}
	_, err = c.Get(unix.NLMSG_NOOP, nil)
	if !errors.Is(err, ErrTimeout) {
		t.Fatalf("Get of a message the kernel ignores: %v, want ErrTimeout", err)
	}
}

// An answer larger than the buffer is an error, not half an answer.
func TestTruncated(t *testing.T) {
	c, err := Open(unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.buf = make([]byte, 64) // lo's answer is several hundred bytes
	ifi := unix.IfInfomsg{Family: unix.AF_UNSPEC, Index: 1}
	if _, err := c.Get(unix.RTM_GETLINK, StructBytes(&ifi)); !errors.Is(err, ErrTruncated) {
		t.Fatalf("Get with a 64-byte buffer: %v, want ErrTruncated", err)
	}
}

func FuzzParseAnswer(f *testing.F) {
	for _, b := range [][]byte{
		slices.Concat(msg(100, 9, []byte("a")), msg(unix.NLMSG_DONE, 9, code(0))),
		msg(unix.NLMSG_ERROR, 9, code(syscall.EPERM)), msg(unix.NLMSG_DONE, 9, nil), {1, 2, 3},
		AppendAttr(msg(100, 9, nil), 1, []byte("x")),
	} {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		n := 0
		done, err := ParseAnswer(b, 9, func(m Message) (bool, error) {
			n++
			Attrs(m.Data, func(uint16, []byte) {})
			return false, nil
		})
		if done && err != nil {
			t.Fatalf("done with an error: %v", err)
		}
		if n > len(b)/unix.NLMSG_HDRLEN {
			t.Fatalf("%d messages from %d bytes", n, len(b))
		}
	})
}
