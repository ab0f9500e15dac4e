package sandbox

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"strings"
	"time"

	"github.com/gonetns/gonetns/port"
	"github.com/gonetns/gonetns/userns"
)

// Net is how the sandbox is networked.
type Net string

const (
	// NetBuiltin is gonetns's own network: a TAP device in a new network
	// namespace, served by the userspace stack in this process (NAT of
	// TCP, UDP and ICMP echo to host sockets, DNS, the host's loopback at
	// the gateway address).
	NetBuiltin Net = "builtin"
	// NetNone is a new network namespace with only lo.
	NetNone Net = "none"
	// NetHost keeps the host's network namespace.
	NetHost Net = "host"
)

// PortDriver is how ports of the sandbox are published on the host.
type PortDriver string

const (
	// PortsBuiltin publishes the ports asked for (Config.Publish, the
	// REST API) by splicing host sockets to sockets in the namespace.
	PortsBuiltin PortDriver = "builtin"
	// PortsImplicit also publishes, on the same port of the host, every
	// port something starts listening on inside, and withdraws it when it
	// stops (as pasta's -t auto and -u auto).
	PortsImplicit PortDriver = "implicit"
	// PortsNone publishes nothing.
	PortsNone PortDriver = "none"
)

// SubIDSource is where subordinate ids come from.
type SubIDSource = userns.SubIDSource

// Sources of subordinate ids.
const (
	SubIDAuto    = userns.SubIDAuto
	SubIDStatic  = userns.SubIDStatic
	SubIDDynamic = userns.SubIDDynamic
)

// Defaults of the zero fields of Config.
var (
	DefaultCIDR = netip.MustParsePrefix("10.0.2.0/24")
)

const (
	DefaultMTU    = 65520
	DefaultIfName = "tap0"
	MinMTU        = 1280
	// MaxMTU is the largest MTU of a TAP device (64 KiB less the Ethernet
	// header and what the kernel reserves), as RootlessKit allows.
	MaxMTU = 65521
	// MaxBusyPoll bounds --busy-poll: a poll that long already outlasts
	// any answer worth waiting for awake (a host's server over loopback
	// answers in tens of microseconds), and each one costs as much CPU.
	MaxBusyPoll = time.Millisecond
	// DefaultBusyPoll is --busy-poll=auto's poll where it polls: it
	// covers a round trip to a server on the host's loopback.
	DefaultBusyPoll = 50 * time.Microsecond
)

