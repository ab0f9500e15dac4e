package dns

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
)

// fakeExchanger plays an upstream without a network. mode picks the
// behaviour; raw feeds the modes that return arbitrary bytes.
type fakeExchanger struct {
	mode uint8
	raw  []byte
}

const fakeModes = 8

func (f fakeExchanger) exchange(_ context.Context, network string, _ netip.AddrPort, query []byte) ([]byte, error) {
	switch f.mode % fakeModes {
	case 0:
		return nil, errors.New("fake upstream unreachable")
	case 1:
		return append([]byte(nil), f.raw...), nil
	case 2:
		// Arbitrary bytes under the query's ID and flags.
		r := append([]byte(nil), f.raw...)
		if len(r) >= 4 && len(query) >= 4 {
			copy(r, query[:2])
			r[2] |= 0x80
		}
		return r, nil
	}
	var q mdns.Msg
	if err := q.Unpack(query); err != nil {
		return nil, err
	}
	m := new(mdns.Msg)
	m.SetReply(&q)
	name := "x."
	if len(q.Question) > 0 {
		name = q.Question[0].Name
	}
	hdr := func(t uint16) mdns.RR_Header {
		return mdns.RR_Header{Name: name, Rrtype: t, Class: mdns.ClassINET, Ttl: 60}
	}
	switch f.mode % fakeModes {
	case 3:
		m.Answer = []mdns.RR{&mdns.A{Hdr: hdr(mdns.TypeA), A: net.IPv4(192, 0, 2, 1)}}
	case 4:
		// Big, and truncated over UDP like a real server.
		m.Answer = []mdns.RR{&mdns.TXT{Hdr: hdr(mdns.TypeTXT), Txt: bigTXT}}
		if network == udp {
			m.Truncated = true
			m.Answer = nil
		}
	case 5:
		m.Rcode = mdns.RcodeServerFailure
		if len(f.raw) > 0 && f.raw[0]&1 == 1 {
			m.Rcode = mdns.RcodeRefused
		}
	case 6:
		// Big and not truncated, even over UDP: a server that ignores the
		// client's size.
		m.Answer = []mdns.RR{&mdns.TXT{Hdr: hdr(mdns.TypeTXT), Txt: bigTXT}}
	case 7:
		// The records of raw, if it parses, under the right header.
		var x mdns.Msg
		if x.Unpack(f.raw) == nil {
			m.Answer, m.Ns, m.Extra, m.Rcode = x.Answer, x.Ns, x.Extra, x.Rcode
		}
	}
	if opt := q.IsEdns0(); opt != nil && m.IsEdns0() == nil {
		m.SetEdns0(4096, opt.Do())
	}
	return m.Pack()
}

func newFakeForwarder(ex exchanger) *forwarder {
	return &forwarder{
		ex: ex,
		upstreams: []netip.AddrPort{
			netip.MustParseAddrPort("127.0.0.1:53"),
			netip.MustParseAddrPort("[::1]:53"),
		},
		timeout: time.Second,
		log:     slog.New(slog.DiscardHandler),
	}
}

func seedQueries(t testing.TB) [][]byte {
	var out [][]byte
	add := func(m *mdns.Msg) {
		b, err := m.Pack()
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, b)
	}
	add(query("a.example.", mdns.TypeA))
	q := query("big.example.", mdns.TypeTXT)
	q.SetEdns0(1232, true)
	add(q)
	q = query("a.example.", mdns.TypeAAAA)
	q.CheckingDisabled = true
	q.SetEdns0(4096, true)
	add(q)
	add(query("_sip._tcp.example.", mdns.TypeSRV))
	add(query("example.", mdns.TypeAXFR))
	return out
}

// FuzzQuery feeds arbitrary client datagrams (and arbitrary upstream
// behaviour) to the query-handling path and checks that it never panics
// and that whatever it answers is a well-formed reply to that query.
func FuzzQuery(f *testing.F) {
	for i, b := range seedQueries(f) {
		for mode := range uint8(fakeModes) {
			f.Add(b, mode, []byte{byte(i)})
		}
	}
	f.Add([]byte{1, 2, 3}, uint8(3), []byte{})
	f.Add([]byte{0xbe, 0xef, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xff}, uint8(3), []byte{})
	if b, err := query("a.example.", mdns.TypeA).Pack(); err == nil {
		f.Add(b, uint8(2), append(b[:2:2], 0x81, 0x80, 0, 1, 0, 5, 0, 0, 0, 0))
	}

	f.Fuzz(func(t *testing.T, query []byte, mode uint8, raw []byte) {
		fw := newFakeForwarder(fakeExchanger{mode: mode, raw: raw})
		for _, tr := range []string{udp, tcp} {
			resp := fw.handle(context.Background(), query, tr)
			checkAnswer(t, query, tr, resp)
		}
	})
}

