package dns

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	mdns "github.com/miekg/dns"

	"github.com/gonetns/gonetns/internal/e2etest"
)

// This file holds the test fixtures: fake upstream resolvers on 127.0.0.1
// built with miekg/dns, a gonetns server on loopback sockets, and a log
// handler that records what was logged.

// seenQuery is a query as an upstream received it.
type seenQuery struct {
	network string // "udp" or "tcp"
	msg     *mdns.Msg
}

// testUpstream is a DNS server on 127.0.0.1 listening on the same port
// for UDP and TCP, so a TC answer can be retried over TCP.
type testUpstream struct {
	addr netip.AddrPort

	mu   sync.Mutex
	seen []seenQuery
}

func (u *testUpstream) queries() []seenQuery {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]seenQuery(nil), u.seen...)
}

// bigTXT is the payload of big.example. TXT: 3000 bytes in 12 strings.
var bigTXT = func() []string {
	var ss []string
	for i := range 12 {
		ss = append(ss, strings.Repeat(string(rune('a'+i)), 250))
	}
	return ss
}()

// zone answers the test names:
//
//	a.example.   A 192.0.2.1 (TTL 1234), no AAAA (NODATA)
//	t.example.   TXT, MX, SRV
//	big.example. TXT of 3000 bytes
//	anything else NXDOMAIN
//
// Over UDP it truncates any answer above 512 bytes, whatever the client's
// EDNS size, so the forwarder has to retry over TCP.
func zone(w mdns.ResponseWriter, r *mdns.Msg) {
	m := new(mdns.Msg)
	m.SetReply(r)
	m.RecursionAvailable = true
	soa := &mdns.SOA{
		Hdr: mdns.RR_Header{Name: "example.", Rrtype: mdns.TypeSOA, Class: mdns.ClassINET, Ttl: 300},
		Ns:  "ns.example.", Mbox: "admin.example.", Serial: 1, Refresh: 3600, Retry: 600, Expire: 86400, Minttl: 60,
	}
	q := r.Question[0]
	hdr := func(t uint16, ttl uint32) mdns.RR_Header {
		return mdns.RR_Header{Name: q.Name, Rrtype: t, Class: mdns.ClassINET, Ttl: ttl}
	}
	switch name := strings.ToLower(q.Name); {
	case name == "a.example.":
		if q.Qtype == mdns.TypeA {
			m.Answer = append(m.Answer, &mdns.A{Hdr: hdr(mdns.TypeA, 1234), A: net.IPv4(192, 0, 2, 1)})
		} else {
			m.Ns = append(m.Ns, soa)
		}
	case name == "t.example.":
		switch q.Qtype {
		case mdns.TypeTXT:
			m.Answer = append(m.Answer, &mdns.TXT{Hdr: hdr(mdns.TypeTXT, 300), Txt: []string{"hello"}})
		case mdns.TypeMX:
			m.Answer = append(m.Answer, &mdns.MX{Hdr: hdr(mdns.TypeMX, 300), Preference: 10, Mx: "mail.example."})
		case mdns.TypeSRV:
			m.Answer = append(m.Answer, &mdns.SRV{Hdr: hdr(mdns.TypeSRV, 300), Priority: 1, Weight: 2, Port: 5060, Target: "sip.example."})
		default:
			m.Ns = append(m.Ns, soa)
		}
	case name == "big.example." && q.Qtype == mdns.TypeTXT:
		m.Answer = append(m.Answer, &mdns.TXT{Hdr: hdr(mdns.TypeTXT, 300), Txt: bigTXT})
	default:
		m.Rcode = mdns.RcodeNameError
		m.Ns = append(m.Ns, soa)
	}
	if opt := r.IsEdns0(); opt != nil {
		m.SetEdns0(4096, opt.Do())
	}
	if w.LocalAddr().Network() == "udp" && m.Len() > minUDPSize {
		m.Truncated = true
		m.Answer, m.Ns = nil, nil
	}
	w.WriteMsg(m)
}

// rcodeHandler answers every query with rcode.
func rcodeHandler(rcode int) mdns.HandlerFunc {
	return func(w mdns.ResponseWriter, r *mdns.Msg) {
		m := new(mdns.Msg)
		m.SetRcode(r, rcode)
		w.WriteMsg(m)
	}
}

