package main

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/gonetns/gonetns/dns"
	"github.com/gonetns/gonetns/port"
	"github.com/gonetns/gonetns/portfwd"
	"github.com/gonetns/gonetns/sandbox"
	"github.com/gonetns/gonetns/userns"
)

// options are the parsed command line: the sandbox's configuration and
// what only the command line has.
type options struct {
	cfg         sandbox.Config
	args        []string
	cpuProfile  string
	version     bool
	printSemver string
}

var errHelpShown = errors.New("help shown")

// rootlessKitNets are RootlessKit's network drivers that gonetns accepts
// as names of its own builtin network (same address layout as
// slirp4netns: 10.0.2.0/24, gateway .2, DNS .3, the sandbox .100).
var rootlessKitNets = []string{"slirp4netns", "pasta", "vpnkit", "gvisor-tap-vsock", "lxc-user-nic"}

// rootlessKitPortDrivers are RootlessKit's port drivers that select
// gonetns's builtin (splice) port driver.
var rootlessKitPortDrivers = []string{"slirp4netns", "gvisor-tap-vsock", "pesto"}

// ignoredFlags are RootlessKit's flags for its helper programs, which
// gonetns does not run: accepted with their values and ignored.
var ignoredFlags = []struct{ name, def, usage string }{
	{"slirp4netns-binary", "slirp4netns", "RootlessKit's slirp4netns binary; ignored (gonetns runs no helper)"},
	{"slirp4netns-sandbox", "false", "RootlessKit's slirp4netns sandbox mode [auto, true, false]; ignored"},
	{"slirp4netns-seccomp", "false", "RootlessKit's slirp4netns seccomp mode [auto, true, false]; ignored"},
	{"pasta-binary", "pasta", "RootlessKit's pasta binary; ignored"},
	{"pesto-binary", "pesto", "RootlessKit's pesto binary; ignored"},
	{"vpnkit-binary", "vpnkit", "RootlessKit's VPNKit binary; ignored"},
	{"lxc-user-nic-binary", "", "RootlessKit's lxc-user-nic binary; ignored"},
	{"lxc-user-nic-bridge", "lxcbr0", "RootlessKit's lxc-user-nic bridge; ignored"},
	{"source-ip-transparent-backend", "auto", "RootlessKit's firewall backend for --source-ip-transparent [auto, nft, iptables]; ignored (gonetns needs none)"},
}

const usageHead = `%[1]s runs COMMAND as root in new user, mount and network namespaces,
as an unprivileged user, with its own userspace network (no helper binaries).

Usage:
  %[1]s [flags] COMMAND [ARGS...]
  gonetns ctl [--socket PATH] COMMAND [ARGS...]   (gonetns ctl --help)

Flags stop at the first argument that is not a flag: %[1]s sh -c 'id'.
`

// personality is which program's command line gonetns speaks.
type personality int

const (
	asGonetns personality = iota
	asRootlessKit
)

// parseFlags parses the command line of gonetns, or of rootlesskit when
// invoked under that name. Values are parsed here; whether they make
// sense together is sandbox.Config.Validate's to say.
func parseFlags(args []string, who personality, name string, out io.Writer, log *slog.Logger) (*options, error) {
	o := &options{}
	fs, raw := defineFlags(o, who, name, out)
	if err := fs.Parse(singleDashLongFlags(fs, args)); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return nil, errHelpShown
		}
		return nil, didYouMean(err, fs)
	}
	if raw.help {
		fs.Usage()
		return nil, errHelpShown
	}
	if o.version || o.printSemver != "" {
		return o, nil
	}
	o.args = fs.Args()
	if len(o.args) == 0 {
		return nil, fmt.Errorf("no command given: %s [flags] COMMAND [ARGS...], e.g. %s bash", name, name)
	}
	for i, f := range ignoredFlags {
		if fs.Changed(f.name) {
			log.Debug("ignoring a RootlessKit flag for a helper program gonetns does not run", "flag", "--"+f.name, "value", *raw.ignored[i])
		}
	}
	if err := raw.apply(&o.cfg, fs, log); err != nil {
		return nil, err
	}
	return o, o.cfg.Validate()
}