// checkAnswer checks the invariants of handle's result for query.
func checkAnswer(t *testing.T, query []byte, tr string, resp []byte) {
	t.Helper()
	qh, err := parseHeader(query)
	if err != nil || qh.response() {
		if resp != nil {
			t.Fatalf("%s: answered %x to %x, which must be dropped", tr, resp, query)
		}
		return
	}
	if resp == nil {
		t.Fatalf("%s: no answer to a query with a header: %x", tr, query)
	}
	rh, err := parseHeader(resp)
	if err != nil {
		t.Fatalf("%s: answer %x: %v", tr, resp, err)
	}
	if rh.id != qh.id || !rh.response() {
		t.Fatalf("%s: answer ID %d QR=%v, want ID %d QR=true", tr, rh.id, rh.response(), qh.id)
	}
	if len(resp) > 0xFFFF {
		t.Fatalf("%s: answer of %d bytes", tr, len(resp))
	}
	var q mdns.Msg
	if tr == udp && q.Unpack(query) == nil {
		if size := clientUDPSize(&q); len(resp) > size {
			t.Fatalf("udp: answer of %d bytes to a client that takes %d", len(resp), size)
		}
	}
}

func TestHandle(t *testing.T) {
	seeds := seedQueries(t)
	tests := []struct {
		name  string
		query []byte
		mode  uint8
		tr    string
		check func(t *testing.T, r *mdns.Msg)
	}{
		{
			name: "answer passes through", query: seeds[0], mode: 3, tr: udp,
			check: func(t *testing.T, r *mdns.Msg) {
				if len(r.Answer) != 1 || r.Answer[0].Header().Ttl != 60 {
					t.Errorf("got %v, want the fake's A with TTL 60", r)
				}
			},
		},
		{
			name: "unreachable is SERVFAIL with OPT", query: seeds[1], mode: 0, tr: udp,
			check: func(t *testing.T, r *mdns.Msg) {
				if r.Rcode != mdns.RcodeServerFailure || r.IsEdns0() == nil || !r.IsEdns0().Do() {
					t.Errorf("got %v, want SERVFAIL with an OPT and DO", r)
				}
			},
		},
		{
			name: "TC over UDP then too big for 1232", query: seeds[1], mode: 4, tr: udp,
			check: func(t *testing.T, r *mdns.Msg) {
				if !r.Truncated || len(r.Answer) != 0 || r.IsEdns0() == nil {
					t.Errorf("got %v, want TC, no answers, OPT kept", r)
				}
			},
		},
		{
			name: "oversized UDP answer is truncated", query: seeds[0], mode: 6, tr: udp,
			check: func(t *testing.T, r *mdns.Msg) {
				if !r.Truncated || len(r.Answer) != 0 {
					t.Errorf("got %v, want TC and no answers", r)
				}
			},
		},
		{
			name: "TCP gets it whole", query: seeds[0], mode: 6, tr: tcp,
			check: func(t *testing.T, r *mdns.Msg) {
				if r.Truncated || len(r.Answer) != 1 {
					t.Errorf("got TC=%v with %d answers, want the whole answer", r.Truncated, len(r.Answer))
				}
			},
		},
		{
			name: "garbage upstream answer is SERVFAIL", query: seeds[0], mode: 1, tr: udp,
			check: func(t *testing.T, r *mdns.Msg) {
				if r.Rcode != mdns.RcodeServerFailure {
					t.Errorf("rcode %s, want SERVFAIL", rcodeString(r.Rcode))
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fw := newFakeForwarder(fakeExchanger{mode: tt.mode})
			resp := fw.handle(context.Background(), tt.query, tt.tr)
			checkAnswer(t, tt.query, tt.tr, resp)
			r := new(mdns.Msg)
			if err := r.Unpack(resp); err != nil {
				t.Fatalf("unpack answer: %v", err)
			}
			tt.check(t, r)
		})
	}
}

func TestTruncate(t *testing.T) {
	m := new(mdns.Msg)
	m.SetQuestion("big.example.", mdns.TypeTXT)
	m.Response = true
	m.Rcode = mdns.RcodeBadVers // extended: lives partly in the OPT record
	m.Answer = []mdns.RR{&mdns.TXT{Hdr: mdns.RR_Header{Name: "big.example.", Rrtype: mdns.TypeTXT, Class: mdns.ClassINET, Ttl: 5}, Txt: bigTXT}}
	m.Ns = []mdns.RR{&mdns.NS{Hdr: mdns.RR_Header{Name: "example.", Rrtype: mdns.TypeNS, Class: mdns.ClassINET, Ttl: 5}, Ns: "ns.example."}}
	m.SetEdns0(4096, true)
	b, err := m.Pack()
	if err != nil {
		t.Fatal(err)
	}

	out, err := truncate(b, 512)
	if err != nil {
		t.Fatal(err)
	}
	if len(out) > 512 {
		t.Fatalf("truncated to %d bytes, want at most 512", len(out))
	}
	var r mdns.Msg
	if err := r.Unpack(out); err != nil {
		t.Fatal(err)
	}
	if !r.Truncated || len(r.Answer) != 0 || len(r.Ns) != 0 || len(r.Question) != 1 || r.Id != m.Id {
		t.Errorf("got %v, want TC, the question, same ID, no answer or authority", &r)
	}
	if opt := r.IsEdns0(); opt == nil || !opt.Do() || r.Rcode != mdns.RcodeBadVers {
		t.Errorf("OPT %v rcode %s, want OPT with DO and BADVERS kept", opt, rcodeString(r.Rcode))
	}

	// Too small even for the question: the header alone.
	out, err = truncate(b, headerLen)
	if err != nil {
		t.Fatal(err)
	}
	if h, _ := parseHeader(out); len(out) != headerLen || !h.truncated() || h.id != m.Id {
		t.Errorf("got %x, want a bare TC header", out)
	}
}
