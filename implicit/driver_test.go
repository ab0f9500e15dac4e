package implicit

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gonetns/gonetns/internal/e2etest"
	"github.com/gonetns/gonetns/internal/wire"
	"github.com/gonetns/gonetns/port"
	"github.com/gonetns/gonetns/portfwd"
)

// bound is how long a test waits for the driver to catch up. Nothing
// asserts on speed.
const bound = 10 * time.Second

func TestImplicitSpecs(t *testing.T) {
	l := func(proto, addr string, v6only bool) Listener {
		return Listener{Proto: proto, Addr: netip.MustParseAddrPort(addr), V6Only: v6only}
	}
	ip := netip.MustParseAddr
	tests := []struct {
		name string
		in   []Listener
		want []port.Spec
	}{
		{"v4 all addresses", []Listener{l("tcp", "0.0.0.0:80", false)},
			[]port.Spec{{Proto: "tcp4", ParentIP: ip("0.0.0.0"), ParentPort: 80, ChildIP: ip("127.0.0.1"), ChildPort: 80}}},
		{"v4 loopback stays loopback", []Listener{l("udp", "127.0.0.2:53", false)},
			[]port.Spec{{Proto: "udp4", ParentIP: ip("127.0.0.2"), ParentPort: 53, ChildIP: ip("127.0.0.2"), ChildPort: 53}}},
		{"v4 specific address", []Listener{l("tcp", "10.0.2.100:8080", false)},
			[]port.Spec{{Proto: "tcp4", ParentIP: ip("0.0.0.0"), ParentPort: 8080, ChildIP: ip("10.0.2.100"), ChildPort: 8080}}},
		{"v6 only", []Listener{l("tcp", "[::]:443", true)},
			[]port.Spec{{Proto: "tcp6", ParentIP: ip("::"), ParentPort: 443, ChildIP: ip("::1"), ChildPort: 443}}},
		{"v6 dual stack", []Listener{l("udp", "[::]:5353", false)},
			[]port.Spec{{Proto: "udp", ParentPort: 5353, ChildIP: ip("127.0.0.1"), ChildPort: 5353}}},
		{"v6 loopback", []Listener{l("tcp", "[::1]:631", true)},
			[]port.Spec{{Proto: "tcp6", ParentIP: ip("::1"), ParentPort: 631, ChildIP: ip("::1"), ChildPort: 631}}},
		{"v6 specific", []Listener{l("tcp", "[fd00::100]:22", true)},
			[]port.Spec{{Proto: "tcp6", ParentIP: ip("::"), ParentPort: 22, ChildIP: ip("fd00::100"), ChildPort: 22}}},
		{"v4-mapped is v4", []Listener{l("tcp", "[::ffff:127.0.0.1]:9000", false)},
			[]port.Spec{{Proto: "tcp4", ParentIP: ip("127.0.0.1"), ParentPort: 9000, ChildIP: ip("127.0.0.1"), ChildPort: 9000}}},
		{"Docker's -p 8080:80: one socket per family",
			[]Listener{l("tcp", "0.0.0.0:8080", false), l("tcp", "[::]:8080", true)},
			[]port.Spec{
				{Proto: "tcp4", ParentIP: ip("0.0.0.0"), ParentPort: 8080, ChildIP: ip("127.0.0.1"), ChildPort: 8080},
				{Proto: "tcp6", ParentIP: ip("::"), ParentPort: 8080, ChildIP: ip("::1"), ChildPort: 8080},
			}},
		{"all addresses beat specific beat loopback",
			[]Listener{l("tcp", "127.0.0.1:7", false), l("tcp", "10.0.2.100:7", false), l("tcp", "[::1]:7", true), l("tcp", "[fd00::100]:7", true), l("tcp", "[::]:7", true)},
			[]port.Spec{
				{Proto: "tcp4", ParentIP: ip("0.0.0.0"), ParentPort: 7, ChildIP: ip("10.0.2.100"), ChildPort: 7},
				{Proto: "tcp6", ParentIP: ip("::"), ParentPort: 7, ChildIP: ip("::1"), ChildPort: 7},
			}},
		{"the lower of two specific addresses",
			[]Listener{l("udp", "10.0.2.101:9", false), l("udp", "10.0.2.100:9", false)},
			[]port.Spec{{Proto: "udp4", ParentIP: ip("0.0.0.0"), ParentPort: 9, ChildIP: ip("10.0.2.100"), ChildPort: 9}}},
		{"dual stack wins over the rest of its port",
			[]Listener{l("tcp", "127.0.0.1:6", false), l("tcp", "[::]:6", false)},
			[]port.Spec{{Proto: "tcp", ParentPort: 6, ChildIP: ip("127.0.0.1"), ChildPort: 6}}},
		{"tcp and udp on one port are two ports",
			[]Listener{l("tcp", "0.0.0.0:5201", false), l("udp", "0.0.0.0:5201", false)},
			[]port.Spec{
				{Proto: "tcp4", ParentIP: ip("0.0.0.0"), ParentPort: 5201, ChildIP: ip("127.0.0.1"), ChildPort: 5201},
				{Proto: "udp4", ParentIP: ip("0.0.0.0"), ParentPort: 5201, ChildIP: ip("127.0.0.1"), ChildPort: 5201},
			}},
		{"link-local, multicast and broadcast are not published",
			[]Listener{l("udp", "[fe80::1]:546", true), l("udp", "224.0.0.251:5353", false), l("udp", "[ff02::fb]:5353", true), l("udp", "255.255.255.255:67", false)},
			nil},
		{"malformed entries dropped",
			[]Listener{{Proto: "sctp", Addr: netip.MustParseAddrPort("0.0.0.0:1")}, {Proto: "tcp"}, l("tcp", "0.0.0.0:0", false), l("tcp", "0.0.0.0:2", false)},
			[]port.Spec{{Proto: "tcp4", ParentIP: ip("0.0.0.0"), ParentPort: 2, ChildIP: ip("127.0.0.1"), ChildPort: 2}}},
		{"none", nil, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := slices.SortedFunc(maps.Keys(implicitSpecs(tt.in, discardLogger)), compareSpecs)
			want := slices.SortedFunc(slices.Values(tt.want), compareSpecs)
			if !slices.Equal(got, want) {
				t.Errorf("specs\n got %v\nwant %v", got, want)
			}
			for _, s := range got {
				if err := s.Validate(); err != nil {
					t.Errorf("%v: %v", s, err)
				}
			}
		})
	}
}

