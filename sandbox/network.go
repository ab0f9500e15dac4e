package sandbox

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/gonetns/gonetns/api"
	"github.com/gonetns/gonetns/confine"
	"github.com/gonetns/gonetns/dns"
	"github.com/gonetns/gonetns/implicit"
	"github.com/gonetns/gonetns/internal/fdbudget"
	"github.com/gonetns/gonetns/internal/flowtable"
	"github.com/gonetns/gonetns/internal/route"
	"github.com/gonetns/gonetns/internal/wire"
	"github.com/gonetns/gonetns/nat"
	"github.com/gonetns/gonetns/pcap"
	"github.com/gonetns/gonetns/port"
	"github.com/gonetns/gonetns/portfwd"
	"github.com/gonetns/gonetns/stack"
	"github.com/gonetns/gonetns/tap"
	"github.com/gonetns/gonetns/userns"
)

// network is the parent's side of the sandbox network: the netstack with
// NAT and DNS (--net=builtin), published ports (--port-driver=builtin) and
// the REST API. Close undoes what start did, in reverse.
type network struct {
	cfg Config
	sd  *userns.StateDir
	log *slog.Logger

	addrs     addrPlan
	upstreams []netip.AddrPort
	budget    fdbudget.Budget // caps on what holds descriptors

	portsChild *os.File // the child's end of the dial protocol's socket pair
	dialer     *portfwd.Dialer
	ports      *portfwd.Manager
	// With --port-driver=implicit: the listener reports' socket pair and
	// the driver that publishes them (and serves the API).
	watchChild *os.File
	watch      *wire.Conn
	implicit   *implicit.Driver
	api        *api.Server
	childPID   int

	link       linkInfo // the device the child opened
	policy     *nat.Policy
	out4, out6 netip.Addr   // --outbound-addr, --outbound-addr6, resolved
	pcap       *pcap.Writer // --pcap
	st         *stack.Stack
	nat        *nat.NAT
	dns        *dns.Server

	// confinement is what confine applied (ConfineNetworkProcess), once
	// it has; the API, already serving, reads it.
	confinement atomic.Pointer[confine.Report]

	closeOnce sync.Once
}

// addrPlan are the addresses of --net=builtin, from --cidr, and with
// --ipv6 the IPv6 ones slirp4netns uses.
type addrPlan struct {
	subnet  netip.Prefix
	gateway netip.Addr // .2, the host's loopback
	dns     netip.Addr // .3
	child   netip.Addr // .100

	subnet6                netip.Prefix // fd00::/64; invalid without --ipv6
	gateway6, dns6, child6 netip.Addr
}

// idleRelease is how long the sandbox's network must be quiet before the
// network process gives back the memory its traffic used (stack.Config.
// OnIdle): long enough that a conversation's pauses do not each cost a
// collection, short enough that a burst's memory does not linger.
const idleRelease = time.Second