// Config describes a sandbox. Its fields mirror gonetns's command-line
// flags (gonetns --help); the zero value of each is that flag's default,
// except where noted.
type Config struct {
	// Net is the network: NetBuiltin (default), NetNone or NetHost.
	Net Net
	// DetachNetNS keeps the command in the host's network namespace; the
	// sandbox's network namespace (with the builtin network, DNS and
	// published ports) is bind-mounted at <state dir>/netns for the
	// command to enter (nsenter -n...), as RootlessKit's --detach-netns.
	DetachNetNS bool
	// MTU of the sandbox's interface, MinMTU..MaxMTU; 0 means DefaultMTU.
	MTU int
	// CIDR is the sandbox's IPv4 subnet: the sandbox is .100, the gateway
	// (the host's loopback) .2, DNS .3. Zero means DefaultCIDR.
	CIDR netip.Prefix
	// IfName is the sandbox's interface; "" means DefaultIfName.
	IfName string
	// Link is the device behind the sandbox's interface (--link): LinkAuto
	// (the default, also ""), LinkTAP or LinkPacket.
	Link Link
	// DisableHostLoopback refuses connections to the gateway address (the
	// host's 127.0.0.1 and ::1).
	DisableHostLoopback bool
	// IPv6 adds fd00::100/64 inside, gateway fd00::2 (the host's ::1) and
	// DNS fd00::3.
	IPv6 bool
	// DisableTCPFastPath runs the sandbox's TCP connections through the
	// netstack's own TCP (--tcp-fast-path=false) instead of mirroring
	// each onto its host socket with no TCP implementation in between
	// (the TCP fast path, the default: faster round trips and new
	// connections, less CPU).
	DisableTCPFastPath bool
	// DisableEventLoop (--event-loop=false) reads the TAP on a reader
	// goroutine in Go's poller, and the fast path's host sockets on
	// another, instead of both on the fast path's own thread in one epoll
	// set (the event loop, the default: fewer system calls and less CPU
	// per round trip and per new connection; docs/design.md, "The event
	// loop"). While traffic flows, that thread holds a P as it sleeps in
	// epoll_wait (once quiet it sleeps in Go's poller): the process needs
	// GOMAXPROCS one above what it needs otherwise (cmd/gonetns adds it).
	// Without the fast path, or with a device that is not the TAP itself
	// (--pcap, --link=packet), there is no loop.
	DisableEventLoop bool
	// BusyPoll (--busy-poll) makes the event loop's thread poll for up to
	// this long for the next event before it sleeps, adapting below it to
	// the traffic, and only while no other thread wants a CPU
	// (docs/design.md, "Busy polling"): shorter round trips for CPU time
	// that would otherwise be idle. At most MaxBusyPoll; one set needs the
	// event loop. Zero (--busy-poll=auto) decides for the machine:
	// DefaultBusyPoll where an idle CPU halts without polling first (most
	// virtual machines), and where the loop runs; else none.
	BusyPoll time.Duration
	// DisableBusyPoll (--busy-poll=0) never polls.
	DisableBusyPoll bool
	// DNSUpstreams are the servers the sandbox's resolver forwards to;
	// none means the host's /etc/resolv.conf.
	DNSUpstreams []netip.AddrPort
	// DisableDNS runs no DNS service at the DNS address (slirp4netns's
	// --disable-dns): queries there are refused, never sent anywhere.
	DisableDNS bool

	// Allow and Deny are the egress policy's rules (--allow, --deny): the
	// host addresses the sandbox's TCP connections, UDP flows and ICMP
	// echo may go to, or not. The policy judges the address a host socket
	// would connect to: the destination itself, or for the gateway the
	// host's loopback address it stands for (so Deny 127.0.0.1/32 closes
	// the gateway). The most specific prefix decides; with any Allow rule,
	// what no rule covers is denied (an allow-list), otherwise allowed.
	// Refused TCP is reset, UDP and echo get ICMP "administratively
	// prohibited". DNS at the sandbox's DNS address is the sandbox's own
	// service: its queries go to the upstreams whatever the policy.
	Allow, Deny []netip.Prefix
	// DenyMetadata denies the cloud metadata services, 169.254.169.254
	// and fd00:ec2::254 (--deny-metadata); DenyPrivate denies the RFC 1918,
	// link-local and unique local ranges (--deny-private). An Allow of the
	// very same prefix overrides them.
	DenyMetadata, DenyPrivate bool
	// OutboundAddr and OutboundAddr6 are the source addresses of the host
	// sockets that carry the sandbox's TCP, UDP and ICMP echo
	// (--outbound-addr, --outbound-addr6): an IP address of the family, or
	// the name of an interface whose first address of the family (IPv6:
	// not link-local) is used, looked up at start. A loopback address
	// applies only to connections to the host's loopback (the gateway), any
	// other only to other destinations: a socket bound the other way round
	// could not work. "" leaves the choice to the kernel.
	OutboundAddr, OutboundAddr6 string
	// OutboundEverywhere applies an outbound address that is not a
	// loopback one to connections to the host's loopback too, as
	// slirp4netns does (its personality sets it).
	OutboundEverywhere bool

	// PCAP is a file to record the sandbox's virtual link into (--pcap):
	// every frame both ways, in pcap format for tcpdump -r and Wireshark.
	// "" records nothing.
	PCAP string
	// PCAPMaxSize bounds the PCAP file, in bytes; recording stops there.
	// 0 means pcap.DefaultMaxSize (256 MiB).
	PCAPMaxSize int64

	// PortDriver is how ports are published; "" means PortsBuiltin, or
	// PortsNone with NetHost.
	PortDriver PortDriver
	// Publish lists ports to publish at start.
	Publish []port.Spec
	// DisableSourceIPTransparent makes connections through published
	// ports come from the namespace's loopback inside instead of from the
	// client's address (--source-ip-transparent=false).
	DisableSourceIPTransparent bool
	// PortTCPIdleTimeout resets a connection through a published port
	// that has moved no byte either way for this long
	// (--port-tcp-idle-timeout); 0 means portfwd.DefaultTCPIdleTimeout
	// (2 h), negative never. PortUDPIdleTimeout ends a published port's
	// UDP flow (one client address) that has carried no datagram either
	// way for this long (--port-udp-idle-timeout); 0 means
	// portfwd.DefaultUDPIdleTimeout (60 s). docs/limits.md has why.
	PortTCPIdleTimeout, PortUDPIdleTimeout time.Duration

	// CopyUp lists directories replaced inside by writable copies
	// (tmpfs+symlink), e.g. /etc.
	CopyUp []string
	// Propagation of mounts inside: "rprivate" or "rslave"; "" means
	// userns.DefaultPropagation, rprivate.
	Propagation string
	// PIDNS, UTSNS, IPCNS and CgroupNS create those namespaces; with PIDNS
	// the command is PID 1.
	PIDNS, UTSNS, IPCNS, CgroupNS bool
	// InitProcess, with PIDNS, makes PID 1 an init of gonetns's that runs
	// the command as its child, relays every signal to it and reaps the
	// orphans (RootlessKit's layout; the rootlesskit personality sets it):
	// the command is not PID 1, and a signal without a handler of its own
	// still ends it.
	InitProcess bool
	// Reaper is RootlessKit's --reaper, "auto" (default), "true" or
	// "false": checked, and otherwise without effect, since the gonetns
	// child always reaps the command's orphans (it keeps the command's
	// tree together; see docs/containment.md).
	Reaper string
	// LeaveOrphans lets processes the command leaves behind run on after
	// it exits by itself; by default they are killed (--kill-orphans=false).
	// When gonetns or its child is killed they are killed in any case.
	LeaveOrphans bool
	// Subreaper makes this process the subreaper of the sandbox's
	// processes, so that nothing the command starts outlives the sandbox
	// even when the gonetns child is killed first (from inside the
	// sandbox, where it is visible without PIDNS): what it leaves comes
	// back to this process and is killed. It applies to the whole process
	// and is not undone; every process re-parented to it after the child
	// died is taken as the sandbox's. The gonetns command sets it; a
	// program that embeds the package and starts processes of its own
	// that may leave orphans should not.
	Subreaper bool
	// EvacuateCgroup2 names a cgroup v2 subgroup to move gonetns's own
	// cgroup's processes into (needs PIDNS and CgroupNS).
	EvacuateCgroup2 string
	// SubIDSource is where subordinate ids come from (default SubIDAuto).
	SubIDSource SubIDSource
	// StateDir holds lock, child_pid, api.sock (and netns); "" means a new
	// directory under $XDG_RUNTIME_DIR or /tmp. It is removed on exit.
	StateDir string

	// Env is added to the command's environment, after the process's own
	// and the ROOTLESSKIT_* variables.
	Env []string
	// Stdin, Stdout and Stderr of the command; nil means the process's.
	Stdin          io.Reader
	Stdout, Stderr io.Writer
	// ForwardSignals relays this process's HUP, INT, QUIT, TERM, USR1 and
	// USR2 to the command, as the gonetns command does.
	ForwardSignals bool

	// ConfineNetworkProcess makes this process, the sandbox's network,
	// confine itself once the sandbox runs (package confine): file access
	// limited to the state directory, and no exec, ptrace, mounts,
	// namespaces, bpf, module loading... for the rest of the process's
	// life, for every goroutine. The gonetns command turns it on
	// (--confine-network-process); a program that embeds the package
	// should only if it does nothing of the kind itself after Start, nor
	// starts a second sandbox. Unlike the other fields, its zero value is
	// not the flag's default.
	ConfineNetworkProcess bool

	// Debug turns on the child's debug log; Logger is the parent's (nil
	// discards).
	Debug  bool
	Logger *slog.Logger
	// Version is reported by GET /v1/info.
	Version string
}