// rawFlags are the flags whose values are not yet what sandbox.Config
// holds: names to resolve, addresses and sizes to parse.
type rawFlags struct {
	net, portDriver, cidr, subid, pcapMaxSize, copyUpMode, busyPoll       string
	dnsUpstreams, publish, allow, deny                                    []string
	sourceIPTransparent, tcpFastPath, eventLoop, killOrphans, debug, help bool
	portTCPIdle                                                           time.Duration
	ignored                                                               []*string // ignoredFlags' values
	who                                                                   personality
}

// defineFlags defines the flags of the personality who on a new flag set:
// those that map onto o (and o.cfg) as they are, and the rest in the
// rawFlags returned.
func defineFlags(o *options, who personality, name string, out io.Writer) (*pflag.FlagSet, *rawFlags) {
	fs := pflag.NewFlagSet(name, pflag.ContinueOnError)
	fs.SetInterspersed(false)
	fs.SetOutput(out)
	fs.SortFlags = false
	defNet, defPorts, defKillOrphans := "builtin", "", true
	if who == asRootlessKit {
		// RootlessKit's defaults; and what the command leaves running lives
		// on, as with RootlessKit (its network is often the host's).
		defNet, defPorts, defKillOrphans = "host", "none", false
	}
	r := &rawFlags{who: who}
	c := &o.cfg
	// Sections of --help, in its order; see help.go.
	section := sectioner(fs)

	fs.StringVar(&r.net, "net", defNet, "network: builtin (userspace NAT to the host), none (only lo) or host (no network namespace)")
	fs.IntVar(&c.MTU, "mtu", sandbox.DefaultMTU, fmt.Sprintf("MTU of the namespace's interface, %d to %d; 0 means the default", sandbox.MinMTU, sandbox.MaxMTU))
	fs.StringVar(&r.cidr, "cidr", sandbox.DefaultCIDR.String(), "subnet of the builtin network: the namespace is .100, the gateway (host loopback) .2, DNS .3")
	fs.StringVar(&c.IfName, "ifname", sandbox.DefaultIfName, "name of the namespace's interface")
	fs.StringVar((*string)(&c.Link), "link", string(sandbox.LinkAuto), "device behind the namespace's interface: tap (/dev/net/tun), packet (a veth pair read through AF_PACKET sockets: no /dev/net/tun needed) or auto (tap when /dev/net/tun can be opened, else packet)")
	fs.BoolVar(&c.DisableHostLoopback, "disable-host-loopback", false, "refuse connections to the gateway address (the host's 127.0.0.1 and ::1)")
	fs.BoolVar(&c.IPv6, "ipv6", false, "also IPv6: fd00::100/64 inside, gateway fd00::2 (the host's ::1), DNS fd00::3")
	fs.BoolVar(&r.tcpFastPath, "tcp-fast-path", true, "mirror each TCP connection of the namespace onto its host socket, with no userspace TCP in between (faster round trips and new connections); false: through the netstack's TCP")
	fs.BoolVar(&r.eventLoop, "event-loop", true, "read the namespace's TAP and the fast path's host sockets on one thread that sleeps in epoll_wait (fewer system calls and less CPU per round trip; one more GOMAXPROCS); false: on goroutines in Go's poller")
	fs.StringVar(&r.busyPoll, "busy-poll", "auto", "the event loop polls for the next frame or host event for up to this long before sleeping, adapting below it, while no other thread wants a CPU (shorter round trips for CPU time nothing else uses): `auto|DURATION`; auto is 50us where idle CPUs halt without polling first (most virtual machines), else off; 0 is off, at most 1ms")
	fs.StringArrayVar(&r.dnsUpstreams, "dns-upstream", nil, "DNS server the namespace's resolver forwards to, `IP[:PORT]` (repeatable; default: the host's /etc/resolv.conf)")
	section(sectionNetwork)

	fs.StringVar(&r.portDriver, "port-driver", defPorts, "how ports are published: builtin (splice between host and namespace sockets), implicit (also every port that listens inside, automatically) or none; default builtin unless --net=host")
	// StringSlice, not StringArray: RootlessKit's command line splits these
	// two at commas too (-p 8080:80/tcp,8443:443/tcp).
	publishEg := "8080:80/tcp"
	if who == asGonetns {
		publishEg = "8080:80"
	}
	fs.StringSliceVarP(&r.publish, "publish", "p", nil, "publish a `SPEC`: a port of the namespace on a port of the host, e.g. "+publishEg+" (repeatable, or comma-separated)")
	fs.BoolVar(&r.sourceIPTransparent, "source-ip-transparent", true, "connections through published ports keep the client's address and port inside (TCP and UDP); false: they come from the namespace's loopback")
	fs.DurationVar(&r.portTCPIdle, "port-tcp-idle-timeout", portfwd.DefaultTCPIdleTimeout, "reset a connection through a published port that has moved no byte either way for this long; 0 keeps idle connections for ever (docs/limits.md)")
	fs.DurationVar(&c.PortUDPIdleTimeout, "port-udp-idle-timeout", portfwd.DefaultUDPIdleTimeout, "end a published port's UDP flow (one client address) that has carried no datagram either way for this long; at least 1s")
	section(sectionPorts)

	fs.StringArrayVar(&r.deny, "deny", nil, "refuse the sandbox's TCP, UDP and ping to host addresses in `CIDR` (or one IP), IPv4 or IPv6 (repeatable; the most specific of --allow/--deny wins; the gateway counts as the host's 127.0.0.1 and ::1)")
	fs.StringArrayVar(&r.allow, "allow", nil, "allow host addresses in `CIDR` (or one IP) (repeatable); with any --allow, addresses no rule covers are refused")
	fs.BoolVar(&c.DenyMetadata, "deny-metadata", false, "refuse the cloud metadata services 169.254.169.254 and fd00:ec2::254")
	fs.BoolVar(&c.DenyPrivate, "deny-private", false, "refuse private and link-local ranges: 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 169.254.0.0/16, fc00::/7, fe80::/10 (the gateway and DNS stay reachable)")
	fs.StringVar(&c.OutboundAddr, "outbound-addr", "", "source address of the host sockets for the sandbox's IPv4 traffic: an IP, or an interface whose first IPv4 address is used (a loopback address applies only to the gateway, any other only to other destinations)")
	fs.StringVar(&c.OutboundAddr6, "outbound-addr6", "", "the same for IPv6")
	section(sectionEgress)

	fs.BoolVar(&c.DetachNetNS, "detach-netns", false, "keep COMMAND in the host's network namespace; the sandbox's network namespace is at $ROOTLESSKIT_STATE_DIR/netns (nsenter -n$ROOTLESSKIT_STATE_DIR/netns ...)")
	fs.BoolVar(&c.PIDNS, "pidns", false, "new PID namespace: the command is PID 1 ($$ is 1), and everything inside is killed when gonetns exits")
	fs.BoolVar(&c.CgroupNS, "cgroupns", false, "new cgroup namespace")
	fs.BoolVar(&c.UTSNS, "utsns", false, "new UTS namespace (hostname)")
	fs.BoolVar(&c.IPCNS, "ipcns", false, "new IPC namespace")
	fs.StringSliceVar(&c.CopyUp, "copy-up", nil, "make `DIR` a writable copy inside, e.g. --copy-up=/etc (repeatable, or comma-separated; /tmp is refused)")
	fs.StringVar(&r.copyUpMode, "copy-up-mode", "tmpfs+symlink", "how --copy-up copies: tmpfs+symlink")
	fs.StringVar(&c.Propagation, "propagation", userns.DefaultPropagation, "mount propagation inside: rprivate or rslave")
	fs.StringVar(&c.Reaper, "reaper", "auto", "RootlessKit's process reaper: true, false or auto; accepted, and the gonetns child is always the reaper of what is orphaned inside, which keeps everything the command starts in the sandbox's tree")
	fs.BoolVar(&r.killOrphans, "kill-orphans", defKillOrphans, "when COMMAND exits, kill the processes it left running (without --pidns; with it the kernel does); false lets them run on, as RootlessKit does (the default when invoked as rootlesskit); when gonetns or its child is killed they are killed in any case")
	fs.StringVar(&c.EvacuateCgroup2, "evacuate-cgroup2", "", "move the processes of gonetns's cgroup v2 group into the subgroup `NAME` and enable the group's controllers for subgroups (needs --pidns and --cgroupns)")
	fs.BoolVar(&c.ConfineNetworkProcess, "confine-network-process", true, "once the sandbox runs, the gonetns process (the sandbox's network) confines itself: Landlock limits its file access to the state directory, and a seccomp filter refuses exec, ptrace, mounts, namespaces, bpf, keyrings and module loading (best effort: what the kernel lacks is skipped; /v1/info and --debug say what was applied); false turns it off")
	fs.StringVar(&c.StateDir, "state-dir", "", "the state directory `DIR` (lock, child_pid, api.sock, netns); default: a new one under $XDG_RUNTIME_DIR or /tmp; removed on exit")
	fs.StringVar(&r.subid, "subid-source", "auto", "where subordinate ids come from: auto, static (/etc/subuid, /etc/subgid) or dynamic (getsubids)")
	section(sectionNamespaces)

	fs.BoolVar(&r.debug, "debug", false, "print debug messages")
	fs.StringVar(&c.PCAP, "pcap", "", "record every frame of the sandbox's link, both ways, in pcap `FILE` (tcpdump -r FILE, Wireshark)")
	fs.StringVar(&r.pcapMaxSize, "pcap-max-size", "256MiB", "stop recording when the --pcap file reaches `SIZE` bytes, at least 1MiB (suffixes K, M, G, KiB, MiB, GiB)")
	fs.StringVar(&o.cpuProfile, "cpuprofile", "", "write a CPU profile of the gonetns parent (the network) to `FILE`, for go tool pprof")
	fs.BoolVarP(&o.version, "version", "v", false, "print the version and exit")
	fs.BoolVarP(&r.help, "help", "h", false, "show this help")
	section(sectionDebugging)

	fs.StringVar(&o.printSemver, "print-semver", "", "print one component of the version as a number: major, minor or patch")
	// RootlessKit's flags for its helper programs: accepted, ignored, and
	// out of the flag list (the section's text names them).
	r.ignored = make([]*string, len(ignoredFlags))
	for i, f := range ignoredFlags {
		r.ignored[i] = fs.String(f.name, f.def, f.usage)
		fs.MarkHidden(f.name)
	}
	section(sectionRootlessKit)

	fs.Usage = func() { printUsage(out, fs, name, who) }
	return fs, r
}

