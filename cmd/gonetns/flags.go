package main

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strings"

	"github.com/spf13/pflag"

	"github.com/gonetns/gonetns/dns"
	"github.com/gonetns/gonetns/portfwd"
	"github.com/gonetns/gonetns/userns"
)

// options are the parsed command line.
type options struct {
	net                 string
	mtu                 int
	cidr                netip.Prefix
	ifname              string
	disableHostLoopback bool
	ipv6                bool
	dnsUpstreams        []netip.AddrPort
	portDriver          string
	publish             []portfwd.Spec
	copyUp              []string
	copyUpMode          string
	propagation         string
	pidns               bool
	utsns               bool
	ipcns               bool
	cgroupns            bool
	reaper              string
	stateDir            string
	subidSource         userns.SubIDSource
	debug               bool
	cpuProfile          string
	version             bool
	args                []string
}

var errHelpShown = errors.New("help shown")

const usageHead = `gonetns runs COMMAND as root in new user, mount and network namespaces,
as an unprivileged user, with its own userspace network (no helper binaries).

Usage:
  gonetns [flags] COMMAND [ARGS...]
  gonetns ctl [--socket PATH] list-ports|add-ports|remove-ports|info   (see gonetns ctl --help)

Flags stop at the first argument that is not a flag: gonetns sh -c 'id'.

Flags:
`