// ErrInvalidConfig is wrapped by every error of Validate.
var ErrInvalidConfig = errors.New("invalid sandbox configuration")

// invalid wraps a reason in ErrInvalidConfig without repeating its text.
type invalid struct{ reason string }

func (e *invalid) Error() string        { return e.reason }
func (e *invalid) Is(target error) bool { return target == ErrInvalidConfig }

func invalidf(format string, a ...any) error { return &invalid{fmt.Sprintf(format, a...)} }

// RunsEventLoop reports whether the network reads its TAP on the fast
// path's thread (unless DisableEventLoop; never without the fast path).
func (c Config) RunsEventLoop() bool {
	return !c.DisableEventLoop && !c.DisableTCPFastPath
}

// busyPoll is the event loop's poll (BusyPoll, or what auto decides for
// this machine), with why, for the log.
func (c Config) busyPoll() (time.Duration, string) {
	switch {
	case c.DisableBusyPoll:
		return 0, "--busy-poll=0"
	case c.BusyPoll > 0:
		return c.BusyPoll, "--busy-poll"
	case !c.RunsEventLoop():
		return 0, "auto: no event loop"
	}
	halts, why := idleCPUsHalt()
	if !halts {
		return 0, "auto: " + why
	}
	return DefaultBusyPoll, "auto: " + why
}

