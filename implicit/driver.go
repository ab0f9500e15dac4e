// Package implicit is the implicit port driver (--port-driver=implicit, as
// pasta's -t auto and -u auto): every port something listens on inside the
// sandbox is published on the same port of the host, and withdrawn when it
// stops listening. The child watches (Watcher: it sees the namespace, over
// sock_diag); the parent publishes (Driver: it owns the host side) through
// a port.Manager's public methods, so that implicit ports take the same
// relay and dial protocol as explicit ones.
package implicit

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/gonetns/gonetns/internal/limitlog"
	"github.com/gonetns/gonetns/internal/wire"
	"github.com/gonetns/gonetns/port"
)

// Which host address a listener is published on follows the address it is
// bound to inside, family for family, so that what a server asks for is
// what it gets on the host (RootlessKit's implicit driver, pasta with
// --host-lo-to-ns-lo, behaves alike for loopback; pasta alone publishes
// every port on all addresses):
//
//	inside                         host                     relayed to inside
//	0.0.0.0:P                      0.0.0.0:P (tcp4/udp4)    127.0.0.1:P
//	127.0.0.1:P (any 127/8)        127.0.0.1:P, the same    127.0.0.1:P
//	10.0.2.100:P (any other)       0.0.0.0:P                10.0.2.100:P
//	[::]:P, IPV6_V6ONLY            [::]:P (tcp6/udp6)       [::1]:P
//	[::]:P, dual stack             [::]:P dual stack        127.0.0.1:P
//	[::1]:P                        [::1]:P                  [::1]:P
//	[fd00::100]:P (any other)      [::]:P                   [fd00::100]:P
//	IPv4-mapped [::ffff:a]:P       as a                     a
//
// Several sockets on one port and family (two servers, on 127.0.0.1 and on
// 10.0.2.100) get one published port: all addresses before a specific
// one, a specific one before loopback. Sockets on link-local or multicast
// addresses are not published (there is nothing on the host to relay them
// from). A UDP socket counts as listening when it is bound and not
// connected, as in `ss -lu`; that includes a client's unconnected socket
// while it exists, which pasta publishes too.
//
// Published ports show in the API's port list, marked implicit; an
// explicit port (--publish, POST /v1/ports) wins over an implicit one on
// the same host port: the implicit one is withdrawn for it and comes back
// when it is removed. Removing an implicit port through the API keeps it
// withdrawn until its socket inside closes. A port that cannot be
// published (privileged on the host, in use by another program) is logged
// once at Warn and retried, backing off from 1 s to a minute: the port may
// free up; except a port the host is using (EADDRINUSE): it stays the
// host's for as long as the listener inside lasts, not retried, so that a
// host service that restarts on its port finds it free again (a retry
// would take it in the instant the service lets go). Logged once; an
// explicit publish (POST /v1/ports) takes it if that is what is wanted,
// and the listener closing and opening again is a new appearance, which
// gets a new attempt. Unpublished lists the listeners not published, and
// why. Nothing of gonetns's own listens inside: its DNS server is in
// the parent's netstack, and the child's relay sockets are connected.

// Defaults of Config.
const (
	DefaultMaxPorts  = 4096
	implicitRetryMin = time.Second
	implicitRetryMax = time.Minute
	// maxReportListeners bounds one report from the child (~50 bytes
	// each in memory): far more than there are ports.
	maxReportListeners = 1 << 18
)

// Config configures a Driver.
type Config struct {
	// Manager publishes the ports, implicit and explicit alike (a
	// *portfwd.Manager in gonetns). Required.
	Manager port.Manager
	// Logger gets each publish and withdrawal at Debug and a port that
	// cannot be published at Warn, once. Nil discards.
	Logger *slog.Logger
	// MaxPorts bounds the ports published implicitly (each holds a host
	// socket and a goroutine); zero means 4096. Listeners beyond it are
	// not published, and a warning is logged.
	MaxPorts int
}

