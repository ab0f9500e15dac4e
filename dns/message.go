package dns

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"

	mdns "github.com/miekg/dns"
)

// Sizes from RFC 1035 and RFC 6891.
const (
	headerLen = 12
	// minUDPSize is what a client without EDNS can receive over UDP.
	minUDPSize = 512
	// maxUDPSize is the largest UDP payload an IPv4 datagram can carry; an
	// EDNS size above it is clamped so the answer can still be sent.
	maxUDPSize = 65535 - 20 - 8
)

// Header flag bits (RFC 1035 section 4.1.1, RFC 4035 for AD and CD).
const (
	flagQR = 1 << 15
	flagTC = 1 << 9
	flagRD = 1 << 8
	flagCD = 1 << 4
)

var (
	errShort         = errors.New("shorter than a DNS header")
	errNotResponse   = errors.New("QR bit not set")
	errIDMismatch    = errors.New("ID does not match the query")
	errQuestionCount = errors.New("question count is not 1")
	errQuestion      = errors.New("question does not match the query")
)

// header is the fixed 12-byte start of every DNS message.
type header struct {
	id    uint16
	flags uint16
	qd    uint16
	an    uint16
	ns    uint16
	ar    uint16
}

func parseHeader(msg []byte) (header, error) {
	if len(msg) < headerLen {
		return header{}, errShort
	}
	return header{
		id:    binary.BigEndian.Uint16(msg[0:]),
		flags: binary.BigEndian.Uint16(msg[2:]),
		qd:    binary.BigEndian.Uint16(msg[4:]),
		an:    binary.BigEndian.Uint16(msg[6:]),
		ns:    binary.BigEndian.Uint16(msg[8:]),
		ar:    binary.BigEndian.Uint16(msg[10:]),
	}, nil
}

func (h header) response() bool  { return h.flags&flagQR != 0 }
func (h header) truncated() bool { return h.flags&flagTC != 0 }
func (h header) opcode() int     { return int(h.flags>>11) & 0xF }

// rcode is the 4-bit RCODE of the header, without EDNS extended bits.
func (h header) rcode() int { return int(h.flags & 0xF) }

// setID overwrites the ID of msg, which must be at least headerLen long.
func setID(msg []byte, id uint16) { binary.BigEndian.PutUint16(msg, id) }

// question parses the header and the question section of msg and nothing
// after it, so it also works on an answer that a server cut short and
// flagged TC. It returns a nil question when msg has none.
func question(msg []byte) (header, *mdns.Question, error) {
	h, err := parseHeader(msg)
	if err != nil {
		return h, nil, err
	}
	if h.qd == 0 {
		return h, nil, nil
	}
	if h.qd != 1 {
		return h, nil, errQuestionCount
	}
	// Zero the other section counts in a copy so miekg/dns stops after the
	// question.
	c := make([]byte, len(msg))
	copy(c, msg)
	clear(c[6:headerLen])
	var m mdns.Msg
	if err := m.Unpack(c); err != nil {
		return h, nil, err
	}
	if len(m.Question) != 1 {
		return h, nil, errQuestionCount
	}
	return h, &m.Question[0], nil
}

// checkReply reports whether reply answers a query with the given id and
// question: an ID match, QR set, and the same question (names compared
// case-insensitively). Error answers (anything but NOERROR and NXDOMAIN)
// may leave the question out, as some servers do for REFUSED or FORMERR.
func checkReply(id uint16, q mdns.Question, reply []byte) (header, error) {
	h, rq, err := question(reply)
	if err != nil {
		return h, err
	}
	if !h.response() {
		return h, errNotResponse
	}
	if h.id != id {
		return h, errIDMismatch
	}
	if rq == nil {
		if rc := h.rcode(); rc == mdns.RcodeSuccess || rc == mdns.RcodeNameError {
			return h, errQuestionCount
		}
		return h, nil
	}
	// Presentation-format names escape every byte outside printable ASCII,
	// so EqualFold compares them the way DNS does (ASCII case only).
	if rq.Qtype != q.Qtype || rq.Qclass != q.Qclass || !strings.EqualFold(rq.Name, q.Name) {
		return h, errQuestion
	}
	return h, nil
}

