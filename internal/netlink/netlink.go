// Package netlink is gonetns's one netlink client: a socket of one
// protocol (rtnetlink, netfilter, sock_diag) in the network namespace it
// was opened in, with the three exchanges gonetns needs (Request: a change
// the kernel acknowledges; Get: a question answered by one message; Dump:
// a question answered by many), each bounded by a receive timeout and
// refusing a truncated datagram rather than parsing half of it. The
// message bodies (links, addresses, rules, conntrack tuples, socket
// records) are encoded and decoded by the packages that own them, with the
// attribute helpers here.
package netlink

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// RecvTimeout bounds each receive of an exchange. The kernel answers at
// once (a dump of thousands of sockets took under 3 ms here), so this only
// keeps a kernel that never answers from hanging a caller, and the child's
// shutdown behind it, for good.
const RecvTimeout = 5 * time.Second

// recvBufSize holds any datagram the kernel sends: a dump puts at most
// 32 KiB in one (its skb grows up to that, NLMSG_GOODSIZE being a page),
// and a single answer is far smaller.
const recvBufSize = 64 << 10

// ErrTimeout is wrapped by the error of an exchange the kernel did not
// answer within RecvTimeout.
var ErrTimeout = errors.New("no answer from the kernel")

// ErrTruncated is wrapped by the error of an exchange whose answer did not
// fit the receive buffer.
var ErrTruncated = errors.New("netlink datagram truncated")

// Conn is a netlink socket. It belongs to the network namespace of the
// thread that opened it, and every exchange applies there whichever thread
// makes it later. Exchanges are serialized, so a Conn is safe for
// concurrent use; after Close they fail.
type Conn struct {
	what string // for errors: "rtnetlink", "netfilter netlink", "sock_diag"
	mu   sync.Mutex
	fd   int // -1 once closed
	seq  uint32
	buf  []byte

	timeout time.Duration // for errors: SO_RCVTIMEO
}

// Protocol names for errors.
var protoNames = map[int]string{
	unix.NETLINK_ROUTE:     "rtnetlink",
	unix.NETLINK_NETFILTER: "netfilter netlink",
	unix.NETLINK_SOCK_DIAG: "sock_diag",
}

// Open opens a netlink socket of proto (unix.NETLINK_ROUTE,
// NETLINK_NETFILTER, NETLINK_SOCK_DIAG, ...) in the calling thread's
// network namespace.
func Open(proto int) (*Conn, error) {
	what := protoNames[proto]
	if what == "" {
		what = fmt.Sprintf("netlink protocol %d", proto)
	}
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		return nil, fmt.Errorf("open a %s socket: %w", what, err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("bind a %s socket: %w", what, err)
	}
	c := &Conn{what: what, fd: fd, buf: make([]byte, recvBufSize)}
	if err := c.setRecvTimeout(RecvTimeout); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return c, nil
}

func (c *Conn) setRecvTimeout(d time.Duration) error {
	tv := unix.NsecToTimeval(d.Nanoseconds())
	if err := unix.SetsockoptTimeval(c.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return fmt.Errorf("%s socket: set its receive timeout: %w", c.what, err)
	}
	c.timeout = d
	return nil
}

// Close closes the socket; idempotent.
func (c *Conn) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.fd >= 0 {
		unix.Close(c.fd)
		c.fd = -1
	}
	return nil
}

// Request sends one message of type typ with flags (NLM_F_REQUEST and
// NLM_F_ACK are added) and waits for its acknowledgement. A refusal comes
// back as the kernel's errno (unix.Errno; errors.Is(err, fs.ErrExist) for
// NLM_F_EXCL on something that exists).
func (c *Conn) Request(typ, flags uint16, body []byte) error {
	return c.exchange(typ, flags|unix.NLM_F_ACK, body, func(m Message) (bool, error) {
		return m.Type == unix.NLMSG_ERROR, nil // anything but the acknowledgement is skipped
	})
}

// Get sends a request that the kernel answers with one message (no
// acknowledgement asked for) and returns that message's body.
func (c *Conn) Get(typ uint16, body []byte) ([]byte, error) {
	var data []byte
	err := c.exchange(typ, 0, body, func(m Message) (bool, error) {
		if m.Type == unix.NLMSG_ERROR {
			return true, fmt.Errorf("%s acknowledged a request that wants an answer", c.what)
		}
		data = m.Data
		return true, nil
	})
	return data, err
}

// Dump sends a dump request (NLM_F_DUMP is added) and calls fn with each
// message of the answer up to NLMSG_DONE; fn's error ends the dump (the
// rest of it is skipped by the next exchange). m.Data is only valid during
// the call. A dump the kernel ends with an error returns its errno.
func (c *Conn) Dump(typ uint16, body []byte, fn func(m Message) error) error {
	return c.exchange(typ, unix.NLM_F_DUMP, body, func(m Message) (bool, error) {
		if m.Type == unix.NLMSG_ERROR {
			return false, nil // an acknowledgement does not end a dump; NLMSG_DONE does
		}
		return false, fn(m)
	})
}