// withDefaults returns c with the zero fields given their defaults.
func (c Config) withDefaults() Config {
	if c.Net == "" {
		c.Net = NetBuiltin
	}
	if c.MTU == 0 {
		c.MTU = DefaultMTU
	}
	if !c.CIDR.IsValid() {
		c.CIDR = DefaultCIDR
	}
	if c.IfName == "" {
		c.IfName = DefaultIfName
	}
	if c.Link == "" {
		c.Link = LinkAuto
	}
	if c.PortDriver == "" {
		c.PortDriver = PortsBuiltin
		if c.Net == NetHost {
			c.PortDriver = PortsNone
		}
	}
	if c.Propagation == "" {
		c.Propagation = userns.DefaultPropagation
	}
	if c.Reaper == "" {
		c.Reaper = "auto"
	}
	if c.SubIDSource == "" {
		c.SubIDSource = SubIDAuto
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c
}

// Validate checks the configuration, with the defaults applied, and says
// what is wrong in the words of gonetns's flags. Its errors wrap
// ErrInvalidConfig. This is the one place every option is checked.
func (c Config) Validate() error {
	c = c.withDefaults()
	switch c.Net {
	case NetBuiltin, NetNone, NetHost:
	default:
		return invalidf("invalid --net=%s: use builtin, none or host (or RootlessKit's slirp4netns, pasta, vpnkit, gvisor-tap-vsock, lxc-user-nic, which select builtin)", c.Net)
	}
	if c.MTU < MinMTU || c.MTU > MaxMTU {
		return invalidf("invalid --mtu=%d: use a value from %d to %d (0 means %d)", c.MTU, MinMTU, MaxMTU, DefaultMTU)
	}
	switch c.Link {
	case LinkAuto, LinkTAP, LinkPacket:
	default:
		return invalidf("invalid --link=%s: use auto (the TAP when /dev/net/tun can be opened, else packet), tap or packet", c.Link)
	}
	if c.Link != LinkAuto && c.Net != NetBuiltin {
		// As --pcap: said, not ignored.
		return invalidf("--link=%s needs --net=builtin: with --net=%s the sandbox has no link of gonetns's", c.Link, c.Net)
	}
	if err := checkCIDR(c.CIDR); err != nil {
		return err
	}
	if len(c.IfName) > 15 || strings.ContainsAny(c.IfName, "/ \t\n:") {
		return invalidf("invalid --ifname=%q: use up to 15 characters without '/', ':' or spaces", c.IfName)
	}
	for _, u := range c.DNSUpstreams {
		if !u.IsValid() || u.Port() == 0 || u.Addr().IsUnspecified() {
			return invalidf("invalid --dns-upstream=%s: give the IP[:PORT] of a DNS server", u)
		}
	}
	if err := c.checkEgress(); err != nil {
		return err
	}
	switch c.PortDriver {
	case PortsBuiltin, PortsImplicit, PortsNone:
	default:
		return invalidf("invalid --port-driver=%s: use builtin, implicit or none (or RootlessKit's slirp4netns, gvisor-tap-vsock, pesto, which select builtin)", c.PortDriver)
	}
	if c.Net == NetHost && c.PortDriver != PortsNone {
		return invalidf("--port-driver=%s needs a network namespace: with --net=host the namespace's ports are the host's already", c.PortDriver)
	}
	if c.Net == NetHost && c.DetachNetNS {
		return invalidf("--detach-netns needs a network namespace to detach: use it with --net=builtin (or slirp4netns and the other aliases)")
	}
	for _, spec := range c.Publish {
		if err := spec.Validate(); err != nil {
			return invalidf("invalid --publish=%s: %v", spec, err)
		}
	}
	if len(c.Publish) > 0 && c.Net == NetHost {
		return invalidf("--publish needs a network namespace: with --net=host the command's ports are the host's already; leave out --publish, or publish from --net=builtin (gonetns's default)")
	}
	if len(c.Publish) > 0 && c.PortDriver == PortsNone {
		return invalidf("--publish needs a port driver (now --port-driver=none): use --port-driver=builtin")
	}
	if c.PortUDPIdleTimeout < 0 || c.PortUDPIdleTimeout > 0 && c.PortUDPIdleTimeout < time.Second {
		return invalidf("invalid --port-udp-idle-timeout=%v: use at least 1s (UDP has no end of its own: a flow ends only by its timeout)", c.PortUDPIdleTimeout)
	}
	if c.BusyPoll < 0 || c.BusyPoll > MaxBusyPoll {
		return invalidf("invalid --busy-poll=%v: use auto, 0 (off) or up to %v; 50us covers a round trip to a server on the host's loopback", c.BusyPoll, MaxBusyPoll)
	}
	if c.BusyPoll > 0 && c.DisableBusyPoll {
		return invalidf("BusyPoll %v and DisableBusyPoll: set one of them", c.BusyPoll)
	}
	if c.BusyPoll > 0 && c.DisableTCPFastPath {
		return invalidf("--busy-poll needs the TCP fast path (it polls the fast path's event loop): leave out --tcp-fast-path=false, or --busy-poll")
	}
	if c.BusyPoll > 0 && c.DisableEventLoop {
		return invalidf("--busy-poll needs the event loop (it is the loop that polls): leave out --event-loop=false, or --busy-poll")
	}
	if _, err := userns.ParsePropagation(c.Propagation); err != nil {
		return &invalid{err.Error()}
	}
	if _, err := userns.ParseReaper(c.Reaper); err != nil {
		return &invalid{err.Error()}
	}
	if c.EvacuateCgroup2 != "" {
		if !c.PIDNS || !c.CgroupNS {
			return invalidf("--evacuate-cgroup2 needs --pidns and --cgroupns (as in RootlessKit)")
		}
		if err := userns.ValidateCgroupName(c.EvacuateCgroup2); err != nil {
			return &invalid{err.Error()}
		}
	}
	if _, err := userns.ParseSubIDSource(string(c.SubIDSource)); err != nil {
		return &invalid{err.Error()}
	}
	if err := userns.ValidateCopyUp(c.CopyUp); err != nil {
		return &invalid{err.Error()}
	}
	return nil
}

// reservedV4 are the IPv4 ranges a sandbox subnet must not overlap: the
// kernel treats packets of them specially (loopback, "this network",
// multicast and the reserved class E with the broadcast address), so a
// network there would be broken in ways that show only later.
var reservedV4 = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"),
	netip.MustParsePrefix("127.0.0.0/8"),
	netip.MustParsePrefix("224.0.0.0/3"),
}