// Driver is the parent's side of the implicit port driver: it reads the
// child's listener reports (a Watcher's, over a wire.Conn of their
// own) and keeps the Manager's implicit ports in step. It is also the
// port driver the API serves (AddPort, RemovePort, ListPorts), so that
// explicit ports and implicit ones share host ports by one rule. Its
// methods are safe for concurrent use.
type Driver struct {
	m    port.Manager
	log  *slog.Logger
	c    *wire.Conn
	max  int
	kick chan struct{} // sync now (buffered)
	quit chan struct{}
	wg   sync.WaitGroup

	mu    sync.Mutex
	want  map[port.Spec]Listener // what the last report asks for, and why
	ports map[port.Spec]*implicitPort
	full  limitlog.Warner
	// hostWarned are the specs whose host port in use was logged at Warn
	// already: a listener that comes and goes is not logged again.
	hostWarned map[port.Spec]bool

	startOnce, closeOnce sync.Once
}

// implicitPort is the state of one wanted or published implicit spec.
type implicitPort struct {
	id         int  // the Manager's port ID; 0 while not published
	suppressed bool // removed through the API
	yielded    bool // an explicit port holds its host port (logged)
	// hostHeld: the host was using the port (EADDRINUSE); not retried
	// while the listener inside lasts.
	hostHeld bool
	failures int
	lastErr  error // of the last failed publish
	retryAt  time.Time
	warned   bool
}

// New returns a driver reading reports from c, which it owns from
// now on. It starts nothing: call Start.
func New(c *wire.Conn, cfg Config) *Driver {
	log := cfg.Logger
	if log == nil {
		log = discardLogger
	}
	if cfg.MaxPorts <= 0 {
		cfg.MaxPorts = DefaultMaxPorts
	}
	return &Driver{
		m:     cfg.Manager,
		log:   log,
		c:     c,
		max:   cfg.MaxPorts,
		kick:  make(chan struct{}, 1),
		quit:  make(chan struct{}),
		want:  make(map[port.Spec]Listener),
		ports: make(map[port.Spec]*implicitPort),

		hostWarned: make(map[port.Spec]bool),
	}
}

// Start starts the goroutines that read the reports and publish. They run
// until Close; if the child closes its end first, the ports published stay
// until Close. Calling Start again does nothing.
func (im *Driver) Start() {
	im.startOnce.Do(func() {
		reports := make(chan map[port.Spec]Listener)
		im.wg.Go(func() { im.read(reports) })
		im.wg.Go(func() { im.run(reports) })
	})
}

// Close stops reading reports and waits for the goroutines. The ports
// stay published until the Manager closes. It may be called more than
// once.
func (im *Driver) Close() error {
	im.closeOnce.Do(func() {
		close(im.quit)
		im.c.Close()
	})
	im.wg.Wait()
	return nil
}

// read receives the reports and hands each complete one to run.
func (im *Driver) read(reports chan<- map[port.Spec]Listener) {
	var parts []Listener
	for {
		var snap listenerSnapshot
		files, err := im.c.Recv(&snap)
		wire.CloseFiles(files) // reports carry none
		if err != nil {
			if errors.Is(err, wire.ErrBadMessage) {
				im.log.Warn("implicit: dropping a malformed listener report from the child", "err", err)
				parts = parts[:0]
				continue
			}
			select {
			case <-im.quit:
			default:
				if errors.Is(err, io.EOF) {
					im.log.Debug("implicit: the child stopped reporting listeners")
				} else {
					im.log.Warn("implicit: implicit ports: cannot read the child's listener reports; ports stay as they are", "err", err)
				}
			}
			return
		}
		parts = append(parts, snap.Listeners...)
		if snap.More {
			if len(parts) > maxReportListeners { // a report that never ends
				im.log.Warn("implicit: dropping an oversized listener report from the child", "listeners", len(parts))
				parts = parts[:0]
			}
			continue
		}
		want := implicitSpecs(parts, im.log)
		parts = parts[:0]
		select {
		case reports <- want:
		case <-im.quit:
			return
		}
	}
}

