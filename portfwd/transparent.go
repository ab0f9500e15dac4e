package portfwd

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/conntrack"
	"github.com/gonetns/gonetns/internal/route"
)

// Keeping the client's address on published ports (source IP transparency,
// RootlessKit's --source-ip-transparent), the child's side.
//
// Why here and not through the netstack. The other way would be for the
// parent to carry these connections through gVisor onto the TAP with the
// client's address as source, so the namespace's own routes would bring the
// replies back. It was measured and not chosen: that path cannot reach a
// server bound to 127.0.0.1 (a packet to loopback arriving on tap0 is a
// martian unless route_localnet) nor to ::1 (never accepted from outside
// lo), and 127.0.0.1 is the default CHILDIP; and it gives up splice. Side by
// side here (2 cores, iperf3, a client in another namespace behind a veth,
// medians of 4 rounds): this driver with the source kept 8.4 Gbit/s host to
// sandbox and 10.1 back, at 0.58 and 0.50 CPU-seconds per GB in gonetns;
// the netstack path 7.6 and 8.4 Gbit/s at 1.14 and 0.97 CPU-s/GB;
// RootlessKit 1.1's builtin driver (no source) 6.9 and 8.6 at 0.78 and
// 0.62. The source costs the spliced path nothing measurable (kept vs not
// kept, 8 interleaved rounds: 0.96 of the throughput, within the noise).
//
// The parent sends the client's address with each dial. The child connects
// from that address: an IP_TRANSPARENT socket may bind an address the
// namespace does not own, so the server inside accepts a connection (or
// receives datagrams) from the client's own address and port. What needs
// care is the way back: the server's replies are addressed to the client,
// which the namespace's routes send out of the TAP, to gonetns's netstack,
// where nobody waits for them. Policy routing, set up here over rtnetlink
// (no ip, iptables or nft binary), brings them back to the child's socket:
//
//   - TCP: the child's socket carries a firewall mark (SO_MARK), which the
//     SYN takes along. With net.ipv4.tcp_fwmark_accept=1 the server's
//     accepted socket inherits the mark, so everything it sends (SYN-ACK,
//     data, FIN, TIME_WAIT's ACKs) matches "fwmark M lookup T", and table T
//     has "local default dev lo": delivered locally, to the child's
//     socket. With net.ipv4.fwmark_reflect and net.ipv6.fwmark_reflect=1
//     the RST the kernel sends when nothing listens carries the mark too,
//     so a refused connection is refused at once instead of timing out.
//     Nothing is set up per connection.
//   - UDP: there is no accepted socket to inherit a mark; a server replying
//     from an unconnected socket bound to 0.0.0.0 picks its route at each
//     sendto, which is how RootlessKit's UDP attempt broke
//     (rootless-containers/rootlesskit#592). So while a flow lives there
//     is a rule "ipproto udp sport CHILDPORT lookup T(CHILDIP)" and, in
//     that table, "local CLIENTIP dev lo src CHILDIP": replies from the
//     published port to that client are delivered locally, and a server
//     that lets the kernel choose its source gets CHILDIP, the address the
//     child's connected socket expects replies from. The rule only matches
//     traffic from the published port, and the table only routes the
//     clients that have flows, so nothing else the namespace sends is
//     affected. Both are reference-counted and removed with the last flow
//     (the parent says when a flow ends: "release"). A rule per flow
//     ("to CLIENTIP dport CLIENTPORT") would be exact, but the kernel walks
//     rules one by one: 1,000 of them made every route lookup that reaches
//     them 12 us slower (3.7 -> 16.2 us per unconnected sendto, measured
//     here); a table is a trie, and 10 rules with 1,000 client routes cost
//     nothing measurable.
//   - UDP redirected by a firewall inside (Docker's DNAT to a container
//     with userland-proxy=false): the container's replies are forwarded,
//     from its own port, so the rule above does not see them. "iif lo goto
//     N+2", "ipproto udp lookup F", "nop" (priorities N..N+2) send
//     forwarded UDP to a client with a live flow to table F, which has
//     "local CLIENTIP dev lo" for those clients: delivered locally, where
//     conntrack turns the source back into CHILDIP:CHILDPORT for the
//     child's socket. What the namespace sends itself skips it (iif lo). The
//     price: while a client has a live UDP flow, forwarded UDP to that
//     client's address (a container talking to it on its own) is
//     delivered locally too.
//   - TCP redirected the same way cannot keep the client's address
//     without connection marks (RootlessKit v3 uses iptables CONNMARK):
//     the redirected SYN, marked, is routed locally, where nothing answers.
//     The child asks conntrack (ctnetlink) right after sending the SYN
//     whether the connection was redirected, and then connects again
//     without the client's address at once, instead of waiting out the
//     dial timeout.
//
// A client address the namespace owns (loopback, for one) and a CHILDIP the
// namespace does not own (a container's address behind a bridge, whose
// replies would be routed, not delivered locally) get a plain connection
// from the namespace's own address, as without transparency. So does a
// connection whose transparent attempt fails any other way (redirected as
// above; refused, when a plain connection may still be accepted; unable to
// bind the client's address because another socket of the same client
// reaches the same target): it goes through, without the client's address
// (a port where nothing listens is refused twice).
const (
	transparentMark     = 0x676e0001 // "gn" 0001: SO_MARK of transparent TCP sockets
	transparentTable    = 0x676e0001 // TCP: local 0.0.0.0/0 and ::/0 dev lo
	udpTableBase        = 0x676e0100 // UDP: one table per CHILDIP (its route's src)
	udpForwardTable     = 0x676e00ff // UDP redirected inside: forwarded replies
	tcpRulePriority     = 100        // before main (32766), after local (0)
	udpRulePriority     = 101
	fwdRulePriority     = 102  // 102: iif lo goto 104; 103: udp lookup F; 104: nop
	maxTransparentAddrs = 4096 // distinct CHILDIPs (UDP tables); beyond, plain dials
)