// releaseMemory gives back to the system the memory the traffic used, as
// soon as the sandbox's network is quiet rather than minutes later when
// Go's scavenger gets to it: a collection (it moves the buffers pooled for
// the packet path, sync.Pool, to where the next frees them), then two
// releases (each a collection and a scavenge; the second returns what the
// first's sweep left free), a few milliseconds each quiet spell. Measured
// after 2,000 new connections and 20,000 round trips (MTU 65520): the
// network process's private memory 3 s later, 6.2-6.6 MiB before this,
// 3.0-3.2 MiB with it; in a 4-minute soak, at its quiet points, 3.27-3.51
// MiB with two releases against 3.30-3.73 with one.
//
// With more than one P (the event loop's), the release runs on one: a
// collection flushes the page caches of idle Ps only, and its caller
// parks until it ends and may come back on another P than the one
// drainPageCache then empties. With the second P, the soak's quiet points
// kept 0-248 KiB of free heap and moved 3.4-3.6 MiB in 5 minutes
// (the event loop); shrinking to one P flushes the other's caches.
func releaseMemory(log *slog.Logger) {
	if n := runtime.GOMAXPROCS(0); n > 1 {
		runtime.GOMAXPROCS(1)
		defer runtime.GOMAXPROCS(n)
	}
	runtime.GC()
	debug.FreeOSMemory()
	drainPageCache()
	debug.FreeOSMemory()
	if !log.Enabled(context.Background(), slog.LevelDebug) {
		return
	}
	// What stays after the release, for a person chasing the network
	// process's memory (--debug); and how much the traffic allocated
	// since the start, and how many collections that took (the packet
	// path allocates nothing per frame: allocations per round trip show
	// if it does again), and how many goroutines it started (the packet
	// path starts none: a goroutine started afresh may take a stack whose
	// pages are new).
	samples := make([]metrics.Sample, len(memoryClasses), len(memoryClasses)+3)
	for i, name := range memoryClasses {
		samples[i].Name = "/memory/classes/" + name + ":bytes"
	}
	samples = append(samples, metrics.Sample{Name: "/gc/heap/allocs:objects"}, metrics.Sample{Name: "/gc/cycles/total:gc-cycles"},
		metrics.Sample{Name: "/sched/goroutines-created:goroutines"})
	counterNames := [...]string{"allocations", "collections", "goroutines"}
	metrics.Read(samples)
	attrs := make([]any, 0, 2*len(samples))
	for i, sm := range samples {
		if sm.Value.Kind() != metrics.KindUint64 {
			continue
		}
		if i < len(memoryClasses) {
			attrs = append(attrs, memoryClasses[i], sm.Value.Uint64()>>10)
		} else {
			attrs = append(attrs, counterNames[i-len(memoryClasses)], sm.Value.Uint64())
		}
	}
	log.Debug("the network is quiet: memory given back (KiB by class), allocations, collections and goroutines started since the start", attrs...)
}

// drainPageCache empties the page cache of the P it runs on, so that the
// release after it can return those pages: Go keeps up to 64 free pages
// (512 KiB) per P for its small allocations, flushes them at a collection
// only for Ps that are idle (never the one running the release) and
// hides them from its scavenger. One-page objects take the cache's pages
// one by one until it is empty (a refill comes from pages already
// released, which the release returns again); the collection in the
// release frees them. Measured at the quiet points of soaks
// (scripts/soak.sh with --debug): the free memory the release left behind
// was 0-416 KiB in a 30-minute soak before this (42 of 59 quiet points
// above 0; the private memory's only movement between them, 3.21 to 3.67
// MiB), 0 at every one of a 6-minute soak's 11 after it (3.21 to 3.29
// MiB).
func drainPageCache() {
	const pages = 64 // runtime.pageCachePages
	var hold [pages]*[8192]byte
	for i := range hold {
		hold[i] = new([8192]byte)
	}
	runtime.KeepAlive(&hold)
}

// memoryClasses are the runtime's memory classes releaseMemory reports.
var memoryClasses = []string{
	"heap/objects", "heap/unused", "heap/free", "heap/released", "heap/stacks",
	"os-stacks", "metadata/mspan/inuse", "metadata/mcache/inuse", "metadata/other", "other",
}

func planAddrs(cidr netip.Prefix, ipv6 bool) addrPlan {
	p := addrPlan{subnet: cidr, gateway: nthAddr(cidr, 2), dns: nthAddr(cidr, 3), child: nthAddr(cidr, 100)}
	if ipv6 {
		p.subnet6 = netip.MustParsePrefix("fd00::/64")
		p.gateway6, p.dns6, p.child6 = nthAddr(p.subnet6, 2), nthAddr(p.subnet6, 3), nthAddr(p.subnet6, 0x100)
	}
	return p
}

// prefixes are the stack's own addresses with their subnet's prefix.
func (p addrPlan) stackAddrs() []netip.Prefix {
	a := []netip.Prefix{netip.PrefixFrom(p.gateway, p.subnet.Bits()), netip.PrefixFrom(p.dns, p.subnet.Bits())}
	if p.subnet6.IsValid() {
		a = append(a, netip.PrefixFrom(p.gateway6, 64), netip.PrefixFrom(p.dns6, 64))
	}
	return a
}

