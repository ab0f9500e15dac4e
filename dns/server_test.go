package dns

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
)

func TestNewValidates(t *testing.T) {
	ok := []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:53")}
	tests := []struct {
		name string
		cfg  Config
		want string
	}{
		{name: "no upstreams", cfg: Config{}, want: "--dns-upstream"},
		{name: "zero upstream", cfg: Config{Upstreams: []netip.AddrPort{{}}}, want: "not an IP address"},
		{name: "port 0", cfg: Config{Upstreams: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:0")}}, want: "not an IP address"},
		{name: "negative timeout", cfg: Config{Upstreams: ok, Timeout: -time.Second}, want: "negative timeout"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := New(tt.cfg)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("New: error %v, want one containing %q", err, tt.want)
			}
		})
	}
	s, err := New(Config{Upstreams: ok})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close of a server never started: %v", err)
	}
}

func TestForwardUDP(t *testing.T) {
	up := startUpstream(t, zone)
	srv := startServer(t, Config{Upstreams: []netip.AddrPort{up.addr}})

	t.Run("A keeps the upstream TTL", func(t *testing.T) {
		r := exchange(t, "udp", srv.udp, query("a.example.", mdns.TypeA))
		if r.Rcode != mdns.RcodeSuccess || len(r.Answer) != 1 {
			t.Fatalf("got rcode %s with %d answers, want NOERROR with 1:\n%v", rcodeString(r.Rcode), len(r.Answer), r)
		}
		a, ok := r.Answer[0].(*mdns.A)
		if !ok || !a.A.Equal(net.IPv4(192, 0, 2, 1)) {
			t.Fatalf("answer %v, want A 192.0.2.1", r.Answer[0])
		}
		if a.Hdr.Ttl != 1234 {
			t.Errorf("TTL %d, want the upstream's 1234", a.Hdr.Ttl)
		}
	})

	t.Run("AAAA of an A-only name is NODATA", func(t *testing.T) {
		r := exchange(t, "udp", srv.udp, query("a.example.", mdns.TypeAAAA))
		if r.Rcode != mdns.RcodeSuccess {
			t.Fatalf("rcode %s, want NOERROR (NODATA must not become NXDOMAIN)", rcodeString(r.Rcode))
		}
		if len(r.Answer) != 0 {
			t.Fatalf("answers %v, want none", r.Answer)
		}
		if len(r.Ns) != 1 || r.Ns[0].Header().Rrtype != mdns.TypeSOA {
			t.Errorf("authority %v, want the upstream's SOA", r.Ns)
		}
	})

	t.Run("unknown name is NXDOMAIN", func(t *testing.T) {
		r := exchange(t, "udp", srv.udp, query("nope.example.", mdns.TypeA))
		if r.Rcode != mdns.RcodeNameError {
			t.Fatalf("rcode %s, want NXDOMAIN", rcodeString(r.Rcode))
		}
	})

	for _, qt := range []uint16{mdns.TypeTXT, mdns.TypeMX, mdns.TypeSRV} {
		t.Run("EDNS DO CD AD and "+typeString(qt)+" reach the upstream unchanged", func(t *testing.T) {
			q := query("t.example.", qt)
			q.CheckingDisabled = true
			q.AuthenticatedData = true
			q.SetEdns0(1232, true)
			opt := q.IsEdns0()
			opt.Option = append(opt.Option,
				&mdns.EDNS0_COOKIE{Code: mdns.EDNS0COOKIE, Cookie: "0123456789abcdef"},
				&mdns.EDNS0_LOCAL{Code: 65001, Data: []byte("gonetns")})
			sent, err := q.Pack()
			if err != nil {
				t.Fatal(err)
			}
			before := len(up.queries())

			r := exchange(t, "udp", srv.udp, q)
			if r.Rcode != mdns.RcodeSuccess || len(r.Answer) != 1 || r.Answer[0].Header().Rrtype != qt {
				t.Fatalf("got %v, want one %s answer", r, typeString(qt))
			}
			if r.Id != q.Id {
				t.Errorf("answer ID %d, want the client's %d", r.Id, q.Id)
			}
			if ropt := r.IsEdns0(); ropt == nil || !ropt.Do() {
				t.Errorf("answer lost the upstream's OPT record or its DO bit: %v", r)
			}

			seen := up.queries()[before:]
			if len(seen) != 1 || seen[0].network != "udp" {
				t.Fatalf("upstream saw %d queries, want 1 over UDP", len(seen))
			}
			got := seen[0].msg
			if !got.CheckingDisabled || !got.AuthenticatedData || !got.RecursionDesired {
				t.Errorf("upstream saw CD=%v AD=%v RD=%v, want all set", got.CheckingDisabled, got.AuthenticatedData, got.RecursionDesired)
			}
			gopt := got.IsEdns0()
			if gopt == nil || !gopt.Do() || gopt.UDPSize() != 1232 || len(gopt.Option) != 2 {
				t.Fatalf("upstream saw OPT %v, want DO, size 1232 and 2 options", gopt)
			}
			// Byte for byte, apart from the ID.
			got.Id = q.Id
			gotBytes, err := got.Pack()
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(gotBytes, sent) {
				t.Errorf("upstream saw\n%x\nwant\n%x", gotBytes, sent)
			}
		})
	}
}