// apply puts the raw flags into c: RootlessKit's names resolved to
// gonetns's drivers, addresses, specs and sizes parsed.
func (r *rawFlags) apply(c *sandbox.Config, fs *pflag.FlagSet, log *slog.Logger) error {
	if err := r.refuseEmpty(fs); err != nil {
		return err
	}
	c.Debug = r.debug
	c.Net = sandbox.Net(r.net)
	if slices.Contains(rootlessKitNets, r.net) {
		log.Debug("--net=" + r.net + " is RootlessKit's name for a network; gonetns uses its builtin network (slirp4netns's addresses)")
		c.Net = sandbox.NetBuiltin
	}
	c.PortDriver = sandbox.PortDriver(r.portDriver)
	if slices.Contains(rootlessKitPortDrivers, r.portDriver) {
		log.Debug("--port-driver=" + r.portDriver + " is RootlessKit's name for a port driver; gonetns uses its builtin one")
		c.PortDriver = sandbox.PortsBuiltin
	}
	var err error
	if c.CIDR, err = sandbox.ParseCIDR(r.cidr); err != nil {
		return err
	}
	for _, s := range r.dnsUpstreams {
		a, err := dns.ParseUpstream(s)
		if err != nil {
			return fmt.Errorf("invalid --dns-upstream=%s: %w", s, err)
		}
		c.DNSUpstreams = append(c.DNSUpstreams, a)
	}
	if c.Allow, err = parsePrefixes("--allow", r.allow); err != nil {
		return err
	}
	if c.Deny, err = parsePrefixes("--deny", r.deny); err != nil {
		return err
	}
	if fs.Changed("pcap-max-size") {
		if c.PCAPMaxSize, err = parseSize(r.pcapMaxSize); err != nil {
			return fmt.Errorf("invalid --pcap-max-size=%s: %w", r.pcapMaxSize, err)
		}
	}
	parseSpec := port.ParseSpec // RootlessKit's: PROTO required
	if r.who == asGonetns {
		parseSpec = port.ParseSpecDefaultTCP // Docker's: tcp unless said
	}
	for _, s := range r.publish {
		spec, err := parseSpec(s)
		if err != nil {
			return fmt.Errorf("invalid --publish=%s: %w", s, err)
		}
		c.Publish = append(c.Publish, spec)
	}
	c.DisableSourceIPTransparent = !r.sourceIPTransparent
	c.DisableTCPFastPath = !r.tcpFastPath
	// The sandbox package takes 0 for the default; from the flag it is
	// a value, and UDP cannot keep a flow for ever (it ended at 60 s,
	// while 0 of --port-tcp-idle-timeout means never).
	if fs.Changed("port-udp-idle-timeout") && c.PortUDPIdleTimeout == 0 {
		return fmt.Errorf("invalid --port-udp-idle-timeout=0s: use at least 1s (UDP has no end of its own: a flow ends only by its timeout)")
	}
	c.DisableEventLoop = !r.eventLoop
	if err := parseBusyPoll(r.busyPoll, c); err != nil {
		return err
	}
	switch {
	case r.portTCPIdle < 0:
		return fmt.Errorf("invalid --port-tcp-idle-timeout=%v: use a duration such as 1h, or 0 to keep idle connections for ever", r.portTCPIdle)
	case r.portTCPIdle == 0:
		c.PortTCPIdleTimeout = -1 // never
	default:
		c.PortTCPIdleTimeout = r.portTCPIdle
	}
	c.LeaveOrphans = !r.killOrphans
	if r.copyUpMode != "tmpfs+symlink" {
		return fmt.Errorf("invalid --copy-up-mode=%s: only tmpfs+symlink is supported", r.copyUpMode)
	}
	c.SubIDSource = sandbox.SubIDSource(r.subid)
	return nil
}