// run applies the reports, and retries what failed when it is due.
func (im *Driver) run(reports <-chan map[port.Spec]Listener) {
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	defer retry.Stop()
	for {
		select {
		case want := <-reports:
			im.mu.Lock()
			im.want = want
			im.mu.Unlock()
		case <-retry.C:
		case <-im.kick:
		case <-im.quit:
			return
		}
		if next := im.sync(); !next.IsZero() {
			retry.Reset(time.Until(next))
		}
	}
}

// poke makes run sync soon.
func (im *Driver) poke() {
	select {
	case im.kick <- struct{}{}:
	default:
	}
}

// sync publishes what is wanted and not published, withdraws what is
// published and no longer wanted, and returns when the earliest retry of
// a failed publish is due (zero if none is).
func (im *Driver) sync() time.Time {
	im.mu.Lock()
	defer im.mu.Unlock()
	for _, spec := range slices.SortedFunc(maps.Keys(im.ports), compareSpecs) {
		if _, ok := im.want[spec]; ok {
			continue
		}
		p := im.ports[spec]
		delete(im.ports, spec)
		if p.id != 0 {
			im.withdraw(spec, p)
		}
	}
	explicit := im.explicitLocked()
	published := 0
	for _, p := range im.ports {
		if p.id != 0 {
			published++
		}
	}
	var next time.Time
	now := time.Now()
	for _, spec := range slices.SortedFunc(maps.Keys(im.want), compareSpecs) {
		p := im.ports[spec]
		if p == nil {
			p = &implicitPort{}
			im.ports[spec] = p
		}
		if p.id != 0 || p.suppressed || p.hostHeld {
			continue
		}
		if overlapsAny(spec, explicit) {
			if !p.yielded {
				im.log.Debug("implicit: not publishing a listener implicitly: an explicit port holds its host port", "spec", spec.String(), "listener", im.want[spec].String())
				p.yielded = true
			}
			continue
		}
		p.yielded = false
		if now.Before(p.retryAt) {
			next = earliest(next, p.retryAt)
			continue
		}
		if published >= im.max {
			im.full.Warn(im.log, "implicit: too many implicit ports; listeners beyond the limit are not published", "limit", im.max)
			continue
		}
		l := im.want[spec]
		st, err := im.m.AddPort(context.Background(), spec)
		if errors.Is(err, syscall.EADDRINUSE) {
			p.hostHeld, p.lastErr = true, err
			msg := "implicit: not publishing a port the host is using; it stays the host's while the listener inside lasts (publish it explicitly to take it)"
			if !im.hostWarned[spec] {
				im.hostWarned[spec] = true
				im.log.Warn(msg, "spec", spec.String(), "listener", l.String())
			} else {
				im.log.Debug(msg, "spec", spec.String(), "listener", l.String())
			}
			continue
		}
		if err != nil {
			p.failures++
			p.lastErr = err
			p.retryAt = now.Add(min(implicitRetryMin<<min(p.failures-1, 10), implicitRetryMax))
			next = earliest(next, p.retryAt)
			if !p.warned {
				// AddPort's error names the spec and says what to do.
				im.log.Warn("implicit: cannot publish a port that listens inside; retrying", "listener", l.String(), "err", err)
				p.warned = true
			}
			continue
		}
		p.id = st.ID
		published++
		im.log.Debug("implicit: published implicitly", "id", st.ID, "spec", spec.String(), "listener", l.String(), "attempts", p.failures+1)
	}
	return next
}

func (im *Driver) withdraw(spec port.Spec, p *implicitPort) {
	if err := im.m.RemovePort(p.id); err != nil && !errors.Is(err, port.ErrUnknownPort) {
		im.log.Warn("implicit: withdraw an implicit port", "id", p.id, "spec", spec.String(), "err", err)
	}
	im.log.Debug("implicit: withdrew an implicit port", "id", p.id, "spec", spec.String())
	p.id = 0
}

func earliest(a, b time.Time) time.Time {
	if a.IsZero() || b.Before(a) {
		return b
	}
	return a
}

