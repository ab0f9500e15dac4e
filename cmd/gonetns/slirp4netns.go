package main

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/confine"
	"github.com/gonetns/gonetns/dns"
	"github.com/gonetns/gonetns/sandbox"
	"github.com/gonetns/gonetns/slirpapi"
)

// The slirp4netns personality: gonetns invoked as slirp4netns (a symlink,
// or gonetns slirp4netns ...) speaks slirp4netns 1.3's command line and
// API socket and gives a network namespace someone else made (Podman's,
// Buildah's, RootlessKit 1.x's, unshare -rn's) gonetns's network.

// slirp4netnsVersion is the slirp4netns release whose command line and API
// the personality implements; -v reports it, with gonetns's version in its
// build metadata.
const slirp4netnsVersion = "1.3.1"

// slirpConfigVersion is what -v reports as SLIRP_CONFIG_VERSION_MAX, the
// libslirp configuration version scripts read to decide which options
// exist (slirp4netns's own tests: 2 for --outbound-addr, 3 for
// --disable-dns); gonetns has them all.
const slirpConfigVersion = 4

// slirpFlagsEnv holds options read before the command line's: the way to
// give gonetns's own options (--dns-upstream, --deny-private, --pcap, ...)
// to a slirp4netns that a program starts with a command line of its own
// (Podman passes its environment on).
const slirpFlagsEnv = "GONETNS_SLIRP4NETNS_FLAGS"

// slirp4netns's defaults.
const (
	slirpDefaultMTU  = 1500
	slirpDefaultCIDR = "10.0.2.0/24"
	slirpDefaultTap  = "tap0"
)

// The options of slirp4netns 1.3, and gonetns's own after them.
var slirpOptionTable = []getoptOption{
	{long: "configure", short: 'c'},
	{long: "exit-fd", short: 'e', arg: true},
	{long: "ready-fd", short: 'r', arg: true},
	{long: "mtu", short: 'm', arg: true},
	{long: "cidr", arg: true},
	{long: "disable-host-loopback"},
	{long: "no-host-loopback"}, // slirp4netns's deprecated name
	{long: "netns-type", arg: true},
	{long: "userns-path", arg: true},
	{long: "api-socket", short: 'a', arg: true},
	{long: "enable-ipv6", short: '6'},
	{long: "enable-sandbox"},
	{long: "create-sandbox"}, // slirp4netns's deprecated name
	{long: "enable-seccomp"},
	{long: "help", short: 'h'},
	{long: "version", short: 'v'},
	{long: "outbound-addr", arg: true},
	{long: "outbound-addr6", arg: true},
	{long: "disable-dns"},
	{long: "macaddress", arg: true},
	{long: "target-type", arg: true},
	// gonetns's own.
	{long: "dns-upstream", arg: true},
	{long: "allow", arg: true},
	{long: "deny", arg: true},
	{long: "deny-private"},
	{long: "deny-metadata"},
	{long: "pcap", arg: true},
	{long: "pcap-max-size", arg: true},
	{long: "disable-tcp-fast-path"},
	{long: "link", arg: true},
	{long: "debug"},
}