// emptyRefused are the flags whose empty value (--net=$NET with NET unset)
// is refused rather than taken silently as the default or as nothing:
// these four as RootlessKit refuses them ("unknown network mode: ",
// "missing proto in PortSpec string"), under either name; under
// gonetns's own name the rest too, which RootlessKit takes empty (as its
// default, or with a warning) and so its personality does.
var emptyRefused = map[personality][]string{
	asRootlessKit: {"net", "port-driver", "publish", "copy-up"},
	asGonetns:     {"net", "port-driver", "publish", "copy-up", "link", "ifname", "propagation", "reaper", "subid-source"},
}

// refuseEmpty fails if a flag of emptyRefused was given an empty value.
func (r *rawFlags) refuseEmpty(fs *pflag.FlagSet) error {
	for _, name := range emptyRefused[r.who] {
		f := fs.Lookup(name)
		if f == nil || !f.Changed {
			continue
		}
		if v := f.Value.String(); v != "" && v != "[]" { // "[]": a list flag's empty list
			continue
		}
		leave := "leave the flag out"
		if d := f.DefValue; d != "" && d != "[]" {
			leave += " for the default, " + d
		}
		return fmt.Errorf("--%s is given an empty value (an unset variable?): give it one (--help lists them), or %s", name, leave)
	}
	return nil
}

