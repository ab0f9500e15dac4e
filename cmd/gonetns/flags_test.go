package main

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/spf13/pflag"

	"github.com/gonetns/gonetns/sandbox"
	"time"
)

// logLines collects what parsing logs.
type logLines struct{ lines *[]string }

func (l logLines) Enabled(context.Context, slog.Level) bool { return true }
func (l logLines) Handle(_ context.Context, r slog.Record) error {
	s := r.Message
	r.Attrs(func(a slog.Attr) bool { s += " " + a.String(); return true })
	*l.lines = append(*l.lines, s)
	return nil
}
func (l logLines) WithAttrs([]slog.Attr) slog.Handler { return l }
func (l logLines) WithGroup(string) slog.Handler      { return l }

func TestParseFlags(t *testing.T) {
	cases := []struct {
		name  string
		who   personality
		args  []string
		check func(t *testing.T, o *options, logged []string)
		err   string
	}{
		{name: "gonetns defaults", args: []string{"true"}, check: func(t *testing.T, o *options, _ []string) {
			c := o.cfg
			if c.Net != sandbox.NetBuiltin || c.PortDriver != "" || c.MTU != 65520 || c.DisableSourceIPTransparent || c.LeaveOrphans || !slices.Equal(o.args, []string{"true"}) {
				t.Errorf("%+v %v", c, o.args)
			}
		}},
		{name: "rootlesskit defaults", who: asRootlessKit, args: []string{"bash"}, check: func(t *testing.T, o *options, _ []string) {
			if o.cfg.Net != sandbox.NetHost || o.cfg.PortDriver != sandbox.PortsNone || !o.cfg.LeaveOrphans {
				t.Errorf("as rootlesskit: net %q port driver %q, leave orphans %v; want host, none and RootlessKit's true", o.cfg.Net, o.cfg.PortDriver, o.cfg.LeaveOrphans)
			}
		}},
		{name: "dockerd-rootless.sh", who: asRootlessKit, args: strings.Fields(
			"--state-dir=/run/user/1000/dockerd-rootless --net=slirp4netns --mtu=65520 --slirp4netns-sandbox=auto --slirp4netns-seccomp=auto " +
				"--disable-host-loopback --port-driver=builtin --copy-up=/etc --copy-up=/run --propagation=rslave --detach-netns dockerd-rootless.sh --experimental"),
			check: func(t *testing.T, o *options, logged []string) {
				c := o.cfg
				if c.Net != sandbox.NetBuiltin || c.PortDriver != sandbox.PortsBuiltin || !c.DisableHostLoopback || !c.DetachNetNS ||
					c.Propagation != "rslave" || !slices.Equal(c.CopyUp, []string{"/etc", "/run"}) || c.StateDir != "/run/user/1000/dockerd-rootless" ||
					!slices.Equal(o.args, []string{"dockerd-rootless.sh", "--experimental"}) {
					t.Errorf("%+v %v", c, o.args)
				}
				for _, want := range []string{"--slirp4netns-sandbox value=auto", "--slirp4netns-seccomp value=auto", "--net=slirp4netns is RootlessKit's name"} {
					if !slices.ContainsFunc(logged, func(l string) bool { return strings.Contains(l, want) }) {
						t.Errorf("no debug line with %q in %q", want, logged)
					}
				}
			}},
		{name: "later flag wins", who: asRootlessKit, args: []string{"--net=pasta", "--disable-host-loopback", "--disable-host-loopback=false", "x"},
			check: func(t *testing.T, o *options, _ []string) {
				if o.cfg.DisableHostLoopback || o.cfg.Net != sandbox.NetBuiltin {
					t.Errorf("%+v", o.cfg)
				}
			}},
		{name: "every net alias", args: []string{"--net=gvisor-tap-vsock", "--net=vpnkit", "--net=lxc-user-nic", "x"}, check: func(t *testing.T, o *options, _ []string) {
			if o.cfg.Net != sandbox.NetBuiltin {
				t.Errorf("net %q", o.cfg.Net)
			}
		}},
		{name: "port driver aliases", args: []string{"--port-driver=pesto", "x"}, check: func(t *testing.T, o *options, _ []string) {
			if o.cfg.PortDriver != sandbox.PortsBuiltin {
				t.Errorf("port driver %q", o.cfg.PortDriver)
			}
		}},
		{name: "implicit", args: []string{"--port-driver=implicit", "x"}, check: func(t *testing.T, o *options, _ []string) {
			if o.cfg.PortDriver != sandbox.PortsImplicit {
				t.Errorf("port driver %q", o.cfg.PortDriver)
			}
		}},
		// RootlessKit's --mtu=0 is its default; the sandbox gives a zero
		// MTU its default (sandbox's TestConfigDefaults).
		{name: "mtu 0 is accepted as the default", args: []string{"--mtu=0", "x"}, check: func(t *testing.T, o *options, _ []string) {
			if o.cfg.MTU != 0 {
				t.Errorf("mtu %d, want 0 (the sandbox's default)", o.cfg.MTU)
			}
		}},
		{name: "single-dash long flags", who: asRootlessKit, args: []string{"-net", "slirp4netns", "-port-driver=builtin", "-p", "8080:80/tcp", "-debug", "sh", "-c", "-net"},
			check: func(t *testing.T, o *options, _ []string) {
				if o.cfg.Net != sandbox.NetBuiltin || o.cfg.PortDriver != sandbox.PortsBuiltin || len(o.cfg.Publish) != 1 || !o.cfg.Debug ||
					!slices.Equal(o.args, []string{"sh", "-c", "-net"}) {
					t.Errorf("%+v %v", o.cfg, o.args)
				}
			}},
		{name: "source ip transparent off", args: []string{"--source-ip-transparent=false", "--source-ip-transparent-backend=nft", "x"}, check: func(t *testing.T, o *options, _ []string) {
			if !o.cfg.DisableSourceIPTransparent {
				t.Error("--source-ip-transparent=false did not turn it off")
			}
		}},
		{name: "busy poll auto by default", args: []string{"x"}, check: func(t *testing.T, o *options, _ []string) {
			if o.cfg.BusyPoll != 0 || o.cfg.DisableBusyPoll {
				t.Errorf("busy poll %v, disabled %v; want 0 (auto) and false", o.cfg.BusyPoll, o.cfg.DisableBusyPoll)
			}
		}},
		{name: "busy poll auto", args: []string{"--busy-poll=50us", "--busy-poll=auto", "x"}, check: func(t *testing.T, o *options, _ []string) {
			if o.cfg.BusyPoll != 0 || o.cfg.DisableBusyPoll {
				t.Errorf("busy poll %v, disabled %v; want 0 (auto) and false", o.cfg.BusyPoll, o.cfg.DisableBusyPoll)
			}
		}},
		{name: "busy poll 50us", args: []string{"--busy-poll=50us", "x"}, check: func(t *testing.T, o *options, _ []string) {
			if o.cfg.BusyPoll != 50*time.Microsecond || o.cfg.DisableBusyPoll {
				t.Errorf("busy poll %v, disabled %v", o.cfg.BusyPoll, o.cfg.DisableBusyPoll)
			}
		}},
		{name: "busy poll 0", args: []string{"--busy-poll=0", "x"}, check: func(t *testing.T, o *options, _ []string) {
			if o.cfg.BusyPoll != 0 || !o.cfg.DisableBusyPoll {
				t.Errorf("busy poll %v, disabled %v; want off", o.cfg.BusyPoll, o.cfg.DisableBusyPoll)
			}
		}},
		{name: "busy poll 0s", args: []string{"--busy-poll=0s", "x"}, check: func(t *testing.T, o *options, _ []string) {
			if !o.cfg.DisableBusyPoll {
				t.Error("--busy-poll=0s did not turn it off")
			}
		}},
		{name: "busy poll off", args: []string{"--busy-poll=off", "x"}, check: func(t *testing.T, o *options, _ []string) {
			if !o.cfg.DisableBusyPoll {
				t.Error("--busy-poll=off did not turn it off")
			}
		}},
		{name: "busy poll garbage", args: []string{"--busy-poll=fast", "x"}, err: "invalid --busy-poll=fast: use auto, 0 (off), or a duration up to 1ms such as 50us"},
		{name: "udp idle 0", args: []string{"--port-udp-idle-timeout=0", "x"}, err: "invalid --port-udp-idle-timeout=0s: use at least 1s"},
		{name: "kill orphans off", args: []string{"--kill-orphans=false", "x"}, check: func(t *testing.T, o *options, _ []string) {
			if !o.cfg.LeaveOrphans {
				t.Error("--kill-orphans=false did not keep orphans")
			}
		}},
		{name: "comma-separated, as RootlessKit splits them", who: asRootlessKit, args: []string{"--net=slirp4netns", "--port-driver=builtin", "-p", "127.0.0.1:8080:80/tcp,127.0.0.1:8443:443/tcp", "--copy-up=/etc,/run", "x"},
			check: func(t *testing.T, o *options, _ []string) {
				if len(o.cfg.Publish) != 2 || !slices.Equal(o.cfg.CopyUp, []string{"/etc", "/run"}) {
					t.Errorf("%+v", o.cfg)
				}
			}},
		{name: "publish and dns", args: []string{"-p", "127.0.0.1:8080:80/tcp", "--publish=[::1]:8080:80/tcp6", "--dns-upstream=127.0.0.1:5353", "x"},
			check: func(t *testing.T, o *options, _ []string) {
				if len(o.cfg.Publish) != 2 || o.cfg.Publish[1].ParentIP != netip.IPv6Loopback() || !reflect.DeepEqual(o.cfg.DNSUpstreams, []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:5353")}) {
					t.Errorf("%+v", o.cfg)
				}
			}},
		{name: "print-semver", who: asRootlessKit, args: []string{"--print-semver=major"}, check: func(t *testing.T, o *options, _ []string) {
			if o.printSemver != "major" {
				t.Errorf("%+v", o)
			}
		}},
		{name: "evacuate needs pidns", args: []string{"--evacuate-cgroup2=evac", "x"}, err: "needs --pidns and --cgroupns"},
		{name: "bad net", args: []string{"--net=slirp", "x"}, err: "builtin, none or host"},
		{name: "bad cidr", args: []string{"--cidr=10.0.2/24", "x"}, err: "invalid --cidr"},
		{name: "bad publish", args: []string{"-p", "8080/tcp", "x"}, err: "invalid --publish"},
		{name: "copy-up-mode", args: []string{"--copy-up-mode=overlayfs", "x"}, err: "only tmpfs+symlink"},
		{name: "unknown flag", args: []string{"--no-such", "x"}, err: "unknown flag"},
		{name: "did you mean", args: []string{"--publsh=8080:80", "x"}, err: "unknown flag: --publsh (did you mean --publish?)"},
		{name: "no guess for what is nothing like a flag", args: []string{"--zzzzzz", "x"}, err: "unknown flag: --zzzzzz"},
		{name: "a protocol where a port goes", args: []string{"-p", "8080:tcp", "x"}, err: `"tcp" is a protocol, not a port: it goes after a slash, as in 8080:80/tcp`},
		{name: "publish is tcp unless said, as Docker's", args: []string{"-p", "8080:80", "-p", "127.0.0.1:5353:53/udp", "x"}, check: func(t *testing.T, o *options, _ []string) {
			if len(o.cfg.Publish) != 2 || o.cfg.Publish[0].Proto != "tcp" || o.cfg.Publish[0].ParentPort != 8080 || o.cfg.Publish[1].Proto != "udp" {
				t.Errorf("publish %v", o.cfg.Publish)
			}
		}},
		{name: "rootlesskit's publish wants the protocol", who: asRootlessKit, args: []string{"--net=slirp4netns", "--port-driver=builtin", "-p", "8080:80", "x"}, err: "missing /PROTO"},
		{name: "publish with --net=host", args: []string{"--net=host", "-p", "8080:80", "x"}, err: "--publish needs a network namespace: with --net=host the command's ports are the host's already"},
		{name: "no command", args: []string{"--net=none"}, err: "no command given"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var logged []string
			o, err := parseFlags(c.args, c.who, "test", io.Discard, slog.New(logLines{&logged}))
			if c.err != "" {
				if err == nil || !strings.Contains(err.Error(), c.err) {
					t.Fatalf("err %v, want %q", err, c.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			c.check(t, o, logged)
		})
	}
}

// --help: the sections in order, each visible flag in one of them, lines
// of at most 80 columns when the output is not a terminal, no default
// broken across lines, the examples at the end.
// TestParseFlagsEmptyValues: a flag given an empty value is refused where
// the value cannot be empty, and taken where RootlessKit takes it.
func TestParseFlagsEmptyValues(t *testing.T) {
	cases := []struct {
		who  personality
		args []string
		err  string // "" for accepted
	}{
		{asGonetns, []string{"--net=", "x"}, "--net is given an empty value (an unset variable?): give it one (--help lists them), or leave the flag out for the default, builtin"},
		{asGonetns, []string{"--port-driver=", "x"}, "--port-driver is given an empty value (an unset variable?): give it one (--help lists them), or leave the flag out\n"},
		{asGonetns, []string{"-p", "", "x"}, "--publish is given an empty value"},
		{asGonetns, []string{"--copy-up=", "x"}, "--copy-up is given an empty value"},
		{asGonetns, []string{"--link=", "x"}, "leave the flag out for the default, auto"},
		{asGonetns, []string{"--ifname=", "x"}, "--ifname is given an empty value"},
		{asGonetns, []string{"--propagation=", "x"}, "--propagation is given an empty value"},
		{asGonetns, []string{"--reaper=", "x"}, "--reaper is given an empty value"},
		{asGonetns, []string{"--subid-source=", "x"}, "--subid-source is given an empty value"},
		{asGonetns, []string{"--state-dir=", "--pcap=", "--outbound-addr=", "--evacuate-cgroup2=", "x"}, ""}, // empty is their default
		{asRootlessKit, []string{"--net=", "x"}, "leave the flag out for the default, host"},
		{asRootlessKit, []string{"--net=slirp4netns", "--port-driver=", "x"}, "leave the flag out for the default, none"},
		{asRootlessKit, []string{"--net=slirp4netns", "--publish=", "x"}, "--publish is given an empty value"},
		{asRootlessKit, []string{"--copy-up=", "x"}, "--copy-up is given an empty value"},
		// RootlessKit v3.0.1 runs the command with these empty.
		{asRootlessKit, []string{"--ifname=", "--propagation=", "--subid-source=", "--state-dir=", "x"}, ""},
		{asGonetns, []string{"--net=", "--net=none", "x"}, ""}, // the last one counts
	}
	for _, tc := range cases {
		_, err := parseFlags(tc.args, tc.who, "gonetns", io.Discard, slog.New(slog.DiscardHandler))
		got := ""
		if err != nil {
			got = err.Error() + "\n"
		}
		if tc.err == "" && err != nil || tc.err != "" && !strings.Contains(got, tc.err) {
			t.Errorf("personality %d, %q: error %q, want one with %q", tc.who, tc.args, got, tc.err)
		}
	}
}

func TestHelpLayout(t *testing.T) {
	for _, who := range []personality{asGonetns, asRootlessKit} {
		var out bytes.Buffer
		if _, err := parseFlags([]string{"--help"}, who, "gonetns", &out, slog.New(slog.DiscardHandler)); err != errHelpShown {
			t.Fatal(err)
		}
		help := out.String()
		for i, l := range strings.Split(help, "\n") {
			if len(l) > 80 {
				t.Errorf("line %d is %d columns wide: %q", i+1, len(l), l)
			}
			if strings.Contains(l, "(default") && !strings.HasSuffix(l, ")") {
				t.Errorf("line %d breaks a default: %q", i+1, l)
			}
		}
		last := -1
		for _, sec := range flagSections {
			i := strings.Index(help, "\n"+sec+":\n")
			if i < last {
				t.Errorf("section %q missing or out of order", sec)
			}
			last = i
		}
		if i := strings.Index(help, "\nExamples:\n"); i < last {
			t.Errorf("no examples after the sections")
		}
		fs, _ := defineFlags(&options{}, who, "gonetns", io.Discard)
		fs.VisitAll(func(f *pflag.Flag) {
			if a := f.Annotations[sectionKey]; len(a) != 1 || !slices.Contains(flagSections, a[0]) {
				t.Errorf("--%s is in no section of --help", f.Name)
			}
		})
	}
}

// The help lists every RootlessKit v3 flag (nerdctl's script greps it for
// --detach-netns) and gonetns's own.
func TestHelpListsRootlessKitFlags(t *testing.T) {
	var out bytes.Buffer
	_, err := parseFlags([]string{"--help"}, asRootlessKit, "rootlesskit", &out, slog.New(slog.DiscardHandler))
	if err != errHelpShown {
		t.Fatal(err)
	}
	for _, f := range []string{"--debug", "--print-semver", "--help", "--version", "--copy-up", "--copy-up-mode", "--propagation",
		"--net", "--mtu", "--cidr", "--ifname", "--disable-host-loopback", "--ipv6", "--detach-netns",
		"--lxc-user-nic-binary", "--lxc-user-nic-bridge", "--pasta-binary", "--pesto-binary", "--slirp4netns-binary",
		"--slirp4netns-sandbox", "--slirp4netns-seccomp", "--vpnkit-binary", "--port-driver", "--publish", "--source-ip-transparent",
		"--source-ip-transparent-backend", "--pidns", "--cgroupns", "--utsns", "--ipcns", "--reaper", "--evacuate-cgroup2",
		"--state-dir", "--subid-source", "--dns-upstream", "--kill-orphans", "--cpuprofile"} {
		if !strings.Contains(out.String(), f+" ") && !strings.Contains(out.String(), f+",") && !strings.Contains(out.String(), f+".") {
			t.Errorf("--help does not list %s", f)
		}
	}
	if !strings.Contains(out.String(), `(default "host")`) {
		t.Errorf("as rootlesskit the help does not show --net's default host:\n%s", out.String())
	}
}

func TestSemverPart(t *testing.T) {
	for _, c := range []struct {
		v, part string
		want    int
		err     bool
	}{
		{"3.0.1", "major", 3, false},
		{"3.0.1", "minor", 0, false},
		{"3.0.1", "patch", 1, false},
		{"v0.2.0-devel", "minor", 2, false},
		{"0.2.0+abc", "patch", 0, false},
		{"0.2", "major", 0, true},
		{"3.0.1", "build", 0, true},
	} {
		got, err := semverPart(c.v, c.part)
		if (err != nil) != c.err || got != c.want {
			t.Errorf("semverPart(%q, %q) = %d, %v", c.v, c.part, got, err)
		}
	}
}

func TestParseSize(t *testing.T) {
	cases := []struct {
		in   string
		want int64
		err  bool
	}{
		{"0", 0, false},
		{"1048576", 1 << 20, false},
		{"256MiB", 256 << 20, false},
		{"256M", 256 << 20, false},
		{"64KiB", 64 << 10, false},
		{"2GiB", 2 << 30, false},
		{"1G", 1 << 30, false},
		{"", 0, true},
		{"MiB", 0, true},
		{"-1", 0, true},
		{"1.5GiB", 0, true},
		{"256MB", 0, true},
		{"99999999999GiB", 0, true},
	}
	for _, c := range cases {
		got, err := parseSize(c.in)
		if (err != nil) != c.err || got != c.want {
			t.Errorf("parseSize(%q) = %d, %v; want %d (error %v)", c.in, got, err, c.want, c.err)
		}
	}
}

func TestEgressFlags(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	o, err := parseFlags([]string{"--deny=127.0.0.1", "--deny", "2001:db8::/32", "--allow=192.0.2.0/24", "--deny-metadata", "--deny-private",
		"--outbound-addr=127.0.0.2", "--outbound-addr6=lo", "--pcap=/tmp/x.pcap", "--pcap-max-size=16MiB", "true"}, asGonetns, "gonetns", io.Discard, log)
	if err != nil {
		t.Fatal(err)
	}
	c := o.cfg
	if len(c.Deny) != 2 || c.Deny[0] != netip.MustParsePrefix("127.0.0.1/32") || c.Deny[1] != netip.MustParsePrefix("2001:db8::/32") ||
		len(c.Allow) != 1 || !c.DenyMetadata || !c.DenyPrivate || c.OutboundAddr != "127.0.0.2" || c.OutboundAddr6 != "lo" ||
		c.PCAP != "/tmp/x.pcap" || c.PCAPMaxSize != 16<<20 {
		t.Errorf("parsed %+v", c)
	}
	for _, bad := range []struct{ args, err string }{
		{"--deny=example.org", "invalid --deny=example.org"},
		{"--allow=10.0.2.2", "would never match"},
		{"--pcap-max-size=12XB", "invalid --pcap-max-size=12XB"},
		{"--pcap-max-size=1GiB", "needs --pcap"},
		{"--net=host --deny-private", "needs --net=builtin"},
	} {
		_, err := parseFlags(append(strings.Fields(bad.args), "true"), asGonetns, "gonetns", io.Discard, log)
		if err == nil || !strings.Contains(err.Error(), bad.err) {
			t.Errorf("%s: %v, want an error with %q", bad.args, err, bad.err)
		}
	}
}