// sysctls the TCP part needs in the namespace (see above).
var transparentSysctls = []string{
	"net/ipv4/tcp_fwmark_accept",
	"net/ipv4/fwmark_reflect",
	"net/ipv6/fwmark_reflect",
}

// transparency is the child's routing state for transparent dials. Its
// set-up happens at the first dial that carries a client address, so that
// a parent that never sends one (--source-ip-transparent=false) leaves the
// namespace exactly as it was.
type transparency struct {
	inNS    func(func() error) error
	log     *slog.Logger
	sandbox []netip.Prefix // the sandbox network's own subnets

	mu          sync.Mutex
	tried       bool
	setupErr    error            // why transparency is off, after tried
	rt          *route.Routing   // nil until set up
	ct          *conntrack.Table // nil if the kernel has no netfilter netlink
	v6          bool             // IPv6 rules and routes are in place
	setupRules  []route.Rule     // the set-up's rules and routes, to undo at close
	setupRoutes []route.LocalRoute
	udpOff      error // why UDP is off (the kernel ignores rule selectors)
	// selectorsChecked: the kernel's honouring of rule selectors was
	// checked, with the first UDP flow's rule (one route lookup, once).
	selectorsChecked bool
	tables           map[netip.Addr]uint32    // CHILDIP -> UDP table
	rules            map[route.Rule]int       // UDP rules -> flows using them
	routes           map[route.LocalRoute]int // UDP client routes -> flows using them
	held             map[uint64]udpHold       // dial ID -> what its flow holds
}

type udpHold struct {
	rule     route.Rule
	route    route.LocalRoute
	fwdRoute route.LocalRoute // in udpForwardTable
}

func newTransparency(inNS func(func() error) error, log *slog.Logger) *transparency {
	return &transparency{
		inNS:   inNS,
		log:    log,
		tables: make(map[netip.Addr]uint32),
		rules:  make(map[route.Rule]int),
		routes: make(map[route.LocalRoute]int),
		held:   make(map[uint64]udpHold),
	}
}

