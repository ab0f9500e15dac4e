package portfwd

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/gonetns/gonetns/internal/flowtable"
	"github.com/gonetns/gonetns/port"
	"github.com/gonetns/gonetns/relay"
)

// Defaults for the zero fields of Config. gonetns sets the limits from
// its descriptor budget (internal/fdbudget) instead.
const (
	DefaultUDPIdleTimeout = 60 * time.Second
	// DefaultTCPIdleTimeout is pasta's activity timeout for the TCP
	// connections it carries (2 h, its tcp.c's ACT_TIMEOUT), as long as
	// Linux waits before its first keep-alive probe (tcp_keepalive_time):
	// far longer than HTTP keep-alives (seconds to minutes), short enough
	// that connections nobody uses give their descriptors back within
	// hours, not the days of conntrack's 432000 s (docs/limits.md).
	DefaultTCPIdleTimeout  = 2 * time.Hour
	DefaultDialTimeout     = 10 * time.Second
	DefaultMaxTCPConns     = 4096
	DefaultMaxUDPFlows     = 1024
	DefaultSplicePipes     = 32
	DefaultSpliceIdlePipes = 8
)

// Config configures a Manager.
type Config struct {
	// Dialer reaches the namespace: a *Dialer in gonetns, anything that
	// returns *net.TCPConn and *net.UDPConn in tests. Required.
	Dialer ChildDialer
	// Logger gets per-connection events at Debug and trouble at Warn. Nil
	// discards.
	Logger *slog.Logger
	// UDPIdleTimeout ends a UDP flow (one client address) that has carried
	// no datagram either way for this long. Zero means 60 s.
	UDPIdleTimeout time.Duration
	// TCPIdleTimeout resets a relayed TCP connection that has moved no
	// byte either way for this long (checked every eighth of it, at least
	// once a minute: see tcpconns.go). Zero means DefaultTCPIdleTimeout;
	// negative, never.
	TCPIdleTimeout time.Duration
	// DialTimeout bounds getting a connected socket from the child for one
	// TCP connection or UDP flow. Zero means 10 s.
	DialTimeout time.Duration
	// MaxTCPConns bounds the relayed TCP connections of all published
	// ports together (dialing or established; two descriptors each),
	// shared among clients (tcpconns.go): a connection accepted beyond it
	// takes the place of a connection of the client holding the most, if
	// its own client holds at least two fewer; else it is reset at once.
	// Either way a warning is logged. Zero means 4096.
	MaxTCPConns int
	// MaxUDPFlows bounds the UDP flows (client addresses) of all published
	// ports together; each holds a socket in the namespace (read by one
	// poller for all flows). A new flow beyond it closes the idlest flow
	// of the client holding the most, and a warning is logged. Zero means
	// 1024.
	MaxUDPFlows int
	// SplicePipes bounds the pipes TCP relays splice through, in use or
	// idle (two descriptors each); SpliceIdlePipes the idle ones kept for
	// reuse. A relay holds one only while data moves, and copies through
	// a buffer when none is left. Zero means 32 and 8; a negative
	// SpliceIdlePipes keeps none idle.
	SplicePipes, SpliceIdlePipes int
	// SourceIPTransparent passes each client's address to the Dialer, so
	// that connections and UDP flows arrive inside from the client's own
	// address and port (RootlessKit's --source-ip-transparent; see the
	// child's side in transparent.go). False: they come from an address of
	// the namespace, as with RootlessKit before v3.
	SourceIPTransparent bool
}

// Manager publishes ports: it listens on the host and relays each
// connection or UDP flow to a socket the ChildDialer connects inside the
// namespace. Its methods are safe for concurrent use.
type Manager struct {
	cfg Config
	log *slog.Logger
	// unprivPortStart is net.ipv4.ip_unprivileged_port_start at start,
	// for the hint of a refused listen; -1 if unknown.
	unprivPortStart int
	ctx             context.Context // ends at Close: aborts dials in flight
	cancel          context.CancelFunc
	wg              sync.WaitGroup // every goroutine of every port and relay

	tcp       *tcpTable                          // the TCP relays of all ports (they outlive their ports)
	sweepOnce sync.Once                          // starts the idle sweep with the first TCP port
	udp       *flowtable.Table[udpKey, *udpFlow] // the UDP flows of all ports
	udpOnce   sync.Once                          // starts udpPoll and the flows' expiry
	udpPoll   *flowtable.Poller                  // reads every UDP flow's replies
	udpErr    error
	udpWake   chan struct{}   // starts the flows' expiry when one comes to an empty table
	pipes     *relay.PipePool // for the TCP relays' splices

	mu     sync.Mutex
	closed bool
	nextID int
	ports  map[int]publishedPort

	closeErr error
	once     sync.Once
}

var _ port.Manager = (*Manager)(nil)

// publishedPort is a listener with its loop: tcpPort or udpPort.
type publishedPort interface {
	status() port.Status
	// stop closes the listener and waits for its loop. TCP relays go on;
	// UDP flows end (their replies need the listener).
	stop() error
}