// dnsAddrs are the sandbox's DNS server addresses.
func (p addrPlan) dnsAddrs() []netip.Addr {
	if p.subnet6.IsValid() {
		return []netip.Addr{p.dns, p.dns6}
	}
	return []netip.Addr{p.dns}
}

// newNetwork checks and prepares what does not need the child yet: DNS
// upstreams, the dial protocol's socket pair.
func newNetwork(cfg Config, sd *userns.StateDir) (*network, error) {
	n := &network{cfg: cfg, sd: sd, log: cfg.Logger, addrs: planAddrs(cfg.CIDR, cfg.IPv6), budget: descriptorBudget(cfg.Logger)}
	if cfg.Net == NetBuiltin {
		warnHostOverlap(cfg.CIDR, n.log)
		n.upstreams = cfg.DNSUpstreams
		if len(n.upstreams) == 0 && !cfg.DisableDNS {
			rc, err := hostResolvConf()
			if err != nil {
				return nil, err
			}
			n.upstreams = rc.Upstreams()
		}
		var err error
		if n.policy, err = cfg.egressPolicy(); err != nil {
			return nil, err
		}
		if n.out4, err = resolveOutbound("--outbound-addr", cfg.OutboundAddr, false); err != nil {
			return nil, err
		}
		if n.out6, err = resolveOutbound("--outbound-addr6", cfg.OutboundAddr6, true); err != nil {
			return nil, err
		}
		if cfg.PCAP != "" {
			// Created now, so that a path that cannot be written fails
			// before the sandbox starts.
			if n.pcap, err = pcap.Create(cfg.PCAP, pcap.Config{MaxSize: cfg.PCAPMaxSize, Logger: n.log}); err != nil {
				return nil, fmt.Errorf("--pcap=%s: %w", cfg.PCAP, err)
			}
		}
	}
	if cfg.PortDriver != PortsNone {
		parentEnd, childEnd, err := wire.Socketpair()
		if err != nil {
			n.Close()
			return nil, err
		}
		c, err := wire.FileConn(parentEnd)
		parentEnd.Close()
		if err != nil {
			childEnd.Close()
			n.Close()
			return nil, err
		}
		n.dialer = portfwd.NewDialer(c)
		n.portsChild = childEnd
	}
	if cfg.PortDriver == PortsImplicit {
		parentEnd, childEnd, err := wire.Socketpair()
		if err != nil {
			n.Close()
			return nil, err
		}
		n.watch, err = wire.FileConn(parentEnd)
		parentEnd.Close()
		if err != nil {
			childEnd.Close()
			n.Close()
			return nil, err
		}
		n.watchChild = childEnd
	}
	return n, nil
}

// warnHostOverlap warns when the sandbox's subnet overlaps a network of
// the host (an interface's subnet, or a route): the sandbox then cannot
// reach that network's hosts, since their addresses are its own or its
// link's. A warning, not a refusal: some want exactly that (a subnet they
// never use from inside). It names the interface and a subnet to take
// instead.
func warnHostOverlap(cidr netip.Prefix, log *slog.Logger) {
	nets, err := route.Networks()
	if err != nil {
		log.Debug("cannot check --cidr against the host's networks", "err", err)
		return
	}
	prefixes := make([]netip.Prefix, len(nets))
	for i, hn := range nets {
		prefixes[i] = hn.Prefix
	}
	for _, hn := range nets {
		if !hn.Prefix.Overlaps(cidr) {
			continue
		}
		how := "choose a subnet that no interface or route of the host uses with --cidr"
		if alt, ok := freeSubnet(cidr.Bits(), append(prefixes, cidr)); ok {
			how += ", e.g. --cidr=" + alt.String()
		}
		log.Warn(fmt.Sprintf("--cidr=%s overlaps the host's network %s: the sandbox cannot reach the hosts of that network, whose addresses it takes for its own; %s", cidr, hn, how))
	}
}