// checkCIDR accepts an IPv4 subnet big enough to hold .100 that overlaps
// nothing the kernel reserves.
func checkCIDR(p netip.Prefix) error {
	if !p.Addr().Is4() {
		return invalidf("invalid --cidr=%s: must be an IPv4 subnet, e.g. 10.0.2.0/24", p)
	}
	if p.Masked() != p {
		return invalidf("invalid --cidr=%s: host bits are set; did you mean %s?", p, p.Masked())
	}
	if p.Bits() > 25 {
		return invalidf("invalid --cidr=%s: the prefix must be /25 or shorter, so that .100 is inside it", p)
	}
	for _, r := range reservedV4 {
		if r.Overlaps(p) {
			return invalidf("invalid --cidr=%s: it overlaps %s, which the kernel reserves (loopback, \"this network\" or multicast and class E); use a private range such as 10.0.2.0/24", p, r)
		}
	}
	return nil
}

// ParseCIDR parses a --cidr value; Validate checks it.
func ParseCIDR(s string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, invalidf("invalid --cidr=%s: %v (want e.g. 10.0.2.0/24)", s, err)
	}
	return p, nil
}

// nthAddr returns the address at offset n in the subnet (.2, .3, .100).
func nthAddr(p netip.Prefix, n int) netip.Addr {
	a := p.Masked().Addr()
	for range n {
		a = a.Next()
	}
	return a
}