// errNotTransparent explains why one dial goes without the client's
// address; the dial then falls back to a plain connection.
type errNotTransparent struct{ reason string }

func (e *errNotTransparent) Error() string { return e.reason }

// eligible checks whether a dial to target can carry source, setting up
// the routing on first use. An error says why not (for the debug log); it
// is never fatal to the dial.
func (t *transparency) eligible(transport string, target, source netip.AddrPort) error {
	src, dst := source.Addr().Unmap(), target.Addr()
	switch {
	case !source.IsValid() || source.Port() == 0:
		return &errNotTransparent{"no client address"}
	case src.IsLoopback() || src.IsUnspecified() || src.IsMulticast():
		return &errNotTransparent{"the client is on loopback"}
	case src.Is4() != dst.Is4():
		return &errNotTransparent{"the client's address family differs from the target's"}
	case dst.Zone() != "" || src.Zone() != "":
		return &errNotTransparent{"scoped (link-local) addresses are not supported"}
	case slices.ContainsFunc(t.sandbox, func(p netip.Prefix) bool { return p.Contains(src) }):
		return &errNotTransparent{"the client's address is in the sandbox's own subnet"}
	}
	rt, err := t.ready()
	if err != nil {
		return err
	}
	if dst.Is6() && !t.v6 {
		return &errNotTransparent{"IPv6 is not available in the namespace"}
	}
	if transport == "udp" {
		t.mu.Lock()
		off := t.udpOff
		t.mu.Unlock()
		if off != nil {
			return off
		}
	}
	// A loopback target is the namespace's own by definition. Looked up,
	// ::1 came back not local about once in 30 runs of 20 concurrent UDP
	// flows (TestPortsKeepSourceIP), and that flow lost its client's
	// address.
	if !dst.IsLoopback() {
		local, err := rt.IsLocal(route.Flow{Dst: dst})
		if err != nil {
			return err
		}
		if !local {
			return &errNotTransparent{"the target is not an address of the namespace"}
		}
	}
	if local, err := rt.IsLocal(route.Flow{Dst: src}); err != nil {
		return err
	} else if local {
		return &errNotTransparent{"the client's address is one the namespace owns"}
	}
	return nil
}

// ready sets up the TCP routing and sysctls once, and returns the routing
// socket, or the error that keeps transparency off.
func (t *transparency) ready() (*route.Routing, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.tried {
		t.tried = true
		if err := t.setup(); err != nil {
			t.undoLocked()
			t.setupErr = &errNotTransparent{err.Error()}
			t.log.Warn("portfwd: cannot keep the clients' addresses on published ports; connections arrive from the namespace's own address instead (start with --source-ip-transparent=false to silence this)",
				"err", err)
		}
	}
	if t.setupErr != nil {
		return nil, t.setupErr
	}
	return t.rt, nil
}

