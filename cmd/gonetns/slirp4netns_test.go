package main

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/gonetns/gonetns/sandbox"
)

func TestGetopt(t *testing.T) {
	opts := []getoptOption{
		{long: "configure", short: 'c'},
		{long: "exit-fd", short: 'e', arg: true},
		{long: "enable-ipv6", short: '6'},
		{long: "disable-host-loopback"},
		{long: "disable-dns"},
		{long: "api-socket", short: 'a', arg: true},
	}
	type opt struct{ name, value string }
	cases := []struct {
		args     []string
		want     []opt
		operands []string
		err      string
	}{
		{args: []string{"-c", "-e", "3", "123", "tap0"}, want: []opt{{"configure", ""}, {"exit-fd", "3"}}, operands: []string{"123", "tap0"}},
		// Options after the operands, as slirp4netns's callers write them.
		{args: []string{"-c", "123", "--api-socket", "/s", "tap0"}, want: []opt{{"configure", ""}, {"api-socket", "/s"}}, operands: []string{"123", "tap0"}},
		{args: []string{"-c6e3", "1"}, want: []opt{{"configure", ""}, {"enable-ipv6", ""}, {"exit-fd", "3"}}, operands: []string{"1"}},
		{args: []string{"--exit-fd=3", "-a/x", "1"}, want: []opt{{"exit-fd", "3"}, {"api-socket", "/x"}}, operands: []string{"1"}},
		{args: []string{"--api=/s", "1"}, want: []opt{{"api-socket", "/s"}}, operands: []string{"1"}},
		{args: []string{"--disable-h", "1"}, want: []opt{{"disable-host-loopback", ""}}, operands: []string{"1"}},
		{args: []string{"-c", "--", "-1", "-c"}, want: []opt{{"configure", ""}}, operands: []string{"-1", "-c"}},
		{args: []string{"-", "x"}, operands: []string{"-", "x"}},
		{args: []string{"--disable", "1"}, err: "option '--disable' is ambiguous; possibilities: '--disable-host-loopback' '--disable-dns'"},
		{args: []string{"--nope"}, err: "unrecognized option '--nope'"},
		{args: []string{"-x"}, err: "invalid option -- 'x'"},
		{args: []string{"-e"}, err: "option requires an argument -- 'e'"},
		{args: []string{"--exit-fd"}, err: "option '--exit-fd' requires an argument"},
		{args: []string{"--configure=1"}, err: "option '--configure' doesn't allow an argument"},
	}
	for _, tc := range cases {
		found, operands, err := getopt(tc.args, opts)
		if tc.err != "" {
			if err == nil || err.Error() != tc.err {
				t.Errorf("getopt(%q): %v, want %q", tc.args, err, tc.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("getopt(%q): %v", tc.args, err)
			continue
		}
		var got []opt
		for _, f := range found {
			got = append(got, opt{f.opt.long, f.value})
		}
		if !reflect.DeepEqual(got, tc.want) || !reflect.DeepEqual(operands, tc.operands) {
			t.Errorf("getopt(%q) = %v, %q; want %v, %q", tc.args, got, operands, tc.want, tc.operands)
		}
	}
}

func TestParseSlirp4netns(t *testing.T) {
	dir := t.TempDir()
	netns := filepath.Join(dir, "netns")
	if err := os.WriteFile(netns, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	// Podman 4.3.1's command line, and RootlessKit 1.1's.
	o, err := parseSlirp4netns([]string{"--disable-host-loopback", "--mtu=65520", "--enable-sandbox", "--enable-seccomp", "--enable-ipv6",
		"-c", "-e", "3", "-r", "4", "--netns-type=path", netns, "tap0"})
	if err != nil {
		t.Fatal(err)
	}
	want := slirpOptions{configure: true, exitFD: 3, readyFD: 4, mtu: 65520, ipv6: true, disableHostLoopback: true,
		netnsType: "path", enableSandbox: true, enableSeccomp: true, target: netns, tapName: "tap0"}
	if !reflect.DeepEqual(*o, want) {
		t.Errorf("Podman's command line: %+v\nwant %+v", *o, want)
	}
	o, err = parseSlirp4netns([]string{"--mtu", "65520", "-r", "3", "--disable-host-loopback", "--api-socket", "/run/s", "--enable-sandbox", "--enable-seccomp", "1234", "tap0"})
	if err != nil {
		t.Fatal(err)
	}
	cfg, target, err := o.sandboxConfig(nil)
	if err != nil {
		t.Fatal(err)
	}
	wantTarget := sandbox.Target{NetNS: "/proc/1234/ns/net", UserNS: "/proc/1234/ns/user", OpenOnly: true}
	if !reflect.DeepEqual(target, wantTarget) || cfg.MTU != 65520 || cfg.PortDriver != sandbox.PortsBuiltin || cfg.IfName != "tap0" ||
		cfg.CIDR != netip.MustParsePrefix("10.0.2.0/24") || !cfg.DisableHostLoopback || cfg.PortUDPIdleTimeout != 240*time.Second {
		t.Errorf("RootlessKit 1.1's command line: %+v %+v", cfg, target)
	}
	o, err = parseSlirp4netns([]string{"-c", "--macaddress=0e:d4:18:d9:38:fb", "--cidr=10.0.135.128/25", "--userns-path=" + netns, "1", "tap11", "extra"})
	if err != nil {
		t.Fatal(err)
	}
	cfg, target, err = o.sandboxConfig(nil)
	if err != nil {
		t.Fatal(err)
	}
	if target.UserNS != netns || target.MAC.String() != "0e:d4:18:d9:38:fb" || cfg.CIDR.String() != "10.0.135.128/25" || cfg.MTU != 1500 ||
		len(o.warnings) != 1 || o.warnings[0] != "WARNING: too many arguments" {
		t.Errorf("-c --macaddress --cidr --userns-path: %+v %+v %q", cfg, target, o.warnings)
	}
	if o, _ := parseSlirp4netns([]string{"1"}); o.tapName != "tap0" {
		t.Errorf("no TAPNAME: %q, want tap0", o.tapName)
	}
	// Cut at 15 characters, as slirp4netns's copy into IFNAMSIZ does.
	if o, _ := parseSlirp4netns([]string{"1", "tap-with-a-long-name"}); o.tapName != "tap-with-a-long" {
		t.Errorf("a 20-character TAPNAME: %q, want its first 15 characters", o.tapName)
	}

	bad := []struct {
		args  []string
		want  string
		usage bool
	}{
		{[]string{"-c", "--cidr", "24", "1", "tap11"}, "invalid CIDR: 24", false},
		{[]string{"-c", "--cidr", "foo", "1", "tap11"}, "invalid CIDR: foo", false},
		{[]string{"-c", "--cidr", "10.0.2.0", "1", "tap11"}, "invalid CIDR: 10.0.2.0", false},
		{[]string{"-c", "--cidr", "10.0.2.100/24", "1", "tap11"}, "CIDR needs to be a network address like 10.0.2.0/24, not like 10.0.2.100/24", false},
		{[]string{"-c", "--cidr", "10.0.2.100/26", "1", "tap11"}, "prefix length needs to be 1-25", false},
		{[]string{"-c", "--cidr", "300.0.2.0/24", "1", "tap11"}, "invalid network address: 300.0.2.0", false},
		{[]string{"--mtu=0", "1", "tap0"}, "MTU must be a positive integer (< 65522)", true},
		{[]string{"--mtu=65522", "1", "tap0"}, "MTU must be a positive integer (< 65522)", true},
		{[]string{"--mtu=1000", "1", "tap0"}, "MTU 1000 is too small for gonetns", false},
		{[]string{"-e", "x", "1", "tap0"}, "exit-fd must be a non-negative integer", true},
		{[]string{"-r", "-1", "1", "tap0"}, "ready-fd must be a non-negative integer", true},
		{[]string{"abc", "tap0"}, "PID must be a positive integer", true},
		{[]string{"0", "tap0"}, "PID must be a positive integer", true},
		{[]string{}, "missing PID or PATH", true},
		{[]string{"--netns-type=path", filepath.Join(dir, "none"), "tap0"}, "existing path expected when --netns-type=path: no such file or directory", false},
		{[]string{"--netns-type=tapfd", "3"}, `--netns-type must be either "pid" or "path"`, true},
		{[]string{"--userns-path=/nonexistent/x", "1", "tap0"}, "userns path doesn't exist: /nonexistent/x", true},
		{[]string{"--macaddress=0e:d4:18:d9:38:fb", "1", "tap0"}, "--macaddr cannot be specified when --configure or -c is not specified", true},
		{[]string{"-c", "--macaddress=0e:d4:18", "1", "tap0"}, `"0e:d4:18" is an invalid MAC address.`, false},
		{[]string{"--target-type=bess", "/s"}, "--target-type=bess is not supported", false},
		{[]string{"--target-type=x", "1"}, `--target-type must be either "netns" or "bess"`, true},
		{[]string{"--bogus", "1"}, "unrecognized option '--bogus'", true},
	}
	for _, tc := range bad {
		o, err := parseSlirp4netns(tc.args)
		if err == nil {
			_, _, err = o.sandboxConfig(nil)
		}
		var ue *errSlirpUsage
		if err == nil || !strings.Contains(err.Error(), tc.want) || errors.As(err, &ue) != tc.usage {
			t.Errorf("%q: %v (usage %v), want %q (usage %v)", tc.args, err, errors.As(err, &ue), tc.want, tc.usage)
		}
	}
	for _, args := range [][]string{{"-h"}, {"--help", "--bogus"}} {
		if o, err := parseSlirp4netns(args); err != nil || !o.helpShown {
			t.Errorf("%q: %+v, %v", args, o, err)
		}
	}
	if o, err := parseSlirp4netns([]string{"-v"}); err != nil || !o.version {
		t.Errorf("-v: %+v, %v", o, err)
	}
}

// Callers detect slirp4netns's features by looking for flag names in its
// help (Podman, RootlessKit, Buildah), and read its version line.
func TestSlirp4netnsHelpAndVersion(t *testing.T) {
	var b strings.Builder
	fprintSlirpUsage(&b, "slirp4netns")
	for _, flag := range []string{"--configure", "--exit-fd", "--ready-fd", "--mtu", "--enable-ipv6", "--api-socket", "--cidr",
		"--disable-host-loopback", "--netns-type", "--userns-path", "--enable-sandbox", "--enable-seccomp", "--outbound-addr",
		"--outbound-addr6", "--disable-dns", "--macaddress", "--target-type", "--help", "--version"} {
		if !strings.Contains(b.String(), flag+" ") && !strings.Contains(b.String(), flag+"=") {
			t.Errorf("help lacks %s", flag)
		}
	}
	if !strings.HasPrefix(b.String(), "Usage: slirp4netns [OPTION]... PID|PATH [TAPNAME]\n") {
		t.Errorf("help starts %q", strings.SplitN(b.String(), "\n", 2)[0])
	}
	v := slirpVersion()
	lines := strings.Split(v, "\n")
	if !strings.HasPrefix(lines[0], "slirp4netns version 1.3.1+gonetns.") || !strings.Contains(v, "\nSLIRP_CONFIG_VERSION_MAX: 4\n") {
		t.Errorf("version: %q", v)
	}
}

func TestSlirpMAC(t *testing.T) {
	o, err := parseSlirp4netns([]string{"-c", "--macaddress", "0E:D4:18:D9:38:FB", "1"})
	want := net.HardwareAddr{0x0e, 0xd4, 0x18, 0xd9, 0x38, 0xfb}
	if err != nil || o.mac.String() != want.String() {
		t.Errorf("%v, %v", o, err)
	}
}