func parseFlags(args []string, out io.Writer) (*options, error) {
	o := &options{}
	fs := pflag.NewFlagSet("gonetns", pflag.ContinueOnError)
	fs.SetInterspersed(false)
	fs.SetOutput(out)
	fs.SortFlags = false
	var cidr, subid string
	var dnsUpstreams, publish []string
	fs.StringVar(&o.net, "net", "builtin", "network: builtin (userspace NAT to the host), none (only lo) or host (no network namespace)")
	fs.IntVar(&o.mtu, "mtu", 65520, "MTU of the namespace's interface (1280..65520) for --net=builtin")
	fs.StringVar(&cidr, "cidr", "10.0.2.0/24", "subnet of --net=builtin: the namespace is .100, the gateway (host loopback) .2, DNS .3")
	fs.StringVar(&o.ifname, "ifname", "tap0", "name of the namespace's interface for --net=builtin")
	fs.BoolVar(&o.disableHostLoopback, "disable-host-loopback", false, "refuse connections to the gateway address and to the host's 127.0.0.0/8 and ::1")
	fs.BoolVar(&o.ipv6, "ipv6", false, "also IPv6 for --net=builtin: fd00::100/64 inside, gateway fd00::2 (the host's ::1), DNS fd00::3")
	fs.StringArrayVar(&dnsUpstreams, "dns-upstream", nil, "DNS server the namespace's resolver forwards to, IP[:PORT] (repeatable; default: the host's /etc/resolv.conf)")
	fs.StringVar(&o.portDriver, "port-driver", "", "how -p publishes ports: builtin (splice between host and namespace sockets) or none; default builtin unless --net=host")
	fs.StringArrayVarP(&publish, "publish", "p", nil, "publish a port of the namespace on the host, "+portfwd.Grammar+", e.g. 8080:80/tcp (repeatable)")
	fs.StringArrayVar(&o.copyUp, "copy-up", nil, "make DIR a writable copy inside, e.g. --copy-up=/etc (repeatable; /tmp is refused)")
	fs.StringVar(&o.copyUpMode, "copy-up-mode", "tmpfs+symlink", "how --copy-up copies: tmpfs+symlink")
	fs.StringVar(&o.propagation, "propagation", "rprivate", "mount propagation inside: rprivate or rslave")
	fs.BoolVar(&o.pidns, "pidns", false, "new PID namespace: the command is PID 1 ($$ is 1), and everything inside is killed when gonetns exits")
	fs.BoolVar(&o.utsns, "utsns", false, "new UTS namespace (hostname)")
	fs.BoolVar(&o.ipcns, "ipcns", false, "new IPC namespace")
	fs.BoolVar(&o.cgroupns, "cgroupns", false, "new cgroup namespace")
	fs.StringVar(&o.reaper, "reaper", "auto", "make the gonetns child the reaper of processes orphaned inside: true, false or auto (false; with --pidns the command is PID 1 and inherits them)")
	fs.StringVar(&o.stateDir, "state-dir", "", "state directory (lock, child_pid, api.sock); default: a new one under $XDG_RUNTIME_DIR or /tmp, removed on exit")
	fs.StringVar(&subid, "subid-source", "auto", "where subordinate ids come from: auto, static (/etc/subuid, /etc/subgid) or dynamic (getsubids)")
	fs.BoolVar(&o.debug, "debug", false, "print debug messages")
	fs.StringVar(&o.cpuProfile, "cpuprofile", "", "write a CPU profile of the gonetns parent (the network) to FILE, for go tool pprof")
	fs.BoolVarP(&o.version, "version", "v", false, "print the version and exit")
	help := fs.BoolP("help", "h", false, "show this help")
	fs.Usage = func() {
		fmt.Fprint(out, usageHead)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return nil, errHelpShown
		}
		return nil, err
	}
	if *help {
		fs.Usage()
		return nil, errHelpShown
	}
	if o.version {
		return o, nil
	}
	o.args = fs.Args()
	if len(o.args) == 0 {
		return nil, errors.New("no command given: gonetns [flags] COMMAND [ARGS...], e.g. gonetns bash")
	}
	var err error
	switch o.net {
	case "builtin", "none", "host":
	default:
		return nil, fmt.Errorf("invalid --net=%s: use builtin, none or host", o.net)
	}
	if o.mtu < 1280 || o.mtu > 65520 {
		return nil, fmt.Errorf("invalid --mtu=%d: use a value from 1280 to 65520", o.mtu)
	}
	if o.cidr, err = parseCIDR(cidr); err != nil {
		return nil, err
	}
	for _, s := range dnsUpstreams {
		a, err := dns.ParseUpstream(s)
		if err != nil {
			return nil, fmt.Errorf("invalid --dns-upstream=%s: %w", s, err)
		}
		o.dnsUpstreams = append(o.dnsUpstreams, a)
	}
	switch o.portDriver {
	case "":
		o.portDriver = "builtin"
		if o.net == "host" {
			o.portDriver = "none"
		}
	case "builtin", "none":
	default:
		return nil, fmt.Errorf("invalid --port-driver=%s: use builtin or none", o.portDriver)
	}
	if o.net == "host" && o.portDriver == "builtin" {
		return nil, errors.New("--port-driver=builtin needs a network namespace: with --net=host the namespace's ports are the host's already")
	}
	for _, s := range publish {
		spec, err := portfwd.ParseSpec(s)
		if err != nil {
			return nil, fmt.Errorf("invalid --publish=%s: %w", s, err)
		}
		o.publish = append(o.publish, spec)
	}
	if len(o.publish) > 0 && o.portDriver != "builtin" {
		return nil, fmt.Errorf("--publish needs --port-driver=builtin (now %s)", o.portDriver)
	}
	if o.ifname == "" || len(o.ifname) > 15 || strings.ContainsAny(o.ifname, "/ \t\n:") {
		return nil, fmt.Errorf("invalid --ifname=%q: use up to 15 characters without '/', ':' or spaces", o.ifname)
	}
	if o.copyUpMode != "tmpfs+symlink" {
		return nil, fmt.Errorf("invalid --copy-up-mode=%s: only tmpfs+symlink is supported", o.copyUpMode)
	}
	switch o.propagation {
	case "rprivate", "rslave":
	default:
		return nil, fmt.Errorf("invalid --propagation=%s: use rprivate or rslave", o.propagation)
	}
	switch o.reaper {
	case "auto", "true", "false":
	default:
		return nil, fmt.Errorf("invalid --reaper=%s: use auto, true or false", o.reaper)
	}
	if o.subidSource, err = userns.ParseSubIDSource(subid); err != nil {
		return nil, err
	}
	if err := userns.ValidateCopyUp(o.copyUp); err != nil {
		return nil, err
	}
	return o, nil
}

// parseCIDR accepts an IPv4 subnet big enough to hold .100.
func parseCIDR(s string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("invalid --cidr=%s: %w (want e.g. 10.0.2.0/24)", s, err)
	}
	if !p.Addr().Is4() {
		return netip.Prefix{}, fmt.Errorf("invalid --cidr=%s: must be an IPv4 subnet", s)
	}
	if p.Bits() > 25 {
		return netip.Prefix{}, fmt.Errorf("invalid --cidr=%s: the prefix must be /25 or shorter, so that .100 is inside it", s)
	}
	if p.Masked() != p {
		return netip.Prefix{}, fmt.Errorf("invalid --cidr=%s: host bits are set; did you mean %s?", s, p.Masked())
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