const slirpUsage = `Usage: %[1]s [OPTION]... PID|PATH [TAPNAME]
User-mode networking for unprivileged network namespaces: gonetns's network
(a userspace TCP/IP stack with NAT to the host, DNS at .3, the host's
loopback at .2) for the namespace of PID (or at PATH), on a TAP device
TAPNAME (default tap0) inside it, as slirp4netns gives it.

-c, --configure          bring up the interface: address .100 of the CIDR, default
                         route via .2, MTU, MAC; and lo
-e, --exit-fd=FD         specify the FD for terminating slirp4netns: exit when it
                         is closed
-r, --ready-fd=FD        specify the FD to write "1" to when the network is
                         configured (and the API socket listens)
-m, --mtu=MTU            specify MTU (default=%[2]d, max=65521)
-6, --enable-ipv6        enable IPv6: fd00::100/64 inside, gateway fd00::2 (the
                         host's ::1), DNS fd00::3
-a, --api-socket=PATH    specify API socket path (add_hostfwd, list_hostfwd,
                         remove_hostfwd)
--cidr=CIDR              specify network address CIDR (default=%[3]s)
--disable-host-loopback  prohibit connecting to 127.0.0.1:* on the host namespace
--netns-type=TYPE        specify network namespace type ([path|pid], default=pid)
--userns-path=PATH       specify user namespace path
--enable-sandbox         confine this process once set up: Landlock leaves it no
                         file but the API socket's directory
--enable-seccomp         enable seccomp to limit syscalls: exec, ptrace, mount,
                         setns, bpf, ... refused
--outbound-addr=IPv4     sets outbound ipv4 address (or interface) to bound to
--outbound-addr6=IPv6    sets outbound ipv6 address (or interface) to bound to
--disable-dns            disables 10.0.2.3 (or configured internal ip) to host dns
                         redirect
--macaddress=MAC         specify the MAC address of the TAP (only valid with -c)
--target-type=TYPE       specify the target type ([netns], default=netns; bess is
                         not supported)
-h, --help               show this help and exit
-v, --version            show version and exit

gonetns's own options:
--dns-upstream=IP[:PORT] DNS server the DNS address forwards to (repeatable;
                         default: the host's /etc/resolv.conf)
--allow=CIDR, --deny=CIDR, --deny-private, --deny-metadata
                         egress policy: which host addresses the namespace may
                         reach (see gonetns --help)
--pcap=FILE              record every frame of the TAP in pcap FILE
--pcap-max-size=SIZE     stop recording at SIZE bytes (default 256MiB)
--disable-tcp-fast-path  run TCP through the userspace stack's TCP instead of
                         mirroring each connection onto its host socket (see
                         gonetns --help, --tcp-fast-path)
--link=KIND              the device behind TAPNAME: tap, packet (a veth pair, no
                         /dev/net/tun needed) or auto (default: tap if it can be
                         opened); with no -c only a TAP can be attached
--debug                  print debug messages
`

// fprintSlirpUsage prints -h's text, as slirp4netns does to stdout.
func fprintSlirpUsage(w io.Writer, name string) {
	fmt.Fprintf(w, slirpUsage, name, slirpDefaultMTU, slirpDefaultCIDR)
}

// slirpOptions are the parsed command line.
type slirpOptions struct {
	configure           bool
	exitFD, readyFD     int // -1: none
	mtu                 int
	ipv6                bool
	apiSocket           string
	cidr                string
	disableHostLoopback bool
	netnsType           string
	usernsPath          string
	enableSandbox       bool
	enableSeccomp       bool
	outbound4           string
	outbound6           string
	disableDNS          bool
	mac                 net.HardwareAddr
	// target is PID|PATH, tapName TAPNAME.
	target, tapName string
	// gonetns's own.
	debug              bool
	dnsUpstreams       []netip.AddrPort
	allow, deny        []netip.Prefix
	denyPrivate        bool
	denyMetadata       bool
	pcap, pcapMaxSize  string
	noTCPFastPath      bool
	link               string
	helpShown, version bool
	warnings           []string // for stdout, as slirp4netns prints them
}

// errSlirpUsage is a command line error after which the usage is printed.
type errSlirpUsage struct{ msg string }

func (e *errSlirpUsage) Error() string { return e.msg }