// startUpstream runs h on 127.0.0.1, UDP and TCP on one port.
func startUpstream(t *testing.T, h mdns.HandlerFunc) *testUpstream {
	t.Helper()
	pc, ln := listenPair(t)
	u := &testUpstream{addr: netip.MustParseAddrPort(ln.Addr().String())}
	record := mdns.HandlerFunc(func(w mdns.ResponseWriter, r *mdns.Msg) {
		u.mu.Lock()
		u.seen = append(u.seen, seenQuery{network: w.LocalAddr().Network(), msg: r.Copy()})
		u.mu.Unlock()
		h(w, r)
	})
	for _, srv := range []*mdns.Server{
		{PacketConn: pc, Handler: record},
		{Listener: ln, Handler: record},
	} {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		done := make(chan struct{})
		go func() {
			defer close(done)
			srv.ActivateAndServe()
		}()
		<-started
		t.Cleanup(func() {
			srv.Shutdown()
			<-done
		})
	}
	return u
}

// listenPair listens for UDP and TCP on the same 127.0.0.1 port.
func listenPair(t *testing.T) (net.PacketConn, net.Listener) {
	t.Helper()
	var lastErr error
	for range 20 {
		ln, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("listen TCP on 127.0.0.1: %v", err)
		}
		pc, err := net.ListenPacket("udp4", ln.Addr().String())
		if err == nil {
			return pc, ln
		}
		ln.Close()
		lastErr = err
	}
	t.Fatalf("no 127.0.0.1 port free for both UDP and TCP: %v", lastErr)
	return nil, nil
}

// closedPort is a 127.0.0.1 address where nothing listens: a query there
// gets ICMP port unreachable. Its port is below the kernel's ephemeral
// range, where no other test's listener on port 0 can land.
func closedPort(t *testing.T) netip.AddrPort {
	t.Helper()
	return netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(e2etest.FreePort(t)))
}

// blackHole is a 127.0.0.1 address that takes UDP and TCP and never
// answers. Every UDP query it receives is sent on the returned channel.
func blackHole(t *testing.T) (netip.AddrPort, <-chan []byte) {
	t.Helper()
	pc, ln := listenPair(t)
	got := make(chan []byte, 64)
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 65535)
		for {
			n, _, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			select {
			case got <- append([]byte(nil), buf[:n]...):
			default:
			}
		}
	}()
	t.Cleanup(func() {
		pc.Close()
		ln.Close() // the kernel completes handshakes; nobody ever reads
		<-done
	})
	return netip.MustParseAddrPort(ln.Addr().String()), got
}

// testServer is a Server on loopback sockets.
type testServer struct {
	*Server
	udp string // address of its UDP socket
	tcp string // address of its TCP listener
}

func startServer(t *testing.T, cfg Config) *testServer {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	s, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen UDP: %v", err)
	}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen TCP: %v", err)
	}
	s.Start(pc, ln)
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return &testServer{Server: s, udp: pc.LocalAddr().String(), tcp: ln.Addr().String()}
}

// exchange sends m to addr over network with a generous timeout (a bound,
// not a speed requirement).
func exchange(t *testing.T, network, addr string, m *mdns.Msg) *mdns.Msg {
	t.Helper()
	c := &mdns.Client{Net: network, Timeout: 10 * time.Second}
	r, _, err := c.Exchange(m, addr)
	if err != nil && r == nil {
		t.Fatalf("%s query %s %s to %s: %v", network, m.Question[0].Name, typeString(m.Question[0].Qtype), addr, err)
	}
	return r
}

func query(name string, qtype uint16) *mdns.Msg {
	m := new(mdns.Msg)
	m.SetQuestion(name, qtype)
	return m
}

// testWriter sends log output to t.Log.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

// recordHandler is a slog.Handler that keeps every record.
type recordHandler struct {
	mu      sync.Mutex
	records []slog.Record
	// messages, if set, receives every record's message (never blocking).
	messages chan string
}

func (h *recordHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *recordHandler) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.records = append(h.records, r.Clone())
	if h.messages != nil {
		select {
		case h.messages <- r.Message:
		default:
		}
	}
	return nil
}
func (h *recordHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *recordHandler) WithGroup(string) slog.Handler      { return h }

func (h *recordHandler) count(level slog.Level) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, r := range h.records {
		if r.Level == level {
			n++
		}
	}
	return n
}