func TestLargeAnswer(t *testing.T) {
	up := startUpstream(t, zone)
	srv := startServer(t, Config{Upstreams: []netip.AddrPort{up.addr}})
	wantLen := 0
	for _, s := range bigTXT {
		wantLen += len(s)
	}
	checkFull := func(t *testing.T, r *mdns.Msg) {
		t.Helper()
		if r.Truncated || len(r.Answer) != 1 {
			t.Fatalf("got TC=%v with %d answers, want the full answer", r.Truncated, len(r.Answer))
		}
		txt, ok := r.Answer[0].(*mdns.TXT)
		if !ok || len(strings.Join(txt.Txt, "")) != wantLen {
			t.Fatalf("answer %T is not the %d-byte TXT", r.Answer[0], wantLen)
		}
	}
	networks := func(seen []seenQuery) []string {
		var out []string
		for _, q := range seen {
			out = append(out, q.network)
		}
		return out
	}

	t.Run("no EDNS: TC over UDP, full answer over TCP", func(t *testing.T) {
		before := len(up.queries())
		q := query("big.example.", mdns.TypeTXT)
		r := exchange(t, "udp", srv.udp, q)
		if !r.Truncated {
			t.Fatalf("UDP answer without TC: %v", r)
		}
		if len(r.Answer) != 0 || len(r.Ns) != 0 {
			t.Errorf("truncated answer keeps %d answer and %d authority records, want none", len(r.Answer), len(r.Ns))
		}
		if got := networks(up.queries()[before:]); !slices.Equal(got, []string{"udp", "tcp"}) {
			t.Errorf("upstream saw %v, want [udp tcp] (UDP, then the TCP retry after TC)", got)
		}
		checkFull(t, exchange(t, "tcp", srv.tcp, q))
	})

	t.Run("EDNS 4096: full answer over UDP", func(t *testing.T) {
		before := len(up.queries())
		q := query("big.example.", mdns.TypeTXT)
		q.SetEdns0(4096, false)
		r := exchange(t, "udp", srv.udp, q)
		checkFull(t, r)
		if r.IsEdns0() == nil {
			t.Errorf("answer lost its OPT record")
		}
		if got := networks(up.queries()[before:]); !slices.Equal(got, []string{"udp", "tcp"}) {
			t.Errorf("upstream saw %v, want [udp tcp]", got)
		}
	})

	t.Run("EDNS 1232: TC with OPT kept", func(t *testing.T) {
		q := query("big.example.", mdns.TypeTXT)
		q.SetEdns0(1232, true)
		r := exchange(t, "udp", srv.udp, q)
		if !r.Truncated || len(r.Answer) != 0 {
			t.Fatalf("got TC=%v with %d answers, want TC and none", r.Truncated, len(r.Answer))
		}
		if opt := r.IsEdns0(); opt == nil || !opt.Do() {
			t.Errorf("truncated answer lost the OPT record: %v", r)
		}
	})
}