// parseSlirp4netns parses slirp4netns's command line. Errors are worded as
// slirp4netns's (callers show them); an *errSlirpUsage also wants the
// usage printed.
func parseSlirp4netns(args []string) (*slirpOptions, error) {
	o := &slirpOptions{exitFD: -1, readyFD: -1, mtu: slirpDefaultMTU}
	found, operands, optErr := getopt(args, slirpOptionTable)
	var targetType, macText string
	var err error
	fd := func(what, v string) (int, error) {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			return 0, &errSlirpUsage{what + " must be a non-negative integer"}
		}
		return n, nil
	}
	for _, f := range found {
		v := f.value
		switch f.opt.long {
		case "configure":
			o.configure = true
		case "exit-fd":
			if o.exitFD, err = fd("exit-fd", v); err != nil {
				return nil, err
			}
		case "ready-fd":
			if o.readyFD, err = fd("ready-fd", v); err != nil {
				return nil, err
			}
		case "mtu":
			n, err := strconv.Atoi(v)
			if err != nil || n <= 0 || n > sandbox.MaxMTU {
				return nil, &errSlirpUsage{fmt.Sprintf("MTU must be a positive integer (< %d)", sandbox.MaxMTU+1)}
			}
			o.mtu = n
		case "cidr":
			o.cidr = v
		case "no-host-loopback":
			o.warnings = append(o.warnings, "WARNING: --no-host-loopback is deprecated and will be removed in future releases, please use --disable-host-loopback instead.")
			o.disableHostLoopback = true
		case "disable-host-loopback":
			o.disableHostLoopback = true
		case "create-sandbox":
			o.warnings = append(o.warnings, "WARNING: --create-sandbox is deprecated and will be removed in future releases, please use --enable-sandbox instead.")
			o.enableSandbox = true
		case "enable-sandbox":
			o.enableSandbox = true
		case "enable-seccomp":
			o.enableSeccomp = true
		case "netns-type":
			o.netnsType = v
		case "userns-path":
			if _, err := os.Stat(v); err != nil {
				return nil, &errSlirpUsage{"userns path doesn't exist: " + v}
			}
			o.usernsPath = v
		case "api-socket":
			o.apiSocket = v
		case "enable-ipv6":
			o.ipv6 = true
		case "help":
			o.helpShown = true
			return o, nil
		case "version":
			o.version = true
			return o, nil
		case "outbound-addr":
			o.outbound4 = v
		case "outbound-addr6":
			o.outbound6 = v
		case "disable-dns":
			o.disableDNS = true
		case "macaddress":
			macText = v
		case "target-type":
			targetType = v
		case "dns-upstream":
			a, err := dns.ParseUpstream(v)
			if err != nil {
				return nil, fmt.Errorf("invalid --dns-upstream=%s: %w", v, err)
			}
			o.dnsUpstreams = append(o.dnsUpstreams, a)
		case "allow", "deny":
			p, err := sandbox.ParsePrefix("--"+f.opt.long, v)
			if err != nil {
				return nil, err
			}
			if f.opt.long == "allow" {
				o.allow = append(o.allow, p)
			} else {
				o.deny = append(o.deny, p)
			}
		case "deny-private":
			o.denyPrivate = true
		case "deny-metadata":
			o.denyMetadata = true
		case "pcap":
			o.pcap = v
		case "pcap-max-size":
			o.pcapMaxSize = v
		case "disable-tcp-fast-path":
			o.noTCPFastPath = true
		case "link":
			o.link = v
		case "debug":
			o.debug = true
		}
	}
	if optErr != nil {
		return nil, &errSlirpUsage{optErr.Error()}
	}
	if macText != "" {
		if !o.configure {
			return nil, &errSlirpUsage{"--macaddr cannot be specified when --configure or -c is not specified"}
		}
		mac, err := net.ParseMAC(macText)
		if err != nil || len(mac) != 6 {
			return nil, fmt.Errorf("%q is an invalid MAC address.\nmacaddress has to be a valid MAC address (hex string, 6 bytes, each byte separated by a ':').", macText)
		}
		o.mac = mac
	}
	switch targetType {
	case "", "netns":
	case "bess":
		return nil, errors.New("--target-type=bess is not supported: gonetns serves network namespaces (--target-type=netns); BESS mode (User Mode Linux over a unix socket) has no TAP for it")
	default:
		return nil, &errSlirpUsage{`--target-type must be either "netns" or "bess"`}
	}
	switch o.netnsType {
	case "", "pid", "path":
	default:
		return nil, &errSlirpUsage{fmt.Sprintf("--netns-type must be either \"pid\" or \"path\", not %q", o.netnsType)}
	}
	if len(operands) < 1 {
		return nil, &errSlirpUsage{"missing PID or PATH of the network namespace"}
	}
	o.target, o.tapName = operands[0], slirpDefaultTap
	if len(operands) >= 2 {
		// slirp4netns copies TAPNAME into the kernel's 16-byte name
		// (IFNAMSIZ) and so cuts a longer one at 15 characters; gonetns
		// refused it, naming its own --ifname.
		o.tapName = operands[1][:min(len(operands[1]), unix.IFNAMSIZ-1)]
	}
	if len(operands) > 2 {
		o.warnings = append(o.warnings, "WARNING: too many arguments")
	}
	if o.netnsType == "path" {
		if _, err := os.Stat(o.target); err != nil {
			return nil, fmt.Errorf("existing path expected when --netns-type=path: %w", unwrapPathError(err))
		}
	} else {
		pid, err := strconv.Atoi(o.target)
		if err != nil || pid <= 0 {
			return nil, &errSlirpUsage{"PID must be a positive integer"}
		}
	}
	return o, nil
}