// explicitLocked lists the Manager's ports that are not implicit.
func (im *Driver) explicitLocked() []port.Spec {
	ids := im.implicitIDsLocked()
	var out []port.Spec
	for _, st := range im.m.ListPorts() {
		if _, ok := ids[st.ID]; !ok {
			out = append(out, st.Spec)
		}
	}
	return out
}

func (im *Driver) implicitIDsLocked() map[int]port.Spec {
	ids := make(map[int]port.Spec)
	for spec, p := range im.ports {
		if p.id != 0 {
			ids[p.id] = spec
		}
	}
	return ids
}

func overlapsAny(spec port.Spec, others []port.Spec) bool {
	for _, o := range others {
		if spec.Overlaps(o) {
			return true
		}
	}
	return false
}

// AddPort publishes an explicit port. An implicit port on the same host
// port is withdrawn for it first (and comes back if the explicit one
// fails or is removed). Errors are the Manager's.
func (im *Driver) AddPort(ctx context.Context, spec port.Spec) (port.Status, error) {
	if err := spec.Validate(); err != nil {
		return port.Status{}, fmt.Errorf("publish %s: %w", spec, err)
	}
	im.mu.Lock()
	var yielded []string
	for _, s := range slices.SortedFunc(maps.Keys(im.ports), compareSpecs) {
		if p := im.ports[s]; p.id != 0 && s.Overlaps(spec) {
			im.withdraw(s, p)
			yielded = append(yielded, s.String())
		}
	}
	st, err := im.m.AddPort(ctx, spec)
	im.mu.Unlock()
	if len(yielded) > 0 {
		im.log.Debug("implicit: implicit ports yield to an explicit one", "spec", spec.String(), "implicit", yielded, "err", err)
		if err != nil {
			im.poke() // put them back
		}
	}
	return st, err
}

// RemovePort removes a port. An implicit one stays withdrawn until its
// socket inside closes; removing an explicit one lets an implicit port it
// displaced come back.
func (im *Driver) RemovePort(id int) error {
	im.mu.Lock()
	for spec, p := range im.ports {
		if p.id == id {
			im.withdraw(spec, p)
			p.suppressed = true
			im.mu.Unlock()
			return nil
		}
	}
	im.mu.Unlock()
	if err := im.m.RemovePort(id); err != nil {
		return err
	}
	im.poke()
	return nil
}

// ListPorts lists every published port, explicit and implicit (those with
// Implicit set), sorted by ID.
func (im *Driver) ListPorts() []port.Status {
	im.mu.Lock()
	defer im.mu.Unlock()
	ids := im.implicitIDsLocked()
	out := im.m.ListPorts()
	for i := range out {
		_, out[i].Implicit = ids[out[i].ID]
	}
	return out
}

// Unpublished is a listener inside that the driver does not publish.
type Unpublished struct {
	Spec     port.Spec
	Listener Listener
	// Reason says why, for a person.
	Reason string
	// Retrying: the driver tries again (backing off); false for a port
	// the host was using, which is left to the host.
	Retrying bool
}

// Unpublished lists the listeners reported inside that are not published
// (sorted as specs are), but those an explicit port stands for or that
// were removed through the API.
func (im *Driver) Unpublished() []Unpublished {
	im.mu.Lock()
	defer im.mu.Unlock()
	out := []Unpublished{}
	for _, spec := range slices.SortedFunc(maps.Keys(im.want), compareSpecs) {
		p := im.ports[spec]
		if p != nil && (p.id != 0 || p.suppressed || p.yielded) {
			continue
		}
		u := Unpublished{Spec: spec, Listener: im.want[spec]}
		switch {
		case p == nil:
			continue // not tried yet
		case p.hostHeld:
			u.Reason = "the host was using this port when it began listening inside; it is left to the host (publish it explicitly to take it)"
		case p.lastErr != nil:
			u.Reason, u.Retrying = p.lastErr.Error(), true
		default:
			u.Reason, u.Retrying = fmt.Sprintf("more than %d ports listen inside", im.max), true
		}
		out = append(out, u)
	}
	return out
}