// exchange sends one message and hands each message of the answer with
// its sequence number to answer until answer says it is done, or until an
// acknowledgement, an error or NLMSG_DONE ends the exchange. Late answers
// to earlier exchanges are skipped.
func (c *Conn) exchange(typ, flags uint16, body []byte, answer func(Message) (done bool, err error)) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.fd < 0 {
		return fmt.Errorf("the %s socket is closed", c.what)
	}
	c.seq++
	seq := c.seq
	msg := make([]byte, unix.NLMSG_HDRLEN, unix.NLMSG_HDRLEN+len(body))
	ne := binary.NativeEndian
	ne.PutUint32(msg[0:], uint32(unix.NLMSG_HDRLEN+len(body)))
	ne.PutUint16(msg[4:], typ)
	ne.PutUint16(msg[6:], flags|unix.NLM_F_REQUEST)
	ne.PutUint32(msg[8:], seq)
	// msg[12:16], the port id, 0: the kernel's.
	msg = append(msg, body...)
	if err := unix.Sendto(c.fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("%s: send: %w", c.what, err)
	}
	for {
		n, _, rflags, _, err := unix.Recvmsg(c.fd, c.buf, nil, 0)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return fmt.Errorf("%s: %w within %v", c.what, ErrTimeout, c.timeout)
		case err != nil:
			return fmt.Errorf("%s: receive: %w", c.what, err)
		case rflags&unix.MSG_TRUNC != 0:
			return fmt.Errorf("%s: %w: larger than %d bytes", c.what, ErrTruncated, len(c.buf))
		}
		done, err := ParseAnswer(c.buf[:n], seq, answer)
		if err != nil {
			return fmt.Errorf("%s: %w", c.what, err)
		}
		if done {
			return nil
		}
	}
}

// Message is one netlink message: its header's type and flags, and its
// body.
type Message struct {
	Type  uint16
	Flags uint16
	Data  []byte
}

// ErrMalformed is wrapped by the errors of a datagram that does not parse.
var ErrMalformed = errors.New("malformed netlink message")

// ParseAnswer parses one datagram of the answer to the exchange with
// sequence number seq, and calls answer with each message of that sequence
// number until answer reports done: the messages of the answer and an
// acknowledgement (NLMSG_ERROR with code 0, whose Data is the code and the
// request echoed), which answer decides about. NLMSG_NOOP is skipped. An
// NLMSG_ERROR with a code, or an NLMSG_DONE carrying one (a dump the
// kernel broke off), returns the errno; NLMSG_DONE with code 0 ends the
// exchange (done). Messages of other sequence numbers (answers to an
// exchange given up on) are skipped; anything malformed is an error
// wrapping ErrMalformed.
func ParseAnswer(b []byte, seq uint32, answer func(Message) (done bool, err error)) (done bool, err error) {
	ne := binary.NativeEndian
	for len(b) > 0 {
		if len(b) < unix.NLMSG_HDRLEN {
			return false, fmt.Errorf("%w: %d trailing bytes, shorter than a netlink header", ErrMalformed, len(b))
		}
		n := int(ne.Uint32(b[0:]))
		if n < unix.NLMSG_HDRLEN || n > len(b) {
			return false, fmt.Errorf("%w: netlink message length %d, with %d bytes left", ErrMalformed, n, len(b))
		}
		m := Message{Type: ne.Uint16(b[4:]), Flags: ne.Uint16(b[6:]), Data: b[unix.NLMSG_HDRLEN:n]}
		mseq := ne.Uint32(b[8:])
		// Messages are padded to 4 bytes; the last one may not be.
		b = b[min(Align(n), len(b)):]
		if mseq != seq || m.Type == unix.NLMSG_NOOP {
			continue
		}
		if m.Type == unix.NLMSG_ERROR || m.Type == unix.NLMSG_DONE {
			if len(m.Data) < 4 {
				return false, fmt.Errorf("%w: netlink message type %d without its error code", ErrMalformed, m.Type)
			}
			if code := int32(ne.Uint32(m.Data)); code < 0 {
				return false, unix.Errno(-code)
			}
			if m.Type == unix.NLMSG_DONE {
				return true, nil
			}
		}
		if done, err := answer(m); done || err != nil {
			return done, err
		}
	}
	return false, nil
}

// Align rounds n up to netlink's 4-byte alignment (NLMSG_ALIGN, NLA_ALIGN).
func Align(n int) int { return (n + 3) &^ 3 }