// parseBusyPoll sets c's busy poll from --busy-poll: auto (the zero
// value), 0 or off, or a duration (its bounds are Config's to check).
func parseBusyPoll(v string, c *sandbox.Config) error {
	switch v {
	case "auto":
		return nil
	case "0", "off":
		c.DisableBusyPoll = true
		return nil
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		return fmt.Errorf("invalid --busy-poll=%s: use auto, 0 (off), or a duration up to %v such as 50us", v, sandbox.MaxBusyPoll)
	}
	if d == 0 {
		c.DisableBusyPoll = true
	}
	c.BusyPoll = d
	return nil
}

func parsePrefixes(flag string, ss []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, s := range ss {
		p, err := sandbox.ParsePrefix(flag, s)
		if err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	return out, nil
}

// singleDashLongFlags rewrites -name and -name=value, for the long flags
// of fs, into --name forms, up to the first argument that is not a flag:
// RootlessKit's command line library accepts long flags with one dash.
func singleDashLongFlags(fs *pflag.FlagSet, args []string) []string {
	out := make([]string, 0, len(args))
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" || a == "-" || !strings.HasPrefix(a, "-") {
			return append(out, args[i:]...)
		}
		var f *pflag.Flag
		switch {
		case strings.HasPrefix(a, "--"):
			name, _, _ := strings.Cut(a[2:], "=")
			f = fs.Lookup(name)
		case len(a) == 2:
			f = fs.ShorthandLookup(a[1:])
		default:
			name, _, _ := strings.Cut(a[1:], "=")
			if f = fs.Lookup(name); f != nil {
				a = "-" + a
			}
		}
		out = append(out, a)
		// A flag whose value is the next argument: keep that argument.
		if f != nil && f.NoOptDefVal == "" && !strings.Contains(a, "=") && i+1 < len(args) {
			i++
			out = append(out, args[i])
		}
	}
	return out
}