// freeSubnet returns the first subnet of the given size in 10.0.2.0 and
// up, then 172.16.0.0/12 and 192.168.0.0/16, that overlaps none of taken.
func freeSubnet(bits int, taken []netip.Prefix) (netip.Prefix, bool) {
	for _, r := range []struct {
		start netip.Addr
		space netip.Prefix
	}{
		{netip.MustParseAddr("10.0.2.0"), netip.MustParsePrefix("10.0.0.0/8")},
		{netip.MustParseAddr("172.16.0.0"), netip.MustParsePrefix("172.16.0.0/12")},
		{netip.MustParseAddr("192.168.0.0"), netip.MustParsePrefix("192.168.0.0/16")},
	} {
		if bits < r.space.Bits() {
			continue
		}
		step := uint32(1) << (32 - bits)
		a4 := r.start.As4()
		v := (uint32(a4[0])<<24 | uint32(a4[1])<<16 | uint32(a4[2])<<8 | uint32(a4[3])) &^ (step - 1)
		for i := 0; i < 1<<16; i++ {
			c := netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}), bits)
			if !r.space.Contains(c.Addr()) {
				break
			}
			if !slices.ContainsFunc(taken, c.Overlaps) {
				return c, true
			}
			v += step
		}
	}
	return netip.Prefix{}, false
}

// descriptorBudget raises the open-files limit and divides it among what
// holds descriptors (internal/fdbudget), so that published ports cannot
// take those that DNS, the API and the NAT need.
func descriptorBudget(log *slog.Logger) fdbudget.Budget {
	limit, err := fdbudget.Raise()
	if err != nil {
		log.Warn(err.Error())
	}
	b := fdbudget.For(limit)
	log.Debug("descriptor budget", "budget", b.String())
	return b
}

func hostResolvConf() (dns.ResolvConf, error) {
	f, err := os.Open("/etc/resolv.conf")
	if errors.Is(err, os.ErrNotExist) {
		return dns.ResolvConf{}, nil
	}
	if err != nil {
		return dns.ResolvConf{}, fmt.Errorf("read the host's DNS configuration: %w (or give --dns-upstream)", err)
	}
	defer f.Close()
	return dns.ParseResolvConf(f)
}

// prepareChild adds what the child needs for the network to its options.
func (n *network) prepareChild(u *userns.Options) {
	nc := netConfig{Mode: n.cfg.Net, WatchListeners: n.watchChild != nil}
	if n.cfg.DetachNetNS {
		nc.DetachTo = n.sd.Join(userns.NetNS)
	}
	switch n.cfg.Net {
	case NetNone:
		u.Network = nc
	case NetBuiltin:
		nc.Link = n.linkPlan()
		u.Network = nc
		rc, _ := hostResolvConf()
		u.ResolvConf = dns.NamespaceResolvConf(rc, n.addrs.dnsAddrs()...)
		u.Hosts = namespaceHosts()
		// Detached, the command is not in the sandbox's network: it keeps
		// the host's resolv.conf; the sandbox's is in the state dir for
		// what runs in the detached namespace (nsenter, containers).
		u.StateOnlyEtcFiles = n.cfg.DetachNetNS
	}
	if n.portsChild != nil {
		u.ExtraFiles = append(u.ExtraFiles, n.portsChild)
	}
	if n.watchChild != nil {
		u.ExtraFiles = append(u.ExtraFiles, n.watchChild)
	}
}

// linkPlan is the configuration of the sandbox's interface: the device
// (--link), the addresses of --cidr (and --ipv6), the MTU, the name.
func (n *network) linkPlan() linkConfig {
	l := linkConfig{Kind: n.cfg.Link, VNetHdr: true, Iface: tap.LinkConfig{
		Name:    n.cfg.IfName,
		MTU:     n.cfg.MTU,
		Address: netip.PrefixFrom(n.addrs.child, n.addrs.subnet.Bits()),
		Gateway: n.addrs.gateway,
	}}
	if n.addrs.subnet6.IsValid() {
		l.Iface.Address6 = netip.PrefixFrom(n.addrs.child6, 64)
		l.Iface.Gateway6 = n.addrs.gateway6
	}
	return l
}