// setup runs with t.mu held.
func (t *transparency) setup() error {
	err := t.inNS(func() error {
		rt, err := route.Open()
		if err != nil {
			return err
		}
		t.rt = rt
		if ct, err := conntrack.Open(); err == nil {
			t.ct = ct
		} else {
			t.log.Debug("portfwd: no connection tracking lookups; TCP redirected inside waits for the dial timeout", "err", err)
		}
		for _, name := range transparentSysctls {
			err := os.WriteFile("/proc/sys/"+name, []byte("1\n"), 0)
			if errors.Is(err, fs.ErrNotExist) && name == "net/ipv6/fwmark_reflect" {
				continue // IPv6 disabled in this kernel or namespace
			}
			if err != nil {
				return fmt.Errorf("set %s=1 in the namespace: %w", name, err)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	for _, v6 := range []bool{false, true} {
		dst := netip.MustParsePrefix("0.0.0.0/0")
		if v6 {
			dst = netip.MustParsePrefix("::/0")
		}
		local := route.LocalRoute{Table: transparentTable, Dst: dst}
		err := t.rt.AddLocalRoute(local)
		if err == nil || errors.Is(err, fs.ErrExist) {
			t.setupRoutes = append(t.setupRoutes, local)
			for _, rule := range []route.Rule{
				{IPv6: v6, Priority: tcpRulePriority, Table: transparentTable, Mark: transparentMark},
				{IPv6: v6, Priority: fwdRulePriority, IIf: "lo", Goto: fwdRulePriority + 2},
				{IPv6: v6, Priority: fwdRulePriority + 1, IPProto: unix.IPPROTO_UDP, Table: udpForwardTable},
				{IPv6: v6, Priority: fwdRulePriority + 2, Nop: true},
			} {
				err = t.rt.AddRule(rule)
				if errors.Is(err, fs.ErrExist) {
					err = nil
				}
				if err != nil {
					break
				}
				t.setupRules = append(t.setupRules, rule)
			}
		}
		if err != nil {
			if v6 && (errors.Is(err, unix.EAFNOSUPPORT) || errors.Is(err, unix.EOPNOTSUPP)) {
				t.log.Debug("portfwd: no IPv6 policy routing in the namespace; IPv6 clients' addresses are not kept", "err", err)
				break
			}
			return err
		}
		t.v6 = v6
	}
	// The kernel must agree: marked packets to an address that is not the
	// namespace's are local now, unmarked ones are not.
	probe := netip.MustParseAddr("198.51.100.1") // TEST-NET-2: never an address of the namespace
	marked, err := t.rt.IsLocal(route.Flow{Dst: probe, Mark: transparentMark})
	if err != nil {
		return err
	}
	plain, err := t.rt.IsLocal(route.Flow{Dst: probe})
	if err != nil {
		return err
	}
	if !marked || plain {
		return fmt.Errorf("the kernel does not route by firewall mark as expected (marked local: %v, unmarked local: %v)", marked, plain)
	}
	return nil
}

// errRedirected: a firewall inside sent the connection elsewhere.
type errRedirected struct{ to netip.AddrPort }

func (e *errRedirected) Error() string {
	return fmt.Sprintf("redirected inside to %s, where replies to the client's address cannot come back", e.to)
}

// checkRedirect asks conntrack whether the TCP connection from source to
// target, whose SYN has just left, was redirected (see above).
func (t *transparency) checkRedirect(source, target netip.AddrPort) error {
	t.mu.Lock()
	ct := t.ct
	t.mu.Unlock()
	if ct == nil {
		return nil
	}
	from, err := ct.ReplySource(unix.IPPROTO_TCP, netip.AddrPortFrom(source.Addr().Unmap(), source.Port()), target)
	if err != nil {
		if !errors.Is(err, conntrack.ErrNotTracked) {
			t.log.Debug("portfwd: conntrack lookup", "err", err)
		}
		return nil
	}
	if from != target {
		return &errRedirected{to: from}
	}
	return nil
}

// acquireUDP adds (or counts) the rule and route that bring the replies of
// a flow from source to target back to the child, for dial id.
func (t *transparency) acquireUDP(id uint64, target, source netip.AddrPort) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.rt == nil || t.setupErr != nil {
		return &errNotTransparent{"transparency is not set up"}
	}
	if t.udpOff != nil {
		return t.udpOff
	}
	dst, src := target.Addr(), source.Addr().Unmap()
	table, ok := t.tables[dst]
	if !ok {
		if len(t.tables) >= maxTransparentAddrs {
			return &errNotTransparent{fmt.Sprintf("more than %d target addresses", maxTransparentAddrs)}
		}
		table = udpTableBase + uint32(len(t.tables))
		t.tables[dst] = table
	}
	h := udpHold{
		rule:     route.Rule{IPv6: dst.Is6(), Priority: udpRulePriority, Table: table, IPProto: unix.IPPROTO_UDP, SPort: target.Port()},
		route:    route.LocalRoute{Table: table, Dst: netip.PrefixFrom(src, src.BitLen()), Src: dst},
		fwdRoute: route.LocalRoute{Table: udpForwardTable, Dst: netip.PrefixFrom(src, src.BitLen())},
	}
	if t.rules[h.rule] == 0 {
		if err := t.rt.AddRule(h.rule); err != nil && !errors.Is(err, fs.ErrExist) {
			return err
		}
	}
	t.rules[h.rule]++
	for i, rt := range []route.LocalRoute{h.route, h.fwdRoute} {
		if t.routes[rt] == 0 {
			if err := t.rt.AddLocalRoute(rt); err != nil && !errors.Is(err, fs.ErrExist) {
				t.dropLocked(h, i)
				return err
			}
		}
		t.routes[rt]++
	}
	t.held[id] = h
	if t.selectorsChecked {
		return nil
	}
	t.selectorsChecked = true
	if err := t.checkSelectorsLocked(h, src); err != nil {
		delete(t.held, id)
		t.dropLocked(h, 2)
		t.udpOff = &errNotTransparent{err.Error()}
		t.log.Warn("portfwd: cannot keep the clients' addresses on published UDP ports (TCP still keeps them)", "err", err)
		return t.udpOff
	}
	return nil
}

// checkSelectorsLocked makes sure the kernel honours the rule's protocol
// and port (Linux >= 4.17): an older one would take the rule for "all
// traffic", and route everything the namespace sends to this client to
// itself. Checked while the first rule and route are in place.
func (t *transparency) checkSelectorsLocked(h udpHold, client netip.Addr) error {
	other := h.rule.SPort + 1
	if other == 0 {
		other = 1
	}
	local, err := t.rt.IsLocal(route.Flow{Dst: client, IPProto: unix.IPPROTO_UDP, SPort: other})
	if err != nil {
		return err
	}
	if local {
		return errors.New("the kernel ignores the protocol and port of routing rules (Linux 4.17 or later needed)")
	}
	return nil
}

// releaseUDP drops what dial id's flow held; unknown ids are ignored.
func (t *transparency) releaseUDP(id uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	h, ok := t.held[id]
	if !ok {
		return
	}
	delete(t.held, id)
	t.dropLocked(h, 2)
}

// dropLocked counts one use of h's rule and of its first routes routes
// down and deletes what is no longer used.
func (t *transparency) dropLocked(h udpHold, routes int) {
	for _, rt := range []route.LocalRoute{h.route, h.fwdRoute}[:routes] {
		if t.routes[rt]--; t.routes[rt] <= 0 {
			delete(t.routes, rt)
			if err := t.rt.DelLocalRoute(rt); err != nil {
				t.log.Warn("portfwd: cannot remove a route for a UDP client", "err", err)
			}
		}
	}
	if t.rules[h.rule]--; t.rules[h.rule] <= 0 {
		delete(t.rules, h.rule)
		if err := t.rt.DelRule(h.rule); err != nil {
			t.log.Warn("portfwd: cannot remove a routing rule for a published UDP port", "err", err)
		}
	}
}

// close removes every rule and route this transparency added (the
// sysctls stay) and closes the routing socket.
func (t *transparency) close() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.undoLocked()
}

func (t *transparency) undoLocked() {
	if t.rt == nil {
		return
	}
	for id, h := range t.held {
		delete(t.held, id)
		t.dropLocked(h, 2)
	}
	for _, r := range slices.Backward(t.setupRules) {
		if err := t.rt.DelRule(r); err != nil {
			t.log.Debug("portfwd: remove rule", "err", err)
		}
	}
	for _, r := range t.setupRoutes {
		if err := t.rt.DelLocalRoute(r); err != nil {
			t.log.Debug("portfwd: remove route", "err", err)
		}
	}
	t.setupRules, t.setupRoutes = nil, nil
	t.rt.Close()
	t.rt = nil
	if t.ct != nil {
		t.ct.Close()
		t.ct = nil
	}
	if t.setupErr == nil {
		t.setupErr = &errNotTransparent{"closed"}
	}
}