func TestUpstreamDown(t *testing.T) {
	hole, _ := blackHole(t)
	tests := []struct {
		name     string
		upstream netip.AddrPort
	}{
		{name: "closed port", upstream: closedPort(t)},
		{name: "black hole", upstream: hole},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			logs := &recordHandler{}
			srv := startServer(t, Config{Upstreams: []netip.AddrPort{tt.upstream}, Timeout: time.Second, Logger: slog.New(logs)})
			for _, network := range []string{"udp", "tcp"} {
				addr := srv.udp
				if network == "tcp" {
					addr = srv.tcp
				}
				// The budget (Config.Timeout) ends the wait: the answer
				// comes, rather than the client's timeout.
				r := exchange(t, network, addr, query("a.example.", mdns.TypeA))
				if r.Rcode != mdns.RcodeServerFailure {
					t.Fatalf("%s: rcode %s, want SERVFAIL", network, rcodeString(r.Rcode))
				}
				if len(r.Question) != 1 || r.Question[0].Name != "a.example." {
					t.Errorf("%s: SERVFAIL without the question: %v", network, r)
				}
			}
			if n := logs.count(slog.LevelWarn); n != 1 {
				t.Errorf("%d warnings for two failed queries, want exactly 1", n)
			}
		})
	}
}

// TestOneSilentNameIsNoOutage: an upstream that answers every name but
// one it leaves unanswered (its authoritative servers silent) is no
// outage: the sandbox gets SERVFAIL for that name and answers for the
// others, and nothing is said above debug level. Each such query warned
// that every name would fail, and the next answer that the upstreams
// answered again.
func TestOneSilentNameIsNoOutage(t *testing.T) {
	up := startUpstream(t, func(w mdns.ResponseWriter, r *mdns.Msg) {
		if len(r.Question) == 1 && r.Question[0].Name == "silent.example." {
			return
		}
		zone(w, r)
	})
	logs := &recordHandler{}
	srv := startServer(t, Config{Upstreams: []netip.AddrPort{up.addr}, Timeout: 300 * time.Millisecond, Logger: slog.New(logs)})
	for range 3 {
		if r := exchange(t, "udp", srv.udp, query("a.example.", mdns.TypeA)); r.Rcode != mdns.RcodeSuccess {
			t.Fatalf("a.example.: rcode %s, want NOERROR", rcodeString(r.Rcode))
		}
		if r := exchange(t, "udp", srv.udp, query("silent.example.", mdns.TypeA)); r.Rcode != mdns.RcodeServerFailure {
			t.Fatalf("silent.example.: rcode %s, want SERVFAIL", rcodeString(r.Rcode))
		}
	}
	if w, i := logs.count(slog.LevelWarn), logs.count(slog.LevelInfo); w != 0 || i != 0 {
		t.Errorf("%d warnings and %d notes for one name left unanswered among answers; want none", w, i)
	}
}

// startSilentUpstream answers the zone but for names that start with
// "silent", which it never answers.
func startSilentUpstream(t *testing.T) *testUpstream {
	return startUpstream(t, func(w mdns.ResponseWriter, r *mdns.Msg) {
		if len(r.Question) == 1 && strings.HasPrefix(r.Question[0].Name, "silent") {
			return
		}
		zone(w, r)
	})
}