// parseSize parses a size in bytes: a whole number, optionally followed by
// KiB, MiB or GiB (or K, M, G: the same powers of 1024).
func parseSize(s string) (int64, error) {
	units := []struct {
		suffix string
		shift  uint
	}{{"KiB", 10}, {"MiB", 20}, {"GiB", 30}, {"K", 10}, {"M", 20}, {"G", 30}}
	num, shift := s, uint(0)
	for _, u := range units {
		if n, ok := strings.CutSuffix(s, u.suffix); ok {
			num, shift = n, u.shift
			break
		}
	}
	n, err := strconv.ParseInt(num, 10, 64)
	if err != nil || n < 0 || n > math.MaxInt64>>shift {
		return 0, fmt.Errorf("want a number of bytes, e.g. 268435456, 256MiB or 1GiB")
	}
	return n << shift, nil
}

// semverPart returns one component of a version like "1.2.3-rc1".
func semverPart(version, part string) (int, error) {
	core, _, _ := strings.Cut(strings.TrimPrefix(version, "v"), "-")
	core, _, _ = strings.Cut(core, "+")
	f := strings.Split(core, ".")
	idx := map[string]int{"major": 0, "minor": 1, "patch": 2}
	i, ok := idx[part]
	if !ok {
		return 0, fmt.Errorf("invalid --print-semver=%s: use major, minor or patch", part)
	}
	if len(f) != 3 {
		return 0, fmt.Errorf("version %q is not a semantic version", version)
	}
	n, err := strconv.Atoi(f[i])
	if err != nil {
		return 0, fmt.Errorf("version %q is not a semantic version", version)
	}
	return n, nil
}