// NewManager returns a Manager that publishes nothing yet. It starts no
// goroutine; Close it when done.
func NewManager(cfg Config) *Manager {
	if cfg.Logger == nil {
		cfg.Logger = discardLogger
	}
	if cfg.UDPIdleTimeout <= 0 {
		cfg.UDPIdleTimeout = DefaultUDPIdleTimeout
	}
	if cfg.TCPIdleTimeout == 0 {
		cfg.TCPIdleTimeout = DefaultTCPIdleTimeout
	}
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = DefaultDialTimeout
	}
	if cfg.MaxTCPConns <= 0 {
		cfg.MaxTCPConns = DefaultMaxTCPConns
	}
	if cfg.MaxUDPFlows <= 0 {
		cfg.MaxUDPFlows = DefaultMaxUDPFlows
	}
	if cfg.SplicePipes <= 0 {
		cfg.SplicePipes = DefaultSplicePipes
	}
	switch {
	case cfg.SpliceIdlePipes == 0:
		cfg.SpliceIdlePipes = DefaultSpliceIdlePipes
	case cfg.SpliceIdlePipes < 0:
		cfg.SpliceIdlePipes = 0
	}
	ctx, cancel := context.WithCancel(context.Background())
	udpWake := make(chan struct{}, 1)
	return &Manager{
		cfg:    cfg,
		log:    cfg.Logger,
		ctx:    ctx,
		cancel: cancel,
		tcp:    newTCPTable(cfg.MaxTCPConns, max(cfg.TCPIdleTimeout, 0)),
		udp: flowtable.New[udpKey, *udpFlow](flowtable.Config[udpKey]{
			Max:   cfg.MaxUDPFlows,
			Idle:  func(udpKey) time.Duration { return cfg.UDPIdleTimeout },
			Group: clientOf,
			Wake:  udpWake,
		}),
		udpWake: udpWake,
		pipes:   relay.NewPipePool(cfg.SplicePipes, cfg.SpliceIdlePipes),
		nextID:  1,
		ports:   make(map[int]publishedPort),

		unprivPortStart: unprivilegedPortStart(),
	}
}

// AddPort validates spec, listens on the host and starts relaying. The
// errors wrap ErrInvalidSpec for a bad spec, ErrConflict when the spec
// overlaps a port published already (tcp on all addresses and tcp4 on
// 127.0.0.1 with the same port overlap), or the listen error with its errno
// (syscall.EADDRINUSE when another program uses the host port). Other
// published ports are unaffected by a failure. ctx bounds the listen only.
func (m *Manager) AddPort(ctx context.Context, spec port.Spec) (port.Status, error) {
	if err := spec.Validate(); err != nil {
		return port.Status{}, fmt.Errorf("publish %s: %w", spec, err)
	}
	if m.cfg.Dialer == nil {
		return port.Status{}, fmt.Errorf("publish %s: portfwd.Config.Dialer is nil", spec)
	}
	// Held across the listen so that two AddPorts of overlapping specs
	// cannot both pass the conflict check; a listen is quick.
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return port.Status{}, fmt.Errorf("publish %s: port manager is closed: %w", spec, net.ErrClosed)
	}
	for _, id := range slices.Sorted(maps.Keys(m.ports)) {
		if other := m.ports[id].status().Spec; other.Overlaps(spec) {
			return port.Status{}, fmt.Errorf("publish %s: it overlaps port ID %d (%s), published already; remove that one first or choose another parent port: %w",
				spec, id, other, port.ErrConflict)
		}
	}
	id := m.nextID
	var p publishedPort
	var err error
	switch spec.Transport() {
	case "tcp":
		p, err = m.listenTCP(ctx, id, spec)
	default:
		p, err = m.listenUDP(ctx, id, spec)
	}
	if err != nil {
		return port.Status{}, listenError(spec, err, m.unprivPortStart)
	}
	m.nextID++
	m.ports[id] = p
	m.log.Debug("portfwd: published", "id", id, "spec", spec.String())
	return p.status(), nil
}

// listenError explains a failed listen and what to do about it;
// unprivStart is net.ipv4.ip_unprivileged_port_start (-1: unknown).
func listenError(spec port.Spec, err error, unprivStart int) error {
	addr := hostPort(spec.ListenAddr())
	switch {
	case errors.Is(err, syscall.EADDRINUSE):
		return fmt.Errorf("publish %s: host address %s is already in use: a program listens there, or a connection holds it as its local port (ss -tanp shows which); stop it or choose another parent port, outside net.ipv4.ip_local_port_range: %w", spec, addr, err)
	case errors.Is(err, syscall.EADDRNOTAVAIL):
		return fmt.Errorf("publish %s: host address %s is not an address of this host; choose one that is, or leave PARENTIP out: %w", spec, addr, err)
	case errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EPERM):
		return fmt.Errorf("publish %s: %s: %w", spec, privilegedPortHint(spec.ParentPort, unprivStart), err)
	}
	return fmt.Errorf("publish %s: listen on %s: %w", spec, addr, err)
}