// flood sends n UDP queries to the server, for name(i), and waits until
// want of them are in flight.
func flood(t *testing.T, srv *testServer, n, want int, name func(i int) string) {
	t.Helper()
	c, err := net.Dial("udp", srv.udp)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	for i := range n {
		m := query(name(i), mdns.TypeA)
		m.Id = uint16(i + 1)
		b, _ := m.Pack()
		if _, err := c.Write(b); err != nil {
			t.Fatal(err)
		}
	}
	start := time.Now()
	for got, _ := srv.slots.stats(); got < want; got, _ = srv.slots.stats() {
		if time.Since(start) > time.Second {
			t.Fatalf("%d of %d flood queries in flight after %v", got, want, time.Since(start))
		}
		time.Sleep(time.Millisecond)
	}
}

// answeredBy asks for a.example. over UDP and wants its answer by the
// deadline.
func answeredBy(t *testing.T, srv *testServer, deadline time.Time, what string) {
	t.Helper()
	c, err := net.Dial("udp", srv.udp)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	b, _ := query("a.example.", mdns.TypeA).Pack()
	if _, err := c.Write(b); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(deadline)
	buf := make([]byte, 65535)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatalf("a name that answers, asked during %s: %v; want its answer at once", what, err)
	}
	var r mdns.Msg
	if err := r.Unpack(buf[:n]); err != nil || r.Rcode != mdns.RcodeSuccess || len(r.Answer) != 1 {
		t.Fatalf("a.example.: %v %v; want its A record", err, &r)
	}
}

// TestSilentNameHoldsFewSlots: a program asking, over and over, for a name
// no upstream answers holds maxQuestionInFlight slots, not all of them;
// other names are answered at once. Before, its 256 queries took every
// slot and a name that answers went unanswered for the 4 s budget.
func TestSilentNameHoldsFewSlots(t *testing.T) {
	srv := startServer(t, Config{Upstreams: []netip.AddrPort{startSilentUpstream(t).addr}, Logger: slog.New(slog.DiscardHandler)})
	flood(t, srv, maxInFlight, maxQuestionInFlight, func(int) string { return "silent.example." })
	time.Sleep(50 * time.Millisecond)
	if n, _ := srv.slots.stats(); n != maxQuestionInFlight {
		t.Errorf("%d queries for one silent name in flight; want %d", n, maxQuestionInFlight)
	}
	answeredBy(t, srv, time.Now().Add(time.Second), "a flood of queries for one name no upstream answers")
}

// TestSilentFloodYieldsSlots: queries for many names no upstream answers
// take every slot; a query for a name that answers, once they have waited
// a quarter of the budget, takes the oldest one's slot and is answered
// at once, long before their budget runs out (before: no answer within
// 2 s of a 4 s budget).
func TestSilentFloodYieldsSlots(t *testing.T) {
	const budget = 4 * time.Second
	srv := startServer(t, Config{Upstreams: []netip.AddrPort{startSilentUpstream(t).addr}, Timeout: budget, Logger: slog.New(slog.DiscardHandler)})
	start := time.Now()
	flood(t, srv, maxInFlight, maxInFlight, func(i int) string { return fmt.Sprintf("silent%d.example.", i) })
	time.Sleep(budget/4 + 100*time.Millisecond - time.Since(start))
	answeredBy(t, srv, start.Add(budget/2), "a flood of queries for names no upstream answers")
	if _, jostled := srv.slots.stats(); jostled == 0 {
		t.Error("no flood query gave up its slot")
	}
}

// TestSlowUpstream: an upstream that answers in 2.5 s (a name it had to
// resolve) is waited for within the default budget; at 2 s the client got
// SERVFAIL for a name that resolved on the host.
func TestSlowUpstream(t *testing.T) {
	const delay = 2500 * time.Millisecond
	up := startUpstream(t, func(w mdns.ResponseWriter, r *mdns.Msg) {
		time.Sleep(delay)
		zone(w, r)
	})
	srv := startServer(t, Config{Upstreams: []netip.AddrPort{up.addr}})
	start := time.Now()
	r := exchange(t, "udp", srv.udp, query("a.example.", mdns.TypeA))
	if r.Rcode != mdns.RcodeSuccess || len(r.Answer) != 1 {
		t.Fatalf("after %v: %v, want the upstream's A answer", time.Since(start).Round(time.Millisecond), r)
	}
}