// namespaceHosts is the host's /etc/hosts with the host name mapped to
// loopback, as RootlessKit writes it.
func namespaceHosts() []byte {
	hosts, _ := os.ReadFile("/etc/hosts")
	name, _ := os.Hostname()
	out := append([]byte(nil), hosts...)
	if len(out) > 0 && out[len(out)-1] != '\n' {
		out = append(out, '\n')
	}
	if name != "" {
		out = fmt.Appendf(out, "# added by gonetns\n127.0.0.1 %s\n::1 %s\n", name, name)
	}
	return out
}

// start brings up the parent's side once the child (or the helper in a
// joined namespace) has set up its own: the netstack on the TAP it sent,
// then ports and, with a state directory, the API. pid is the process in
// the namespace.
func (n *network) start(pid int, info json.RawMessage, files []*os.File) error {
	n.childPID = pid
	if n.portsChild != nil {
		n.portsChild.Close() // the child has its copy now
		n.portsChild = nil
	}
	if n.watchChild != nil {
		n.watchChild.Close()
		n.watchChild = nil
	}
	if n.cfg.Net == NetBuiltin {
		var li linkInfo
		if err := json.Unmarshal(info, &li); err != nil {
			wire.CloseFiles(files)
			return fmt.Errorf("link info from the child: %w", err)
		}
		err := n.startStack(files, li)
		wire.CloseFiles(files)
		if err != nil {
			return err
		}
	} else {
		wire.CloseFiles(files)
	}
	if n.dialer != nil {
		n.dialer.Start()
		n.ports = portfwd.NewManager(portfwd.Config{Dialer: n.dialer, Logger: n.log,
			MaxTCPConns: n.budget.PortTCPConns, MaxUDPFlows: n.budget.PortUDPFlows,
			SplicePipes: n.budget.SplicePipes, SpliceIdlePipes: n.budget.SpliceIdlePipes,
			TCPIdleTimeout: n.cfg.PortTCPIdleTimeout, UDPIdleTimeout: n.cfg.PortUDPIdleTimeout,
			SourceIPTransparent: !n.cfg.DisableSourceIPTransparent})
		for _, spec := range n.cfg.Publish {
			// AddPort's errors name the spec already.
			if _, err := n.ports.AddPort(context.Background(), spec); err != nil {
				return err
			}
		}
		if n.watch != nil {
			n.implicit = implicit.New(n.watch, implicit.Config{Manager: n.ports, Logger: n.log, MaxPorts: n.budget.ImplicitPorts})
			n.watch = nil // the driver owns it
			n.implicit.Start()
		}
	}
	if n.sd == nil {
		return nil // a joined namespace: slirp4netns's callers have their own API
	}
	return n.startAPI()
}

// portDriver is what publishes ports for the API and Sandbox's methods:
// the implicit driver (which shares the Manager with explicit ports), the
// Manager, or nil with --port-driver=none.
func (n *network) portDriver() port.Manager {
	switch {
	case n.implicit != nil:
		return n.implicit
	case n.ports != nil:
		return n.ports
	}
	return nil
}

