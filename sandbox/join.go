package sandbox

import (
	"net"
	"net/netip"
	"os"

	"github.com/gonetns/gonetns/port"
	"github.com/gonetns/gonetns/userns"
)

// Target is a network namespace someone else made, for Join: a container
// engine's (Podman, Buildah), RootlessKit 1.x's, or unshare -rn's.
type Target struct {
	// NetNS is the network namespace's path: /proc/PID/ns/net or a bind
	// mount of one.
	NetNS string
	// UserNS is the user namespace to enter first: the one the network
	// namespace belongs to, when this process is not root there (for a
	// PID, /proc/PID/ns/user). "" enters none.
	UserNS string
	// OpenOnly opens the interface (Config.IfName), creating it if it
	// does not exist, and leaves it as its owner configured it
	// (RootlessKit 1.x creates and configures tap0 itself). Otherwise
	// Join configures it as gonetns's own child does: up, the MTU,
	// Config.CIDR's .100 with a default route through .2 (with IPv6
	// fd00::100/64 through fd00::2), lo up (slirp4netns -c).
	OpenOnly bool
	// MAC is the interface's Ethernet address; nil leaves the kernel's
	// random one. Only without OpenOnly.
	MAC net.HardwareAddr
}

// Joined is gonetns's network serving a namespace it joined: the
// netstack on the TAP inside it, NAT, DNS, the egress policy and, with a
// port driver, ports published into it.
type Joined struct {
	nw     *network
	helper *userns.Helper
}

// Join gives the namespace of t gonetns's network, as slirp4netns does:
// a helper process enters the namespace (its user namespace first, if
// t says so), creates the TAP there through the same code as gonetns's own
// child and sends it back; the network runs in this process. With
// PortsBuiltin the helper stays in the namespace to connect published
// ports there (Ports); otherwise it exits at once. Of cfg, the network's
// fields apply (MTU, CIDR, IfName, IPv6, DisableHostLoopback, DNS, the
// egress policy, the outbound addresses, PCAP, PortDriver,
// DisableSourceIPTransparent, Debug, Logger); those of a run of a command
// must be left zero. Close the result when done.
func Join(cfg Config, t Target) (*Joined, error) {
	if cfg.PortDriver == "" {
		cfg.PortDriver = PortsNone
	}
	if err := cfg.validateJoin(t); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	nw, err := newNetwork(cfg, nil)
	if err != nil {
		return nil, err
	}
	link := nw.linkPlan()
	link.Iface.MAC = t.MAC
	link.OpenOnly = t.OpenOnly
	nc := netConfig{Mode: NetBuiltin, Link: link}
	opts := userns.JoinOptions{NetNS: t.NetNS, UserNS: t.UserNS, Network: nc, Debug: cfg.Debug, Logger: cfg.Logger}
	if nw.portsChild != nil {
		opts.ExtraFiles = []*os.File{nw.portsChild}
	}
	h, err := userns.Join(opts)
	if err != nil {
		nw.Close()
		return nil, err
	}
	j := &Joined{nw: nw, helper: h}
	info, files := h.NetworkInfo()
	if err := nw.start(h.PID(), info, files); err != nil {
		j.Close()
		return nil, err
	}
	if nw.dialer != nil {
		if err := h.Serve(); err != nil {
			j.Close()
			return nil, err
		}
	}
	return j, nil
}

// validateJoin checks cfg for Join: Validate's rules, the builtin network
// and a builtin port driver at most, nothing of a command's run.
func (c Config) validateJoin(t Target) error {
	if t.NetNS == "" {
		return invalidf("no network namespace to join")
	}
	if t.OpenOnly && t.MAC != nil {
		return invalidf("a MAC address is set only on an interface gonetns configures")
	}
	if c.Net != "" && c.Net != NetBuiltin {
		return invalidf("a joined namespace gets the builtin network, not --net=%s", c.Net)
	}
	switch c.PortDriver {
	case PortsNone, PortsBuiltin:
	default:
		return invalidf("a joined namespace publishes ports with the builtin port driver or none, not %s", c.PortDriver)
	}
	if c.DetachNetNS || c.PIDNS || c.UTSNS || c.IPCNS || c.CgroupNS || len(c.CopyUp) > 0 ||
		c.StateDir != "" || c.EvacuateCgroup2 != "" || len(c.Publish) > 0 {
		return invalidf("a joined namespace takes only the network's settings (no namespaces, mounts, state directory or --publish of its own)")
	}
	return c.Validate()
}

// Ports publishes ports into the namespace (slirp4netns's add_hostfwd),
// or is nil without a port driver.
func (j *Joined) Ports() port.Manager {
	if pd := j.nw.portDriver(); pd != nil {
		return pd
	}
	return nil
}

// Addresses are the namespace's address (.100 of the subnet) and, with
// IPv6, its IPv6 one; the latter is invalid without IPv6.
func (j *Joined) Addresses() (netip.Addr, netip.Addr) {
	return j.nw.addrs.child, j.nw.addrs.child6
}

// Network is the namespace's subnets (IPv4, and IPv6 when on) and the
// addresses in them that are gonetns's own (gateway and DNS), not the
// namespace's.
func (j *Joined) Network() (subnets []netip.Prefix, own []netip.Addr) {
	a := j.nw.addrs
	subnets, own = []netip.Prefix{a.subnet}, []netip.Addr{a.gateway, a.dns}
	if a.subnet6.IsValid() {
		subnets, own = append(subnets, a.subnet6), append(own, a.gateway6, a.dns6)
	}
	return subnets, own
}

// Close stops the network, then the helper. Idempotent.
func (j *Joined) Close() error {
	err := j.nw.Close()
	if herr := j.helper.Close(); err == nil {
		err = herr
	}
	return err
}