func unwrapPathError(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// cidrSyntax is the form slirp4netns accepts for --cidr.
var cidrSyntax = regexp.MustCompile(`^(([0-9]{1,3}\.){3}[0-9]{1,3})/([0-9]{1,2})$`)

// parseSlirpCIDR parses --cidr with slirp4netns's rules and messages: an
// IPv4 network address with a prefix of 1 to 25 bits (.100 must fit).
func parseSlirpCIDR(s string) (netip.Prefix, error) {
	m := cidrSyntax.FindStringSubmatch(s)
	if m == nil {
		return netip.Prefix{}, fmt.Errorf("invalid CIDR: %s", s)
	}
	addr, err := netip.ParseAddr(m[1])
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("invalid network address: %s", m[1])
	}
	bits, _ := strconv.Atoi(m[3])
	if bits < 1 || bits > 25 {
		return netip.Prefix{}, errors.New("prefix length needs to be 1-25")
	}
	p := netip.PrefixFrom(addr, bits)
	if p.Masked() != p {
		return netip.Prefix{}, errors.New("CIDR needs to be a network address like 10.0.2.0/24, not like 10.0.2.100/24")
	}
	return p, nil
}

// sandboxConfig is the network's configuration and the namespace to join.
func (o *slirpOptions) sandboxConfig(log *slog.Logger) (sandbox.Config, sandbox.Target, error) {
	cidr := slirpDefaultCIDR
	if o.cidr != "" {
		cidr = o.cidr
	}
	prefix, err := parseSlirpCIDR(cidr)
	if err != nil {
		return sandbox.Config{}, sandbox.Target{}, err
	}
	if o.mtu < sandbox.MinMTU {
		return sandbox.Config{}, sandbox.Target{}, fmt.Errorf("MTU %d is too small for gonetns: use %d to %d", o.mtu, sandbox.MinMTU, sandbox.MaxMTU)
	}
	c := sandbox.Config{
		Net:                 sandbox.NetBuiltin,
		MTU:                 o.mtu,
		CIDR:                prefix,
		IfName:              o.tapName,
		DisableHostLoopback: o.disableHostLoopback,
		IPv6:                o.ipv6,
		DNSUpstreams:        o.dnsUpstreams,
		DisableDNS:          o.disableDNS,
		Allow:               o.allow,
		Deny:                o.deny,
		DenyPrivate:         o.denyPrivate,
		DenyMetadata:        o.denyMetadata,
		OutboundAddr:        o.outbound4,
		OutboundAddr6:       o.outbound6,
		OutboundEverywhere:  true,
		PCAP:                o.pcap,
		DisableTCPFastPath:  o.noTCPFastPath,
		Link:                sandbox.Link(o.link),
		PortDriver:          sandbox.PortsNone,
		// libslirp ends an idle UDP forward's flow after 240 s; a
		// reply 75 s after the last datagram was lost at gonetns's
		// 60 s and delivered by slirp4netns.
		PortUDPIdleTimeout: slirpUDPIdle,
		Debug:              o.debug,
		Logger:             log,
	}
	if o.pcapMaxSize != "" {
		if c.PCAPMaxSize, err = parseSize(o.pcapMaxSize); err != nil {
			return sandbox.Config{}, sandbox.Target{}, fmt.Errorf("invalid --pcap-max-size=%s: %w", o.pcapMaxSize, err)
		}
	}
	if o.apiSocket != "" {
		c.PortDriver = sandbox.PortsBuiltin
	}
	t := sandbox.Target{OpenOnly: !o.configure, MAC: o.mac, UserNS: o.usernsPath}
	if o.netnsType == "path" {
		t.NetNS = o.target
	} else {
		t.NetNS = "/proc/" + o.target + "/ns/net"
		if t.UserNS == "" {
			t.UserNS = "/proc/" + o.target + "/ns/user"
		}
	}
	return c, t, nil
}