func (n *network) startStack(files []*os.File, li linkInfo) error {
	n.link = li
	if li.TAPError != "" {
		n.log.Info(li.TAPError + ": the sandbox's link is a veth pair read through packet sockets instead (--link=packet; --link=tap insists on the TAP)")
	}
	dev, err := newDevice(li, files)
	if err != nil {
		return err
	}
	if n.pcap != nil {
		// Only with --pcap: without it the link has no extra layer.
		dev = n.pcap.Wrap(dev)
		n.pcap.Start()
	}
	n.nat, err = nat.New(nat.Config{
		Subnet:             n.addrs.subnet,
		Gateway:            n.addrs.gateway,
		Subnet6:            n.addrs.subnet6,
		Gateway6:           n.addrs.gateway6,
		HostLoopback:       !n.cfg.DisableHostLoopback,
		Policy:             n.policy,
		OutboundAddr:       n.out4,
		OutboundAddr6:      n.out6,
		OutboundEverywhere: n.cfg.OutboundEverywhere,
		MaxTCPConns:        n.budget.NATTCPConns,
		MaxUDPFlows:        n.budget.NATUDPFlows,
		MaxEchoFlows:       n.budget.EchoFlows,
		// The first UDP flow comes after the stack has started (n.st is
		// set before Start): its answers are read on the event loop when
		// there is one.
		Loop:   func() flowtable.Loop { return n.st },
		Logger: n.log,
	})
	if err != nil {
		dev.Close()
		return err
	}
	var dialTCP func(src, dst netip.AddrPort) (stack.HostTCP, error)
	if !n.cfg.DisableTCPFastPath {
		dialTCP = n.nat.DialTCP
	}
	busyPoll, busyWhy := n.cfg.busyPoll()
	n.st, err = stack.New(stack.Config{
		Device:    dev,
		MTU:       uint32(n.cfg.MTU),
		Addresses: n.addrs.stackAddrs(),
		TCP:       n.nat.HandleTCP,
		DialTCP:   dialTCP,
		EventLoop: n.cfg.RunsEventLoop(),
		BusyPoll:  busyPoll,
		OnIdle:    func() { releaseMemory(n.log) },
		IdleAfter: idleRelease,
		// Half-open connections hold a host socket each: at most half
		// of the NAT's share, so that a flood of spoofed SYNs leaves
		// room for the connections that complete (a burst beyond it
		// waits: tcpfast's Engine.evict).
		MaxHalfOpenTCP: min(stack.DefaultMaxHalfOpenTCP, n.budget.NATTCPConns/2),
		UDP:            n.nat.HandleUDP,
		Echo:           n.nat.HandleEcho,
		Logger:         n.log,
	})
	if err != nil {
		dev.Close()
		return err
	}
	if err := n.st.Start(); err != nil {
		return err
	}
	if !n.st.RunsEventLoop() {
		busyPoll, busyWhy = 0, "no event loop on this link"
	}
	if n.cfg.BusyPoll > 0 && busyPoll == 0 {
		n.log.Info("--busy-poll has no effect here: it is the event loop that polls, the event loop reads the TAP itself, and this link is not (the packet link, or --pcap's recorder in between); frames are read on a goroutine, as with --event-loop=false")
	}
	n.nat.Start()
	n.log.Debug("netstack up", "link", li.Kind, "name", li.Name, "vnet_hdr", li.VNetHdr, "offload", li.Offload, "mtu", n.cfg.MTU,
		"packet_sockets", li.Sockets, "packet_rcvbuf", li.RecvBuf, "event_loop", n.st.RunsEventLoop(),
		"busy_poll", busyPoll, "busy_poll_why", busyWhy)
	if n.policy != nil {
		n.log.Debug("egress policy", "rules", fmt.Sprint(n.policy.Rules()), "default_allow", n.policy.DefaultAllow())
	}

	if n.cfg.DisableDNS {
		n.log.Debug("no DNS service", "addr", n.addrs.dns)
		return nil
	}
	n.dns, err = dns.New(dns.Config{Upstreams: n.upstreams, Logger: n.log})
	if err != nil {
		return err
	}
	for _, a := range n.addrs.dnsAddrs() {
		dnsAddr := netip.AddrPortFrom(a, 53)
		pc, err := n.st.ListenUDP(dnsAddr)
		if err != nil {
			return err
		}
		ln, err := n.st.ListenTCP(dnsAddr)
		if err != nil {
			pc.Close()
			return err
		}
		n.dns.Start(pc, ln)
		n.log.Debug("DNS forwarder up", "addr", dnsAddr, "upstreams", fmt.Sprint(n.upstreams))
	}
	return nil
}

// startAPI serves RootlessKit's REST API on <state-dir>/api.sock.
func (n *network) startAPI() error {
	ln, err := api.Listen(n.sd.Join(userns.APISocket))
	if err != nil {
		return err
	}
	// With --port-driver=none there is no port driver: the API answers
	// info and refuses port calls.
	n.api = api.NewServer(api.ServerConfig{Ports: n.portDriver(), Info: n.info, Logger: n.log, MaxConns: n.budget.APIConns})
	n.api.Serve(ln)
	return nil
}