// implicitSpecs maps the listeners of a report to the specs that publish
// them (see the table at the top of this file), each with the listener
// it stands for. Entries that are not listeners (a bad protocol, port 0)
// are dropped with a debug line: the report comes from the sandbox.
func implicitSpecs(ls []Listener, log *slog.Logger) map[port.Spec]Listener {
	type key struct {
		proto string
		port  uint16
	}
	type choice struct {
		dual   *Listener
		v4, v6 netip.Addr
		l4, l6 Listener
	}
	groups := make(map[key]*choice)
	for _, l := range ls {
		a := l.Addr.Addr()
		if (l.Proto != "tcp" && l.Proto != "udp") || !a.IsValid() || l.Addr.Port() == 0 {
			log.Debug("implicit: ignoring a malformed listener in the child's report", "proto", l.Proto, "addr", l.Addr)
			continue
		}
		a = a.WithZone("")
		if a.Is4In6() {
			a = a.Unmap()
		}
		if a.IsLinkLocalUnicast() || a.IsMulticast() || a == netip.AddrFrom4([4]byte{255, 255, 255, 255}) {
			continue
		}
		k := key{l.Proto, l.Addr.Port()}
		c := groups[k]
		if c == nil {
			c = &choice{}
			groups[k] = c
		}
		switch {
		case a.Is6() && a.IsUnspecified() && !l.V6Only:
			c.dual = &l
		case a.Is4():
			if better(a, c.v4) {
				c.v4, c.l4 = a, l
			}
		default:
			if better(a, c.v6) {
				c.v6, c.l6 = a, l
			}
		}
	}
	out := make(map[port.Spec]Listener)
	for k, c := range groups {
		num := int(k.port)
		if c.dual != nil {
			// One dual-stack host socket; the inside one takes IPv4 on
			// 127.0.0.1 as it takes everything else.
			out[port.Spec{Proto: k.proto, ParentPort: num, ChildIP: netip.AddrFrom4([4]byte{127, 0, 0, 1}), ChildPort: num}] = *c.dual
			continue
		}
		if c.v4.IsValid() {
			out[familySpec(k.proto+"4", c.v4, num)] = c.l4
		}
		if c.v6.IsValid() {
			out[familySpec(k.proto+"6", c.v6, num)] = c.l6
		}
	}
	return out
}

// better reports whether a listener bound to a serves more than one bound
// to b (invalid b: nothing): all addresses, then a specific one, then
// loopback; the lower address among equals.
func better(a, b netip.Addr) bool {
	if !b.IsValid() {
		return true
	}
	if ra, rb := addrRank(a), addrRank(b); ra != rb {
		return ra > rb
	}
	return a.Less(b)
}

func addrRank(a netip.Addr) int {
	switch {
	case a.IsUnspecified():
		return 2
	case a.IsLoopback():
		return 0
	}
	return 1
}

// familySpec publishes a listener on a, of proto's family.
func familySpec(proto string, a netip.Addr, num int) port.Spec {
	all, loop := netip.IPv4Unspecified(), netip.AddrFrom4([4]byte{127, 0, 0, 1})
	if a.Is6() {
		all, loop = netip.IPv6Unspecified(), netip.IPv6Loopback()
	}
	s := port.Spec{Proto: proto, ParentPort: num, ChildPort: num}
	switch {
	case a.IsUnspecified():
		s.ParentIP, s.ChildIP = all, loop
	case a.IsLoopback():
		s.ParentIP, s.ChildIP = a, a
	default:
		s.ParentIP, s.ChildIP = all, a
	}
	return s
}

func compareSpecs(a, b port.Spec) int {
	return cmp.Or(cmp.Compare(a.ParentPort, b.ParentPort), cmp.Compare(a.Proto, b.Proto),
		a.ParentIP.Compare(b.ParentIP), a.ChildIP.Compare(b.ChildIP), cmp.Compare(a.ChildPort, b.ChildPort))
}

var discardLogger = slog.New(slog.DiscardHandler)

var _ port.Manager = (*Driver)(nil)