// TestUDPResend: a query whose datagram the upstream lost is sent again
// within the budget (at a quarter of it), so the loss costs that quarter,
// not a SERVFAIL.
func TestUDPResend(t *testing.T) {
	var mu sync.Mutex
	seen := map[uint16]int{}
	up := startUpstream(t, func(w mdns.ResponseWriter, r *mdns.Msg) {
		mu.Lock()
		seen[r.Id]++
		first := seen[r.Id] == 1
		mu.Unlock()
		if !first { // the first copy of each query is lost
			zone(w, r)
		}
	})
	srv := startServer(t, Config{Upstreams: []netip.AddrPort{up.addr}, Timeout: 2 * time.Second})
	start := time.Now()
	r := exchange(t, "udp", srv.udp, query("a.example.", mdns.TypeA))
	took := time.Since(start)
	if r.Rcode != mdns.RcodeSuccess || len(r.Answer) != 1 {
		t.Fatalf("after %v: %v, want the A answer to the resent query", took.Round(time.Millisecond), r)
	}
	if took < 400*time.Millisecond {
		t.Errorf("answered after %v: the resend came before a quarter of the 2 s budget", took)
	}
}

// TestClientResendJoins: a client that resends its query (same socket,
// same ID) while the upstream has not answered gets one answer, and the
// upstream is asked once.
func TestClientResendJoins(t *testing.T) {
	up := startUpstream(t, func(w mdns.ResponseWriter, r *mdns.Msg) {
		time.Sleep(600 * time.Millisecond)
		zone(w, r)
	})
	srv := startServer(t, Config{Upstreams: []netip.AddrPort{up.addr}})
	c, err := net.Dial("udp", srv.udp)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	q, err := query("a.example.", mdns.TypeA).Pack()
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		c.Write(q)
		time.Sleep(100 * time.Millisecond)
	}
	answers := 0
	buf := make([]byte, 65535)
	c.SetReadDeadline(time.Now().Add(1500 * time.Millisecond))
	for {
		if _, err := c.Read(buf); err != nil {
			break
		}
		answers++
	}
	if answers != 1 {
		t.Errorf("the client got %d answers to one query sent three times, want 1", answers)
	}
	if n := len(up.queries()); n != 1 {
		t.Errorf("the upstream was asked %d times, want once", n)
	}
}

func TestFailover(t *testing.T) {
	alive := startUpstream(t, zone)
	hole, _ := blackHole(t)
	tests := []struct {
		name  string
		first netip.AddrPort
	}{
		{name: "closed port", first: closedPort(t)},
		{name: "black hole", first: hole},
		{name: "SERVFAIL", first: startUpstream(t, rcodeHandler(mdns.RcodeServerFailure)).addr},
		{name: "REFUSED", first: startUpstream(t, rcodeHandler(mdns.RcodeRefused)).addr},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := startServer(t, Config{Upstreams: []netip.AddrPort{tt.first, alive.addr}})
			for _, network := range []string{"udp", "tcp"} {
				addr := srv.udp
				if network == "tcp" {
					addr = srv.tcp
				}
				r := exchange(t, network, addr, query("a.example.", mdns.TypeA))
				if r.Rcode != mdns.RcodeSuccess || len(r.Answer) != 1 {
					t.Fatalf("%s: got %v, want the second upstream's A answer", network, r)
				}
			}
		})
	}

	t.Run("all answer SERVFAIL", func(t *testing.T) {
		a := startUpstream(t, rcodeHandler(mdns.RcodeServerFailure))
		b := startUpstream(t, rcodeHandler(mdns.RcodeServerFailure))
		srv := startServer(t, Config{Upstreams: []netip.AddrPort{a.addr, b.addr}})
		r := exchange(t, "udp", srv.udp, query("a.example.", mdns.TypeA))
		if r.Rcode != mdns.RcodeServerFailure {
			t.Fatalf("rcode %s, want SERVFAIL", rcodeString(r.Rcode))
		}
		if len(a.queries()) != 1 || len(b.queries()) != 1 {
			t.Errorf("upstreams saw %d and %d queries, want 1 each", len(a.queries()), len(b.queries()))
		}
	})

	t.Run("all answer REFUSED", func(t *testing.T) {
		a := startUpstream(t, rcodeHandler(mdns.RcodeRefused))
		b := startUpstream(t, rcodeHandler(mdns.RcodeRefused))
		logs := &recordHandler{}
		srv := startServer(t, Config{Upstreams: []netip.AddrPort{a.addr, b.addr}, Logger: slog.New(logs)})
		for range 3 {
			r := exchange(t, "udp", srv.udp, query("a.example.", mdns.TypeA))
			if r.Rcode != mdns.RcodeRefused {
				t.Fatalf("rcode %s, want their REFUSED, as a program on the host gets", rcodeString(r.Rcode))
			}
		}
		if len(a.queries()) != 3 || len(b.queries()) != 3 {
			t.Errorf("upstreams saw %d and %d queries, want 3 each", len(a.queries()), len(b.queries()))
		}
		if n := logs.count(slog.LevelWarn); n != 0 {
			t.Errorf("%d warnings of an outage; want none: the upstreams answer", n)
		}
		if n := logs.count(slog.LevelInfo); n != 1 {
			t.Errorf("%d notes of the refusal, want 1 for the run", n)
		}
	})
}