// runSlirp4netns is gonetns as slirp4netns.
func runSlirp4netns(args []string, name string) int {
	if extra := os.Getenv(slirpFlagsEnv); extra != "" {
		args = append(strings.Fields(extra), args...)
	}
	o, err := parseSlirp4netns(args)
	var ue *errSlirpUsage
	switch {
	case errors.As(err, &ue):
		fmt.Fprintf(os.Stderr, "%s: %v\n", name, err)
		fprintSlirpUsage(os.Stdout, name)
		return 1
	case err != nil:
		fmt.Fprintf(os.Stderr, "%s: %v\n", name, err)
		return 1
	case o.helpShown:
		fprintSlirpUsage(os.Stdout, name)
		return 0
	case o.version:
		fmt.Fprint(os.Stdout, slirpVersion())
		return 0
	}
	for _, w := range o.warnings {
		fmt.Println(w)
	}
	tuneRuntime()
	// The descriptors the caller passed for us alone must not reach the
	// namespace helper (a ready pipe held open there would hide our exit
	// from a caller waiting for "1").
	for _, fd := range []int{o.readyFD, o.exitFD} {
		if fd < 0 {
			continue
		}
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil {
			fmt.Fprintf(os.Stderr, "%s: descriptor %d (-r/-e) is not open: %v\n", name, fd, err)
			return 1
		}
		unix.CloseOnExec(fd)
	}
	log := newLogger(os.Stderr, o.debug, name+": ")
	cfg, target, err := o.sandboxConfig(log)
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", name, err)
		return 1
	}
	return runJoined(o, cfg, target, log, os.Stdout)
}

// runJoined sets up the network for the joined namespace, serves it until
// the exit descriptor closes or a signal ends it, and tears it down.
func runJoined(o *slirpOptions, cfg sandbox.Config, target sandbox.Target, log *slog.Logger, stdout io.Writer) int {
	// Caught from now on: a TERM during set-up still tears down what is
	// set up.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, unix.SIGTERM, unix.SIGINT, unix.SIGHUP)
	signal.Notify(make(chan os.Signal, 1), unix.SIGPIPE)
	j, err := sandbox.Join(cfg, target)
	if err != nil {
		log.Error(err.Error())
		return 1
	}
	defer j.Close()
	printSlirpSummary(stdout, o, cfg)
	var api *slirpapi.Server
	if o.apiSocket != "" {
		ln, err := slirpapi.Listen(o.apiSocket)
		if err != nil {
			log.Error(err.Error())
			return 1
		}
		guest, guest6 := j.Addresses()
		subnets, own := j.Network()
		api = slirpapi.NewServer(slirpapi.Config{Ports: j.Ports(), Guest: guest, Guest6: guest6, Subnets: subnets, Own: own, Logger: log})
		api.Serve(ln)
		defer api.Close()
	}
	if err := confineSlirp(o, log); err != nil {
		log.Error(err.Error())
		return 1
	}
	if o.readyFD >= 0 {
		ready := os.NewFile(uintptr(o.readyFD), "ready-fd")
		if _, err := ready.Write([]byte("1")); err != nil {
			log.Warn("ready-fd: " + err.Error())
		}
		ready.Close()
	}
	exitEvent := make(chan struct{})
	var stopWatch func()
	if o.exitFD >= 0 {
		stopWatch = watchExitFD(o.exitFD, exitEvent, log)
		defer stopWatch()
	}
	select {
	case <-exitEvent:
		log.Debug("exit-fd event")
		return 0
	case s := <-sigs:
		log.Debug("signal", "signal", s)
		// Die of it, as slirp4netns does, once everything is torn down.
		if api != nil {
			api.Close()
		}
		j.Close()
		dieOf(s.(syscall.Signal))
		return 128 + int(s.(syscall.Signal))
	}
}

// slirpUDPIdle is how long a UDP forward's flow lives without traffic:
// libslirp's UDP sockets expire after 240 s (SO_EXPIRE).
const slirpUDPIdle = 240 * time.Second

// dieOf kills the process with sig, its default action restored: sent to
// the calling thread, the signal is taken when the system call returns,
// before this function does (sent to the process, it reached one of
// Go's threads while the caller went on to exit with 128+sig: 8 runs in
// 10). If it is not taken within a second, dieOf returns.
func dieOf(sig syscall.Signal) {
	signal.Reset(sig)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	unix.Tgkill(os.Getpid(), unix.Gettid(), sig)
	time.Sleep(time.Second)
}