// implicitRig is an Driver fed by a fake child: the test sends reports
// over the wire pair. Its Manager's dialer sends every connection for
// child port P to backends[P], on 127.0.0.1, so that "inside" needs no
// namespace.
type implicitRig struct {
	t     *testing.T
	im    *Driver
	m     *portfwd.Manager
	child *wire.Conn
	logs  *lockedBuffer

	mu       sync.Mutex
	backends map[int]netip.AddrPort
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

func newImplicitRig(t *testing.T, maxPorts int) *implicitRig {
	r := &implicitRig{t: t, logs: &lockedBuffer{}, backends: make(map[int]netip.AddrPort)}
	log := slog.New(slog.NewTextHandler(io.MultiWriter(r.logs, testWriter{t}), &slog.HandlerOptions{Level: slog.LevelDebug}))
	r.m = newTestManager(t, portfwd.Config{Logger: log, Dialer: dialFunc(func(ctx context.Context, proto string, addr netip.AddrPort) (net.Conn, error) {
		r.mu.Lock()
		to, ok := r.backends[int(addr.Port())]
		r.mu.Unlock()
		if !ok {
			return nil, fmt.Errorf("no backend for %s: %w", addr, syscall.ECONNREFUSED)
		}
		return netDial(ctx, proto[:3], to)
	})})
	parent, child := wirePair(t)
	r.child = child
	r.im = New(parent, Config{Manager: r.m, Logger: log, MaxPorts: maxPorts})
	r.im.Start()
	t.Cleanup(func() { r.im.Close() }) // before the Manager's cleanup
	return r
}

func (r *implicitRig) backend(hp int, to netip.AddrPort) {
	r.mu.Lock()
	r.backends[hp] = to
	r.mu.Unlock()
}

func (r *implicitRig) report(ls ...Listener) {
	r.t.Helper()
	if err := r.child.Send(listenerSnapshot{Listeners: ls}); err != nil {
		r.t.Fatal(err)
	}
}

// waitFor waits until cond holds.
func (r *implicitRig) waitFor(what string, cond func() bool) {
	r.t.Helper()
	deadline := time.Now().Add(bound)
	for !cond() {
		if time.Now().After(deadline) {
			r.t.Fatalf("no %s within %v; ports %v", what, bound, r.im.ListPorts())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// published returns the implicit ports.
func (r *implicitRig) published() []port.Spec {
	var out []port.Spec
	for _, st := range r.im.ListPorts() {
		if st.Implicit {
			out = append(out, st.Spec)
		}
	}
	return out
}

func (r *implicitRig) hasPublished(hp int) bool {
	return slices.ContainsFunc(r.published(), func(s port.Spec) bool { return s.ParentPort == hp })
}

func lst(proto string, ip string, hp int) Listener {
	return Listener{Proto: proto, Addr: netip.AddrPortFrom(netip.MustParseAddr(ip), uint16(hp))}
}

// tcpSays connects to 127.0.0.1:port, sends "ping" and returns the echo,
// or the error.
func tcpSays(hp int) (string, error) {
	c, err := net.DialTimeout("tcp4", fmt.Sprintf("127.0.0.1:%d", hp), time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	c.Write([]byte("ping"))
	c.(*net.TCPConn).CloseWrite()
	b, err := io.ReadAll(c)
	return string(b), err
}

func refused(hp int) bool {
	_, err := tcpSays(hp)
	return errors.Is(err, syscall.ECONNREFUSED)
}

func TestImplicitPublishAndWithdraw(t *testing.T) {
	r := newImplicitRig(t, 0)
	hp := e2etest.FreePort(t)
	r.backend(hp, echoServer(t))
	udpBackend := udpWhoami(t, listenUDP(t, "127.0.0.1:0"))

	r.report(lst("tcp", "127.0.0.1", hp))
	r.waitFor("TCP answer", func() bool { s, err := tcpSays(hp); return err == nil && s == "ping" })
	got := r.im.ListPorts()
	if len(got) != 1 || !got[0].Implicit || got[0].Spec != (port.Spec{Proto: "tcp4", ParentIP: ip4, ParentPort: hp, ChildIP: ip4, ChildPort: hp}) {
		t.Fatalf("ListPorts = %+v", got)
	}

	// UDP joins; TCP stays.
	r.mu.Lock()
	r.backends[hp] = udpBackend // the UDP relay dials port too
	r.mu.Unlock()
	r.report(lst("tcp", "127.0.0.1", hp), lst("udp", "127.0.0.1", hp))
	r.waitFor("two ports", func() bool { return len(r.published()) == 2 })
	c := udpClient(t, netip.AddrPortFrom(ip4, uint16(hp)))
	if got := ask(t, c, "hello", bound); got != "hello" {
		t.Errorf("UDP through the implicit port: %q", got)
	}

	// Withdrawn: the host port refuses again.
	r.report()
	r.waitFor("withdrawal", func() bool { return len(r.published()) == 0 && refused(hp) })
	if got := r.m.ListPorts(); len(got) != 0 {
		t.Errorf("the Manager still has %v", got)
	}
	logs := r.logs.String()
	for _, want := range []string{"published implicitly", "withdrew an implicit port"} {
		if !strings.Contains(logs, want) {
			t.Errorf("no %q in the log", want)
		}
	}
}

func TestImplicitExplicitWins(t *testing.T) {
	r := newImplicitRig(t, 0)
	hp := e2etest.FreePort(t)
	r.backend(hp, echoServer(t))
	other := e2etest.FreePort(t)
	upper := upperServer(t)
	r.backend(other, upper) // the explicit port's target answers in upper case

	r.report(lst("tcp", "127.0.0.1", hp))
	r.waitFor("implicit port", func() bool { return r.hasPublished(hp) })

	st, err := r.im.AddPort(context.Background(), port.Spec{Proto: "tcp4", ParentIP: ip4, ParentPort: hp, ChildIP: ip4, ChildPort: other})
	if err != nil {
		t.Fatal(err)
	}
	if got, err := tcpSays(hp); got != "PING" {
		t.Fatalf("the explicit port does not answer: %q %v", got, err)
	}
	if pub := r.published(); len(pub) != 0 {
		t.Errorf("implicit ports beside the explicit one: %v", pub)
	}
	// A new report does not bring the implicit port back while the
	// explicit one holds the host port.
	marker := e2etest.FreePort(t)
	r.report(lst("tcp", "127.0.0.1", hp), lst("tcp", "127.0.0.1", marker))
	r.waitFor("marker port", func() bool { return r.hasPublished(marker) })
	if r.hasPublished(hp) {
		t.Errorf("the implicit port came back over the explicit one")
	}
	if l := r.im.ListPorts(); len(l) != 2 || l[0].ID != st.ID || l[0].Implicit || !l[1].Implicit {
		t.Errorf("ListPorts = %+v", l)
	}

	// Removing the explicit port gives the host port back to the implicit
	// one.
	if err := r.im.RemovePort(st.ID); err != nil {
		t.Fatal(err)
	}
	r.waitFor("implicit port back", func() bool { s, _ := tcpSays(hp); return r.hasPublished(hp) && s == "ping" })

	// An explicit port that fails (here: a bad spec is caught before
	// anything is withdrawn; a conflict with another explicit port after)
	// leaves the implicit ones as they were.
	if _, err := r.im.AddPort(context.Background(), port.Spec{Proto: "tcp4", ParentPort: hp}); !errors.Is(err, port.ErrInvalidSpec) {
		t.Errorf("bad spec: %v", err)
	}
	st2, err := r.im.AddPort(context.Background(), port.Spec{Proto: "tcp4", ParentIP: ip4, ParentPort: marker, ChildPort: other})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.im.AddPort(context.Background(), port.Spec{Proto: "tcp", ParentPort: marker, ChildPort: other}); !errors.Is(err, port.ErrConflict) {
		t.Errorf("overlapping explicit ports: %v", err)
	}
	if !r.hasPublished(hp) {
		t.Errorf("a failed explicit publish took an implicit port: %v", r.im.ListPorts())
	}
	r.im.RemovePort(st2.ID)
	r.waitFor("marker back", func() bool { return r.hasPublished(marker) })
}

// upperServer answers a TCP connection with what it read, in upper case.
func upperServer(t *testing.T) netip.AddrPort {
	ln := listenTCP(t)
	go func() {
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				b, _ := io.ReadAll(c)
				c.Write(bytes.ToUpper(b))
			}()
		}
	}()
	return addrOf(ln.Addr())
}

func TestImplicitRemoveKeepsItWithdrawn(t *testing.T) {
	r := newImplicitRig(t, 0)
	hp, marker := e2etest.FreePort(t), e2etest.FreePort(t)
	r.backend(hp, echoServer(t))
	r.report(lst("tcp", "127.0.0.1", hp))
	r.waitFor("implicit port", func() bool { return r.hasPublished(hp) })
	id := r.im.ListPorts()[0].ID
	if err := r.im.RemovePort(id); err != nil {
		t.Fatal(err)
	}
	if !refused(hp) {
		t.Fatalf("removed port still listens")
	}
	r.report(lst("tcp", "127.0.0.1", hp), lst("tcp", "127.0.0.1", marker))
	r.waitFor("marker port", func() bool { return r.hasPublished(marker) })
	if r.hasPublished(hp) {
		t.Fatalf("a removed implicit port came back while its socket still listens")
	}
	// Its socket closes and opens again: published again.
	r.report(lst("tcp", "127.0.0.1", marker))
	r.waitFor("marker alone", func() bool { return len(r.published()) == 1 })
	r.report(lst("tcp", "127.0.0.1", marker), lst("tcp", "127.0.0.1", hp))
	r.waitFor("implicit port again", func() bool { return r.hasPublished(hp) })
	if err := r.im.RemovePort(12345); !errors.Is(err, port.ErrUnknownPort) {
		t.Errorf("unknown ID: %v", err)
	}
}

// A port the host was using when the listener appeared inside stays the
// host's: when the host's service restarts on it, it gets it back (a
// retry would take it in the instant it is free). It is listed as
// unpublished, and logged once. A new appearance of the listener, with
// the port free, publishes it.
func TestImplicitHostPortInUse(t *testing.T) {
	r := newImplicitRig(t, 0)
	hp := e2etest.FreePort(t)
	r.backend(hp, echoServer(t))
	hostAddr := fmt.Sprintf("127.0.0.1:%d", hp)
	hostService, err := net.Listen("tcp4", hostAddr)
	if err != nil {
		t.Fatal(err)
	}
	l := lst("tcp", "127.0.0.1", hp)
	r.report(l)
	const warning = "not publishing a port the host is using"
	r.waitFor("a failed publish", func() bool { return len(r.im.Unpublished()) == 1 })
	if r.hasPublished(hp) {
		t.Fatal("published over another program's port")
	}
	u := r.im.Unpublished()
	if len(u) != 1 || u[0].Spec.ParentPort != hp || u[0].Retrying || !strings.Contains(u[0].Reason, "the host was using this port") {
		t.Fatalf("Unpublished() = %+v, want the port, left to the host", u)
	}
	// The host's service restarts: it lets go of the port for longer than
	// the driver's first retry (1 s) would have waited, then binds again.
	hostService.Close()
	time.Sleep(2 * implicitRetryMin)
	r.report(l) // a report changes nothing either
	hostService, err = net.Listen("tcp4", hostAddr)
	if err != nil {
		t.Fatalf("the host's service cannot get its port back after a restart: %v (published: %v)", err, r.published())
	}
	if r.hasPublished(hp) {
		t.Fatal("published the host's port while its service restarted")
	}
	hostService.Close()
	if n := strings.Count(r.logs.String(), warning); n != 1 {
		t.Errorf("%d warnings, want 1:\n%s", n, r.logs.String())
	}
	// The listener goes and comes back while the port is free: published.
	r.report()
	r.waitFor("nothing wanted", func() bool { return len(r.im.Unpublished()) == 0 })
	r.report(l)
	r.waitFor("publish on the listener's new appearance", func() bool { s, _ := tcpSays(hp); return r.hasPublished(hp) && s == "ping" })
	if u := r.im.Unpublished(); len(u) != 0 {
		t.Errorf("Unpublished() = %+v once published", u)
	}
}

func TestImplicitMaxPorts(t *testing.T) {
	r := newImplicitRig(t, 2)
	a, b, c := e2etest.FreePort(t), e2etest.FreePort(t), e2etest.FreePort(t)
	r.report(lst("tcp", "127.0.0.1", a), lst("tcp", "127.0.0.1", b), lst("tcp", "127.0.0.1", c))
	r.waitFor("limit warning", func() bool { return strings.Contains(r.logs.String(), "too many implicit ports") })
	if n := len(r.published()); n != 2 {
		t.Errorf("%d ports published, want the limit 2", n)
	}
	if u := r.im.Unpublished(); len(u) != 1 || !u[0].Retrying || !strings.Contains(u[0].Reason, "more than 2 ports") {
		t.Errorf("Unpublished() = %+v, want the third port, over the limit", u)
	}
	// One goes: the third takes its place.
	first := r.published()[0].ParentPort
	var rest []Listener
	for _, p := range []int{a, b, c} {
		if p != first {
			rest = append(rest, lst("tcp", "127.0.0.1", p))
		}
	}
	r.report(rest...)
	r.waitFor("the third port", func() bool { return len(r.published()) == 2 && !r.hasPublished(first) })
}

// A report in parts is applied once whole; a malformed message is
// dropped and the next one applied.
func TestImplicitReportParts(t *testing.T) {
	r := newImplicitRig(t, 0)
	a, b, marker := e2etest.FreePort(t), e2etest.FreePort(t), e2etest.FreePort(t)
	if err := r.child.Send(listenerSnapshot{Listeners: []Listener{lst("tcp", "127.0.0.1", a)}, More: true}); err != nil {
		t.Fatal(err)
	}
	if err := r.child.Send(map[string]any{"listeners": "not a list"}); err != nil {
		t.Fatal(err)
	}
	// A field that fails its own decoding (netip's UnmarshalText) is a bad
	// message too, not the end of the reports.
	if err := r.child.Send(map[string]any{"listeners": []map[string]string{{"proto": "tcp", "addr": "bogus"}}}); err != nil {
		t.Fatal(err)
	}
	r.report(lst("tcp", "127.0.0.1", marker))
	r.waitFor("marker port", func() bool { return r.hasPublished(marker) })
	if r.hasPublished(a) {
		t.Errorf("part of a report broken off by a malformed message was applied")
	}
	if err := r.child.Send(listenerSnapshot{Listeners: []Listener{lst("tcp", "127.0.0.1", a)}, More: true}); err != nil {
		t.Fatal(err)
	}
	if r.hasPublished(a) {
		t.Errorf("a report applied before its last part")
	}
	r.report(lst("tcp", "127.0.0.1", b))
	r.waitFor("both parts", func() bool { return r.hasPublished(a) && r.hasPublished(b) && !r.hasPublished(marker) })
}

// The child closing its end leaves the ports published; Close then
// returns.
func TestImplicitChildGone(t *testing.T) {
	r := newImplicitRig(t, 0)
	hp := e2etest.FreePort(t)
	r.report(lst("tcp", "127.0.0.1", hp))
	r.waitFor("implicit port", func() bool { return r.hasPublished(hp) })
	r.child.Close()
	r.waitFor("log line", func() bool { return strings.Contains(r.logs.String(), "stopped reporting") })
	if !r.hasPublished(hp) {
		t.Error("the ports went with the child's reports")
	}
	done := make(chan struct{})
	go func() { r.im.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(bound):
		t.Fatal("Close hangs")
	}
}

// tickClock drives a Watcher's loop: its clock stands still (so the
// once-a-second scan never comes due) and each wait ends only when the
// test ticks.
type tickClock struct {
	now   time.Time
	waits chan time.Duration // what each wait asked for
	ticks chan time.Time
}

func newTickClock(w *Watcher) *tickClock {
	c := &tickClock{now: time.Unix(1e9, 0), waits: make(chan time.Duration), ticks: make(chan time.Time)}
	w.now = func() time.Time { return c.now }
	w.after = func(d time.Duration) <-chan time.Time {
		c.waits <- d
		return c.ticks
	}
	return c
}

// wait returns once the loop waits for its next probe, with the wait it
// asked for, which must be within the probe intervals.
func (c *tickClock) wait(t *testing.T) time.Duration {
	t.Helper()
	var d time.Duration
	select {
	case d = <-c.waits:
	case <-time.After(bound):
		t.Fatalf("the watcher did not wait for its next probe within %v", bound)
	}
	if d < fastInterval || d > idleInterval {
		t.Errorf("the watcher waits %v between probes, want %v to %v", d, fastInterval, idleInterval)
	}
	return d
}

// tick ends the wait: the loop probes (and scans and reports, if it
// will), and tick returns when it waits again, with that wait.
func (c *tickClock) tick(t *testing.T) time.Duration {
	t.Helper()
	c.ticks <- c.now
	return c.wait(t)
}

func TestNextInterval(t *testing.T) {
	d := fastInterval
	var got []time.Duration
	for range 4 {
		d = nextInterval(d, false)
		got = append(got, d)
	}
	if want := []time.Duration{200 * time.Millisecond, 400 * time.Millisecond, idleInterval, idleInterval}; !slices.Equal(got, want) {
		t.Errorf("quiet probes wait %v, want %v", got, want)
	}
	if d := nextInterval(idleInterval, true); d != fastInterval {
		t.Errorf("after a move: %v, want %v", d, fastInterval)
	}
}

// The real watcher in this test's own network namespace: a listener that
// opens, and its closing, is reported at the next probe of the socket
// counters (the clock stands still, so no periodic scan finds it instead),
// the probes come every 100 to 500 ms, every 100 ms after a change; Run
// ends with its context or when the parent closes its end.
func TestListenerWatcher(t *testing.T) {
	w, err := NewWatcher(WatchConfig{InNetNS: here, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	clock := newTickClock(w)
	parent, child := wirePair(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx, child) }()

	reports := make(chan []Listener, 100)
	go func() {
		var all []Listener
		for {
			var s listenerSnapshot
			files, err := parent.Recv(&s)
			wire.CloseFiles(files)
			if err != nil {
				close(reports)
				return
			}
			all = append(all, s.Listeners...)
			if !s.More {
				reports <- all
				all = nil
			}
		}
	}()
	// waitReport takes the reports sent so far, and fails unless one of
	// them satisfies cond: the probe that a tick ran has already sent what
	// it found. Other programs' sockets in this namespace may bring
	// reports of their own.
	waitReport := func(what string, cond func([]Listener) bool) {
		t.Helper()
		for {
			select {
			case ls, ok := <-reports:
				if !ok {
					t.Fatalf("reports ended before %s", what)
				}
				if cond(ls) {
					return
				}
			case <-time.After(bound):
				t.Fatalf("no report with %s at the probe after it: the socket counters did not trigger a scan", what)
			}
		}
	}
	clock.wait(t)
	waitReport("the first report", func([]Listener) bool { return true })

	ln, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		t.Fatal(err)
	}
	mine := Listener{Proto: "tcp", Addr: addrOf(ln.Addr()), V6Only: true}
	if d := clock.tick(t); d != fastInterval {
		t.Errorf("after a change the next probe comes after %v, want %v", d, fastInterval)
	}
	waitReport("the new listener", func(ls []Listener) bool { return slices.Contains(ls, mine) })
	ln.Close()
	clock.tick(t)
	waitReport("the listener gone", func(ls []Listener) bool { return !slices.Contains(ls, mine) })

	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	udp := Listener{Proto: "udp", Addr: addrOf(pc.LocalAddr())}
	clock.tick(t)
	waitReport("a UDP listener", func(ls []Listener) bool { return slices.Contains(ls, udp) })

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Run: %v", err)
		}
	case <-time.After(bound):
		t.Fatal("Run did not end with its context")
	}

	// And with the parent's end closing.
	w2, err := NewWatcher(WatchConfig{InNetNS: here})
	if err != nil {
		t.Fatal(err)
	}
	parent2, child2 := wirePair(t)
	go func() { done <- w2.Run(context.Background(), child2) }()
	var s listenerSnapshot
	if _, err := parent2.Recv(&s); err != nil {
		t.Fatal(err)
	}
	parent2.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Run after the parent closed: %v", err)
		}
	case <-time.After(bound):
		t.Fatal("Run did not end when the parent closed its end")
	}
}

func TestSendSnapshotParts(t *testing.T) {
	parent, child := wirePair(t)
	ls := make([]Listener, 2*snapshotPart+3)
	for i := range ls {
		ls[i] = Listener{Proto: "tcp", Addr: netip.AddrPortFrom(netip.MustParseAddr("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"), uint16(i+1)), V6Only: true}
	}
	errc := make(chan error, 1)
	go func() { errc <- sendSnapshot(child, ls) }()
	var got []Listener
	parts := 0
	for {
		var s listenerSnapshot
		if _, err := parent.Recv(&s); err != nil {
			t.Fatal(err)
		}
		parts++
		got = append(got, s.Listeners...)
		if !s.More {
			break
		}
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if parts != 3 || !slices.Equal(got, ls) {
		t.Errorf("%d parts, %d listeners back", parts, len(got))
	}
}