// unprivilegedPortStart reads net.ipv4.ip_unprivileged_port_start, or
// returns -1. Read when the Manager is made: later the network process
// may be confined to its state directory (package confine).
func unprivilegedPortStart() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_unprivileged_port_start")
	if err != nil {
		return -1
	}
	start, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return -1
	}
	return start
}

// privilegedPortHint says how to allow an unprivileged process to bind a
// low port.
func privilegedPortHint(port, start int) string {
	if start < 0 || port >= start {
		return "permission denied"
	}
	return fmt.Sprintf("port %d is privileged (net.ipv4.ip_unprivileged_port_start is %d); choose a port >= %d, or run sysctl -w net.ipv4.ip_unprivileged_port_start=%d as root", port, start, start, port)
}

// hostPort formats a listen address; the zero address is ":PORT" (all
// addresses, both families).
func hostPort(ap netip.AddrPort) string {
	if !ap.Addr().IsValid() {
		return ":" + strconv.Itoa(int(ap.Port()))
	}
	return ap.String()
}

// ListPorts returns the published ports, sorted by ID (never nil).
func (m *Manager) ListPorts() []port.Status {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]port.Status, 0, len(m.ports))
	for _, p := range m.ports {
		out = append(out, p.status())
	}
	slices.SortFunc(out, func(a, b port.Status) int { return cmp.Compare(a.ID, b.ID) })
	return out
}

// RemovePort stops publishing port id: its listener is closed before
// RemovePort returns, so new connections are refused. TCP connections
// being relayed go on until they end (or Close); UDP flows end with the
// port. An unknown id is an error wrapping ErrUnknownPort.
func (m *Manager) RemovePort(id int) error {
	m.mu.Lock()
	p, ok := m.ports[id]
	delete(m.ports, id)
	m.mu.Unlock()
	if !ok {
		return fmt.Errorf("no published port has ID %d (list-ports lists them): %w", id, port.ErrUnknownPort)
	}
	err := p.stop()
	m.log.Debug("portfwd: unpublished", "id", id, "spec", p.status().Spec.String())
	if err != nil {
		return fmt.Errorf("remove port %d: %w", id, err)
	}
	return nil
}

// Sending reports whether one of the published ports' TCP connections
// still moves bytes (within settleQuiet) or holds bytes its client has not
// yet taken, for a caller that waits before Close resets them as the
// sandbox stops: a server inside that sent its answer, closed and exited
// leaves the rest to its kernel and the relay, and Close's resets dropped
// it (1 MiB to a client reading 1 s later: 128,000 bytes, then
// ECONNRESET).
func (m *Manager) Sending() bool { return m.tcp.busy(m.tcp.now(), settleQuiet) }

// settleQuiet is how long a relayed connection may move nothing before
// Sending stops counting it: as for the sandbox's own connections
// (stack/internal/tcpfast, settleIdle).
const settleQuiet = 250 * time.Millisecond

// Close stops every port, resets every relayed connection, aborts dials
// in flight and waits for all goroutines. It may be called more than once;
// later calls wait too and return the first result.
func (m *Manager) Close() error {
	m.once.Do(func() {
		m.mu.Lock()
		m.closed = true
		ports := m.ports
		m.ports = make(map[int]publishedPort)
		m.mu.Unlock()

		m.cancel()
		var errs []error
		for _, p := range ports {
			if err := p.stop(); err != nil {
				errs = append(errs, err)
			}
		}
		for _, r := range m.tcp.close() {
			r.abort()
		}
		// No UDP poller starts after this; one that started stops.
		m.udp.CloseAll()
		m.udpOnce.Do(func() { m.udpErr = net.ErrClosed })
		if m.udpPoll != nil {
			m.udpPoll.Close()
		}
		m.closeErr = errors.Join(errs...)
	})
	m.wg.Wait()
	m.pipes.Close() // idempotent; the relays have given theirs back
	return m.closeErr
}

// sweepIdle resets, every sweepInterval until Close, the TCP connections
// idle for TCPIdleTimeout. It starts with the first TCP port.
func (m *Manager) sweepIdle() {
	if m.tcp.idle <= 0 {
		return
	}
	m.sweepOnce.Do(func() {
		m.wg.Go(func() {
			tick := time.NewTicker(sweepInterval(m.tcp.idle))
			defer tick.Stop()
			for {
				select {
				case <-m.ctx.Done():
					return
				case <-tick.C:
				}
				m.resetIdle()
			}
		})
	})
}

// resetIdle resets the TCP connections idle for TCPIdleTimeout.
func (m *Manager) resetIdle() {
	for _, r := range m.tcp.sweep() {
		r.abort()
		m.log.Debug("portfwd: tcp connection idle, reset", "client", r.outer.RemoteAddr().String(), "idle_timeout", m.tcp.idle)
	}
}

// TCPStats reports what the published ports' TCP connections are and
// what their limits have done since NewManager.
func (m *Manager) TCPStats() TCPStats { return m.tcp.statsNow() }