// clientUDPSize is the largest answer a UDP client can take: its EDNS
// buffer size (RFC 6891 section 6.2.5, never below 512), else 512.
func clientUDPSize(q *mdns.Msg) int {
	opt := q.IsEdns0()
	if opt == nil {
		return minUDPSize
	}
	return min(max(int(opt.UDPSize()), minUDPSize), maxUDPSize)
}

// formErr answers a query that does not parse but whose header does:
// the same ID, opcode and RD bit, QR set, RCODE FORMERR, no sections.
func formErr(query []byte) []byte {
	h, err := parseHeader(query)
	if err != nil {
		return nil
	}
	out := make([]byte, headerLen)
	setID(out, h.id)
	flags := uint16(flagQR) | h.flags&(0xF<<11|flagRD) | mdns.RcodeFormatError
	binary.BigEndian.PutUint16(out[2:], flags)
	return out
}

// errorReply is our own answer with rcode to a query that parsed: the
// question echoed, RA set, and an OPT record when the query had one
// (RFC 6891 section 7).
func errorReply(q *mdns.Msg, rcode int) []byte {
	m := new(mdns.Msg)
	m.SetRcode(q, rcode)
	m.RecursionAvailable = true
	if opt := q.IsEdns0(); opt != nil {
		m.SetEdns0(1232, opt.Do())
	}
	b, err := m.Pack()
	if err != nil {
		// The question came out of Unpack, so this is not expected; fall
		// back to a bare header rather than leaving the client waiting.
		b = make([]byte, headerLen)
		setID(b, q.Id)
		flags := uint16(flagQR) | uint16(q.Opcode&0xF)<<11 | uint16(rcode&0xF)
		if q.RecursionDesired {
			flags |= flagRD
		}
		binary.BigEndian.PutUint16(b[2:], flags)
	}
	return b
}

// truncate shrinks reply to fit size for a UDP client: TC set, question
// kept, answer and authority sections emptied, and of the additional
// section only the OPT record kept (so the client still sees the EDNS
// extended RCODE and flags). The client is expected to retry over TCP.
// The ID is taken from reply as is.
func truncate(reply []byte, size int) ([]byte, error) {
	h, err := parseHeader(reply)
	if err != nil {
		return nil, err
	}
	var m mdns.Msg
	if err := m.Unpack(reply); err != nil {
		// The answer is damaged past the question; keep what parses.
		_, q, qerr := question(reply)
		if qerr != nil {
			return truncatedHeader(h), nil
		}
		m = mdns.Msg{}
		m.Id = h.id
		m.Response = true
		m.Opcode = h.opcode()
		m.Rcode = h.rcode()
		m.Authoritative = h.flags&(1<<10) != 0
		m.RecursionDesired = h.flags&flagRD != 0
		m.RecursionAvailable = h.flags&(1<<7) != 0
		m.Zero = h.flags&(1<<6) != 0
		m.AuthenticatedData = h.flags&(1<<5) != 0
		m.CheckingDisabled = h.flags&flagCD != 0
		if q != nil {
			m.Question = []mdns.Question{*q}
		}
	}
	m.Truncated = true
	m.Answer, m.Ns = nil, nil
	var extra []mdns.RR
	if opt := m.IsEdns0(); opt != nil {
		extra = []mdns.RR{opt}
	}
	m.Extra = extra
	if b, err := m.Pack(); err == nil && len(b) <= size {
		return b, nil
	}
	// Without the OPT record; its extended RCODE bits go with it.
	m.Extra = nil
	m.Rcode &= 0xF
	if b, err := m.Pack(); err == nil && len(b) <= size {
		return b, nil
	}
	return truncatedHeader(h), nil
}

// truncatedHeader is the last resort of truncate: the header alone, TC
// set, every section empty.
func truncatedHeader(h header) []byte {
	b := make([]byte, headerLen)
	setID(b, h.id)
	binary.BigEndian.PutUint16(b[2:], h.flags|flagTC)
	return b
}

func typeString(t uint16) string {
	if s, ok := mdns.TypeToString[t]; ok {
		return s
	}
	return fmt.Sprintf("TYPE%d", t)
}

func rcodeString(rc int) string {
	if s, ok := mdns.RcodeToString[rc]; ok {
		return s
	}
	return fmt.Sprintf("RCODE%d", rc)
}