func TestTCPPipelined(t *testing.T) {
	up := startUpstream(t, zone)
	srv := startServer(t, Config{Upstreams: []netip.AddrPort{up.addr}})

	c, err := net.DialTimeout("tcp", srv.tcp, 5*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", srv.tcp, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))

	q1 := query("a.example.", mdns.TypeA)
	q2 := query("t.example.", mdns.TypeMX)
	q2.Id = q1.Id + 1
	var frames []byte
	for _, q := range []*mdns.Msg{q1, q2} {
		b, err := q.Pack()
		if err != nil {
			t.Fatal(err)
		}
		frames = binary.BigEndian.AppendUint16(frames, uint16(len(b)))
		frames = append(frames, b...)
	}
	if _, err := c.Write(frames); err != nil { // both queries in one segment
		t.Fatalf("write: %v", err)
	}

	got := map[uint16]*mdns.Msg{}
	for range 2 {
		var l [2]byte
		if _, err := io.ReadFull(c, l[:]); err != nil {
			t.Fatalf("read length: %v", err)
		}
		b := make([]byte, binary.BigEndian.Uint16(l[:]))
		if _, err := io.ReadFull(c, b); err != nil {
			t.Fatalf("read answer: %v", err)
		}
		r := new(mdns.Msg)
		if err := r.Unpack(b); err != nil {
			t.Fatalf("unpack answer: %v", err)
		}
		got[r.Id] = r
	}
	if r := got[q1.Id]; r == nil || len(r.Answer) != 1 || r.Answer[0].Header().Rrtype != mdns.TypeA {
		t.Errorf("answer to query 1: %v, want one A", r)
	}
	if r := got[q2.Id]; r == nil || len(r.Answer) != 1 || r.Answer[0].Header().Rrtype != mdns.TypeMX {
		t.Errorf("answer to query 2: %v, want one MX", r)
	}
	for _, q := range up.queries() {
		if q.network != "tcp" {
			t.Errorf("upstream saw a TCP client's query over %s, want tcp", q.network)
		}
	}

	// The connection stays open for more.
	b, _ := query("nope.example.", mdns.TypeA).Pack()
	if _, err := c.Write(binary.BigEndian.AppendUint16(nil, uint16(len(b)))); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write(b); err != nil {
		t.Fatal(err)
	}
	var l [2]byte
	if _, err := io.ReadFull(c, l[:]); err != nil {
		t.Fatalf("third query on the same connection: %v", err)
	}
}

func TestMalformedQueries(t *testing.T) {
	up := startUpstream(t, zone)
	srv := startServer(t, Config{Upstreams: []netip.AddrPort{up.addr}})
	c, err := net.Dial("udp", srv.udp)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))

	// A header claiming one question, then garbage: FORMERR, same ID.
	garbage := []byte{0xbe, 0xef, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff}
	if _, err := c.Write(garbage); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 65535)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatalf("no answer to a malformed query: %v", err)
	}
	h, err := parseHeader(buf[:n])
	if err != nil || h.id != 0xbeef || !h.response() || h.rcode() != mdns.RcodeFormatError {
		t.Fatalf("answer %x, want FORMERR with ID beef", buf[:n])
	}

	// Shorter than a header, and an answer instead of a query: dropped.
	// The next real query's answer is the next datagram.
	resp := []byte{0x12, 0x34, 0x81, 0x80, 0, 0, 0, 0, 0, 0, 0, 0}
	for _, b := range [][]byte{{1, 2, 3}, resp} {
		if _, err := c.Write(b); err != nil {
			t.Fatal(err)
		}
	}
	q := query("a.example.", mdns.TypeA)
	b, _ := q.Pack()
	if _, err := c.Write(b); err != nil {
		t.Fatal(err)
	}
	n, err = c.Read(buf)
	if err != nil {
		t.Fatalf("no answer to a good query after garbage: %v", err)
	}
	if h, _ := parseHeader(buf[:n]); h.id != q.Id {
		t.Fatalf("got %x, want the answer to ID %d", buf[:n], q.Id)
	}

	// Two questions: FORMERR. NOTIFY: NOTIMP. AXFR: REFUSED.
	two := query("a.example.", mdns.TypeA)
	two.Question = append(two.Question, mdns.Question{Name: "b.example.", Qtype: mdns.TypeA, Qclass: mdns.ClassINET})
	notify := query("a.example.", mdns.TypeSOA)
	notify.Opcode = mdns.OpcodeNotify
	axfr := query("example.", mdns.TypeAXFR)
	for _, tt := range []struct {
		q    *mdns.Msg
		want int
	}{{two, mdns.RcodeFormatError}, {notify, mdns.RcodeNotImplemented}, {axfr, mdns.RcodeRefused}} {
		r := exchange(t, "udp", srv.udp, tt.q)
		if r.Rcode != tt.want {
			t.Errorf("query %v: rcode %s, want %s", tt.q.Question, rcodeString(r.Rcode), rcodeString(tt.want))
		}
	}
	if n := len(up.queries()); n != 1 {
		t.Errorf("upstream saw %d queries, want only the good one", n)
	}
}