// confine restricts this process to what the network still needs, once
// everything is set up (the command runs): the state directory (api.sock
// and the files removed at exit) and the removal of the state directory
// itself; descriptors already open (the TAP, --pcap, sockets, the control
// channels) keep working, and so does every socket call. Nothing else of
// the file system, no exec, no ptrace, no mounts or namespaces: see
// package confine.
func (n *network) confine() {
	r := confine.Apply(confine.Files{
		ReadWriteDirs: []string{n.sd.Path},
		RemoveDirsIn:  []string{filepath.Dir(n.sd.Path)},
	})
	n.confinement.Store(&r)
	for _, l := range []struct {
		name string
		res  confine.Result
	}{{"landlock", r.Landlock}, {"seccomp", r.Seccomp}} {
		if l.res.Err != nil {
			n.log.Warn("the network process could not confine itself: "+l.name+": "+l.res.Detail+
				"; it runs on without this layer (--confine-network-process=false silences this)", "layer", l.name)
			continue
		}
		n.log.Debug(l.name+": "+l.res.Detail, "layer", l.name, "applied", l.res.Applied)
	}
}

// info is the body of GET /v1/info.
func (n *network) info() api.Info {
	i := api.Info{Version: n.cfg.Version, StateDir: n.sd.Path, ChildPID: n.childPID}
	if r := n.confinement.Load(); r != nil {
		i.Confinement = &api.ConfinementInfo{Landlock: r.Landlock.Detail, Seccomp: r.Seccomp.Detail}
	}
	switch n.cfg.Net {
	case NetBuiltin:
		i.NetworkDriver = &api.NetworkDriverInfo{Driver: "gonetns", DNS: n.addrs.dnsAddrs(), ChildIP: n.addrs.child, Link: string(n.link.Kind), Egress: n.egressInfo()}
	case NetNone:
		i.NetworkDriver = &api.NetworkDriverInfo{Driver: "none"}
	}
	if n.ports != nil {
		transparent := !n.cfg.DisableSourceIPTransparent
		i.PortDriver = &api.PortDriverInfo{Driver: string(n.cfg.PortDriver), Protos: port.Protos, SourceIPTransparent: &transparent}
		if n.implicit != nil {
			for _, u := range n.implicit.Unpublished() {
				i.PortDriver.Unpublished = append(i.PortDriver.Unpublished, api.UnpublishedPort{Spec: u.Spec, Reason: u.Reason, Retrying: u.Retrying})
			}
		}
	}
	i.Limits = n.limits()
	return i
}

// limits are the caps on what clients hold open, with their counters:
// the API's connections, the published ports' connections and flows, and
// the sandbox's own connections, flows and ping sessions through the NAT.
func (n *network) limits() []api.LimitInfo {
	var l []api.LimitInfo
	if n.api != nil {
		l = append(l, n.api.Stats().Limit())
	}
	if n.ports != nil {
		st := n.ports.TCPStats()
		tcp := api.LimitInfo{Name: "ports.tcp.connections", Max: st.Max, InUse: st.Open, Peak: st.Peak, Clients: st.Clients,
			Events: map[string]uint64{"reset": st.Reset, "preempted": st.Preempted, "endedIdle": st.IdleClosed}}
		if st.IdleTimeout > 0 {
			tcp.IdleTimeout = st.IdleTimeout.String()
		}
		us := n.ports.UDPStats()
		udp := api.LimitInfo{Name: "ports.udp.flows", Max: us.Max, InUse: us.Flows, Peak: us.Peak,
			IdleTimeout: cmp.Or(n.cfg.PortUDPIdleTimeout, portfwd.DefaultUDPIdleTimeout).String(),
			Events:      map[string]uint64{"evicted": us.Evicted, "endedIdle": us.Expired}}
		l = append(l, tcp, udp)
	}
	if n.nat != nil {
		tcp, udp, echo := n.nat.Stats()
		l = append(l,
			api.LimitInfo{Name: "nat.tcp.connections", Max: tcp.Max, InUse: tcp.Open, Peak: tcp.Peak,
				Events: map[string]uint64{"reset": tcp.Reset}})
		if n.st != nil {
			if f := n.st.FastTCPStats(); f.MaxHalfOpen > 0 {
				l = append(l, api.LimitInfo{Name: "nat.tcp.handshakes", Max: f.MaxHalfOpen, InUse: f.HalfOpen, Peak: f.PeakHalfOpen,
					Events: map[string]uint64{"evicted": f.Evicted, "deferred": f.Deferred}})
			}
		}
		l = append(l,
			api.LimitInfo{Name: "nat.udp.flows", Max: udp.Max, InUse: udp.Flows, Peak: udp.Peak,
				Events: map[string]uint64{"evicted": udp.Evicted, "endedIdle": udp.Expired}},
			api.LimitInfo{Name: "nat.ping.sessions", Max: echo.Max, InUse: echo.Flows, Peak: echo.Peak,
				Events: map[string]uint64{"evicted": echo.Evicted, "endedIdle": echo.Expired}})
	}
	return l
}