// printSlirpSummary prints what slirp4netns prints at start, to stdout:
// callers log it.
func printSlirpSummary(w io.Writer, o *slirpOptions, cfg sandbox.Config) {
	p := cfg.CIDR
	nth := func(n int) netip.Addr {
		a := p.Masked().Addr()
		for range n {
			a = a.Next()
		}
		return a
	}
	mask := net.IP(net.CIDRMask(p.Bits(), 32)).String()
	fmt.Fprintf(w, "Starting gonetns's network (slirp4netns %s compatible)\n", slirp4netnsVersion)
	fmt.Fprintf(w, "* MTU:             %d\n", cfg.MTU)
	fmt.Fprintf(w, "* Network:         %s\n", p.Masked().Addr())
	fmt.Fprintf(w, "* Netmask:         %s\n", mask)
	fmt.Fprintf(w, "* Gateway:         %s\n", nth(2))
	if !cfg.DisableDNS {
		fmt.Fprintf(w, "* DNS:             %s\n", nth(3))
	}
	fmt.Fprintf(w, "* Recommended IP:  %s\n", nth(100))
	if o.apiSocket != "" {
		fmt.Fprintf(w, "* API Socket:      %s\n", o.apiSocket)
	}
	if o.mac != nil {
		fmt.Fprintf(w, "* MAC address:     %s\n", o.mac)
	}
	if !cfg.DisableHostLoopback {
		fmt.Fprintf(w, "WARNING: 127.0.0.1:* on the host is accessible as %s (set --disable-host-loopback to prohibit connecting to 127.0.0.1:*)\n", nth(2))
	}
}

// watchExitFD closes event when fd hangs up or fails (slirp4netns exits
// on any poll event of its exit descriptor: its caller closes the other
// end to stop it). The returned stop ends the watch.
func watchExitFD(fd int, event chan<- struct{}, log *slog.Logger) (stop func()) {
	wake := make([]int, 2)
	if err := unix.Pipe2(wake, unix.O_CLOEXEC); err != nil {
		log.Warn("exit-fd: cannot watch it: " + err.Error())
		return func() {}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		pfd := []unix.PollFd{{Fd: int32(fd)}, {Fd: int32(wake[0]), Events: unix.POLLIN}}
		for {
			_, err := unix.Poll(pfd, -1)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				log.Warn("exit-fd: poll: " + err.Error())
				return
			}
			if pfd[1].Revents != 0 {
				return
			}
			if pfd[0].Revents != 0 {
				close(event)
				return
			}
		}
	}()
	return func() {
		unix.Write(wake[1], []byte{0})
		<-done
		unix.Close(wake[0])
		unix.Close(wake[1])
	}
}

// slirpVersion is -v's text: slirp4netns's lines, which scripts parse
// (the first for the version, SLIRP_CONFIG_VERSION_MAX for the features),
// with gonetns's own version in the build metadata.
func slirpVersion() string {
	own, _, _ := strings.Cut(gonetnsVersion(), "+")
	commit := "unknown"
	gv := "unknown"
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" {
				commit = s.Value
			}
		}
		for _, d := range bi.Deps {
			if d.Path == "gvisor.dev/gvisor" {
				gv = d.Version
			}
		}
	}
	return fmt.Sprintf("slirp4netns version %s+gonetns.%s\ncommit: %s\nlibslirp: none (gonetns %s, gVisor netstack %s)\nSLIRP_CONFIG_VERSION_MAX: %d\n",
		slirp4netnsVersion, own, commit, gonetnsVersion(), gv, slirpConfigVersion)
}

// confineSlirp applies --enable-sandbox (Landlock: no file but the API
// socket's directory, where the socket is removed at exit) and
// --enable-seccomp (package confine's filter), once everything is set up:
// what the namespace still needs done (forwarding a port into it) is done
// by the helper Join started there, not by this process. A layer the
// kernel lacks is a warning and the process goes on, as slirp4netns's own
// sandbox does on such kernels; one that fails is an error.
func confineSlirp(o *slirpOptions, log *slog.Logger) error {
	type layer struct {
		name string
		res  confine.Result
	}
	var layers []layer
	if o.enableSandbox {
		var f confine.Files
		if o.apiSocket != "" {
			f.ReadWriteDirs = []string{filepath.Dir(o.apiSocket)}
		}
		layers = append(layers, layer{"--enable-sandbox (landlock)", confine.Landlock(f)})
	}
	if o.enableSeccomp {
		layers = append(layers, layer{"--enable-seccomp", confine.Seccomp()})
	}
	for _, l := range layers {
		switch {
		case l.res.Err != nil:
			return fmt.Errorf("%s: %s", l.name, l.res.Detail)
		case !l.res.Applied:
			log.Warn(l.name + ": " + l.res.Detail + "; the network process runs without it")
		default:
			log.Debug(l.name + ": " + l.res.Detail)
		}
	}
	return nil
}