func TestCloseInFlight(t *testing.T) {
	hole, received := blackHole(t)
	base := runtime.NumGoroutine()

	srv := startServer(t, Config{Upstreams: []netip.AddrPort{hole}, Timeout: time.Minute})

	// Queries that will hang upstream: three over UDP, one over TCP.
	uc, err := net.Dial("udp", srv.udp)
	if err != nil {
		t.Fatal(err)
	}
	defer uc.Close()
	for i := range 3 {
		q := query("a.example.", mdns.TypeA)
		q.Id = uint16(i + 1)
		b, _ := q.Pack()
		if _, err := uc.Write(b); err != nil {
			t.Fatal(err)
		}
	}
	tc, err := net.Dial("tcp", srv.tcp)
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	b, _ := query("t.example.", mdns.TypeTXT).Pack()
	if _, err := tc.Write(append(binary.BigEndian.AppendUint16(nil, uint16(len(b))), b...)); err != nil {
		t.Fatal(err)
	}
	// Wait until the upstream holds the UDP ones (the TCP one goes over
	// TCP, which the black hole never reads).
	timeout := time.After(10 * time.Second)
	for range 3 {
		select {
		case <-received:
		case <-timeout:
			t.Fatal("black hole did not receive the forwarded queries")
		}
	}
	if runtime.NumGoroutine() <= base {
		t.Fatal("no goroutines in flight before Close; the test would prove nothing")
	}

	closed := make(chan error, 1)
	go func() { closed <- srv.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Fatalf("Close: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return with queries in flight")
	}
	if err := srv.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}

	// The TCP client sees its connection closed, without an answer.
	tc.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := tc.Read(make([]byte, 1)); !errors.Is(err, io.EOF) && !isReset(err) {
		t.Errorf("TCP client read after Close: %v, want EOF", err)
	}

	// Close has waited for its goroutines; the runtime may take a moment
	// to retire them, so let the count settle.
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > base {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines after Close, %d before Start:\n%s",
				runtime.NumGoroutine(), base, buf[:runtime.Stack(buf, true)])
		}
		runtime.Gosched()
		time.Sleep(10 * time.Millisecond)
	}
}