// egressInfo describes the egress policy for GET /v1/info.
func (n *network) egressInfo() *api.EgressInfo {
	e := &api.EgressInfo{Default: "allow", Rules: []api.EgressRule{}}
	if !n.policy.DefaultAllow() {
		e.Default = "deny"
	}
	for _, r := range n.policy.Rules() {
		action := "deny"
		if r.Allow {
			action = "allow"
		}
		e.Rules = append(e.Rules, api.EgressRule{Prefix: r.Prefix, Action: action, Origin: r.Origin})
	}
	return e
}

// settleMax bounds how long Close waits for the sandbox's kernel to send
// what its closed sockets still hold (stack.Sending) before the rest are
// reset: gonetns returns that much later at most, and only while such
// bytes still move. A local program's kernel keeps at it for minutes; a
// server reading 800 KB a second takes 10 s for the 8 MB a socket may
// hold.
const settleMax = 10 * time.Second

// settlePoll is how often settle looks whether the connections still send.
const settlePoll = 20 * time.Millisecond

// settle lets the sandbox's kernel finish what its connections still have
// to send (a program that closed and exited), the published ports' and
// the fast path's, for at most settleMax, before Close resets the rest.
// Relaying signals, the sandbox owns HUP, INT, QUIT and TERM: one of them
// (a Ctrl-C) cuts the wait short, the unfinished streams then reset as
// the wait's end would, where the signal's default action killed the
// process (QUIT with a dump of its goroutines, status 2).
func (n *network) settle() {
	if n.st == nil && n.ports == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), settleMax)
	defer cancel()
	if n.cfg.ForwardSignals {
		var stop context.CancelFunc
		ctx, stop = signal.NotifyContext(ctx, syscall.SIGHUP, syscall.SIGINT, syscall.SIGQUIT, syscall.SIGTERM)
		defer stop()
	}
	for n.ports != nil && n.ports.Sending() || n.st != nil && n.st.Sending() {
		select {
		case <-ctx.Done():
			return
		case <-time.After(settlePoll):
		}
	}
}

// Close stops everything start started, API first, netstack last.
func (n *network) Close() error {
	n.closeOnce.Do(func() {
		// With --debug, what each limit did over the run.
		for _, l := range n.limits() {
			n.log.Debug("limit", "name", l.Name, "max", l.Max, "peak", l.Peak, "events", fmt.Sprint(l.Events))
		}
		n.settle()
		if n.api != nil {
			n.api.Close()
		}
		if n.implicit != nil {
			n.implicit.Close()
		}
		if n.watch != nil {
			n.watch.Close()
		}
		if n.watchChild != nil {
			n.watchChild.Close()
		}
		if n.ports != nil {
			n.ports.Close()
		}
		if n.dialer != nil {
			n.dialer.Close()
		}
		if n.portsChild != nil {
			n.portsChild.Close()
		}
		if n.dns != nil {
			n.dns.Close()
		}
		// The stack before the NAT: closing it aborts handshakes still
		// in progress (which the NAT would otherwise wait for, up to the
		// SYN-ACK retries' two minutes) and every connection's endpoint.
		if n.st != nil {
			n.st.Close()
		}
		if n.nat != nil {
			n.nat.Close()
		}
		// After the stack, so its last frames are in the file.
		if n.pcap != nil {
			if err := n.pcap.Close(); err != nil {
				n.log.Warn(err.Error())
			}
		}
	})
	return nil
}