func TestOverload(t *testing.T) {
	up := startUpstream(t, zone)
	logs := &recordHandler{messages: make(chan string, 1024)}
	// A budget long enough that the slots the test holds are never old
	// enough to give up (slots) while it runs.
	srv := startServer(t, Config{Upstreams: []netip.AddrPort{up.addr}, Logger: slog.New(logs), Timeout: time.Minute})
	waitLog := func(prefix string) {
		t.Helper()
		timeout := time.After(10 * time.Second)
		for {
			select {
			case m := <-logs.messages:
				if strings.HasPrefix(m, prefix) {
					return
				}
			case <-timeout:
				t.Fatalf("no log message %q", prefix)
			}
		}
	}

	// Take every in-flight slot, as a flood would.
	var held []*slot
	for range maxInFlight {
		sl, _, ok := srv.slots.take(context.Background(), "")
		if !ok {
			t.Fatal("a free slot could not be taken")
		}
		held = append(held, sl)
	}
	release := func() {
		for _, sl := range held {
			sl.release()
		}
	}

	// UDP: dropped, not queued.
	uc, err := net.Dial("udp", srv.udp)
	if err != nil {
		t.Fatal(err)
	}
	defer uc.Close()
	uc.SetDeadline(time.Now().Add(10 * time.Second))
	q1 := query("a.example.", mdns.TypeA)
	b, _ := q1.Pack()
	if _, err := uc.Write(b); err != nil {
		t.Fatal(err)
	}
	waitLog("dns: too many queries in flight")

	// TCP: the query waits for a slot.
	tc, err := net.Dial("tcp", srv.tcp)
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	tc.SetDeadline(time.Now().Add(10 * time.Second))
	q2 := query("t.example.", mdns.TypeTXT)
	b, _ = q2.Pack()
	if _, err := tc.Write(append(binary.BigEndian.AppendUint16(nil, uint16(len(b))), b...)); err != nil {
		t.Fatal(err)
	}

	release()
	var l [2]byte
	if _, err := io.ReadFull(tc, l[:]); err != nil {
		t.Fatalf("TCP query queued behind the full limit got no answer: %v", err)
	}
	q3 := query("a.example.", mdns.TypeAAAA)
	q3.Id = q1.Id + 1
	b, _ = q3.Pack()
	if _, err := uc.Write(b); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 65535)
	n, err := uc.Read(buf)
	if err != nil {
		t.Fatalf("UDP query after the flood: %v", err)
	}
	if h, _ := parseHeader(buf[:n]); h.id != q3.Id {
		t.Fatalf("first UDP answer has ID %d, want %d (the dropped query %d must get none)", h.id, q3.Id, q1.Id)
	}
}

func isReset(err error) bool { return errors.Is(err, syscall.ECONNRESET) }

func TestStartAfterClose(t *testing.T) {
	s, err := New(Config{Upstreams: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:53")}})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.Start(pc, nil)
	if _, _, err := pc.ReadFrom(make([]byte, 1)); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("ReadFrom on a socket given to a closed server: %v, want net.ErrClosed", err)
	}
}
