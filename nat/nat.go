// Package nat forwards what the sandbox sends to the world through host
// sockets: TCP connections (dialled on the host first, so refusals stay
// refusals), UDP flows (one connected host socket per flow, expiring when
// idle) and ICMP echo (through unprivileged ping sockets). It owns the
// mapping of destinations to host addresses (the gateway address is the
// host's loopback unless that is disabled; addresses that make no sense
// from the sandbox are refused), the egress policy (Policy: --allow,
// --deny) and the source address of host sockets (--outbound-addr).
package nat

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gonetns/gonetns/internal/flowtable"
	"github.com/gonetns/gonetns/relay"
	"github.com/gonetns/gonetns/stack"
)

// Defaults of Config, as slirp4netns has them where it has them.
const (
	DefaultDialTimeout    = 10 * time.Second
	DefaultUDPIdleTimeout = 240 * time.Second
	DefaultDNSIdleTimeout = 10 * time.Second
	DefaultEchoIdle       = 30 * time.Second
	DefaultMaxUDPFlows    = flowtable.MaxFlows
	DefaultMaxTCPConns    = 16384
	DefaultMaxEchoFlows   = 1024
)

// Config of a NAT.
type Config struct {
	// Subnet is the sandbox's subnet (10.0.2.0/24): its addresses other
	// than Gateway are not forwarded. Subnet6 and Gateway6 likewise for
	// IPv6 (optional).
	Subnet, Subnet6 netip.Prefix
	// Gateway is the address that stands for the host's loopback.
	Gateway, Gateway6 netip.Addr
	// HostLoopback lets the sandbox reach the host's 127.0.0.1 (and ::1)
	// through the gateway address; false is --disable-host-loopback.
	HostLoopback bool
	// Policy is the egress policy every TCP connection, UDP flow and ICMP
	// echo is checked against before a host socket is made; nil allows
	// everything.
	Policy *Policy
	// OutboundAddr and OutboundAddr6 are the source addresses of host
	// sockets (--outbound-addr, --outbound-addr6); the zero Addr leaves
	// the choice to the kernel. A loopback address applies only to the
	// host's loopback, any other only to other destinations (see
	// outbound).
	OutboundAddr, OutboundAddr6 netip.Addr
	// OutboundEverywhere applies an outbound address that is not a
	// loopback one to the host's loopback too (slirp4netns's rule: libslirp
	// binds every socket it makes; its --outbound-addr test reads the
	// address off a connection to the gateway).
	OutboundEverywhere bool

	DialTimeout    time.Duration // TCP connect on the host; then RST
	UDPIdleTimeout time.Duration // a UDP flow with no traffic is closed
	DNSIdleTimeout time.Duration // the same, for flows to port 53
	MaxUDPFlows    int           // beyond it, the idlest flow is evicted
	MaxTCPConns    int           // dialling or relayed; beyond it, new ones are reset
	MaxEchoFlows   int

	// Loop, when set, returns the event loop to read the UDP flows'
	// sockets on (a started stack.Stack), asked at the first flow; if the
	// loop cannot take them (none runs), the NAT reads them on a
	// goroutine of its own.
	Loop func() flowtable.Loop

	// Dialer dials host TCP; the zero value is a net.Dialer.
	Dialer *net.Dialer
	// Now is the clock flows expire by; time.Now when nil.
	Now func() time.Time

	Logger *slog.Logger
}

// ErrRefused marks a destination the NAT does not map to a host address:
// the gateway with --disable-host-loopback, loopback, unspecified and
// multicast addresses, and the sandbox's own subnet. The egress policy's
// refusals (--allow, --deny) are answered on the wire instead (TCP reset,
// ICMP administratively prohibited).
var ErrRefused = errors.New("nat: destination not allowed")

// NAT holds the flows of one sandbox.
type NAT struct {
	cfg        Config
	log        *slog.Logger
	dialer     *net.Dialer
	loopDialer *net.Dialer // dialer without TCP keepalive, for the host's loopback

	ctx    context.Context
	cancel context.CancelFunc

	mu     sync.Mutex
	closed bool
	tcp    map[*relay.Relay]struct{}
	wg     sync.WaitGroup

	tcpActive atomic.Int64  // connections being dialled or relayed
	tcpPeak   atomic.Int64  // the most at once
	tcpReset  atomic.Uint64 // new connections reset at the cap
	tcpWork   chan *stack.TCPRequest
	idleTCP   atomic.Int32 // goroutines waiting on tcpWork
	tcpFull   atomic.Int64 // unix time of the last "too many" warning
	// tcpDone is the Done of every DialTCP's socket, made once (a
	// closure and sync.OnceFunc's two objects per connection, before).
	tcpDone func()

	udp  *flowtable.Table[udpKey, *udpFlow]
	echo *flowtable.Table[echoKey, *echoFlow]
	// expiryWake starts the expiry of udp and echo when a flow comes to
	// an empty table (flowtable.ExpireEvery).
	expiryWake chan struct{}

	out      *outbound
	refusals refusalLog

	udpPollOnce sync.Once
	udpPoll     *flowtable.Poller // reads every UDP flow's answers; started by the first flow
	udpPollErr  error

	pingOnce    sync.Once
	blockedSeen map[echoKey]struct{} // under mu: sessions already logged as not forwarded
	pingBlocked atomic.Bool          // ping sockets are not allowed for this user
	pingRange   string               // net.ipv4.ping_group_range at start
}

// New makes a NAT. It starts nothing; Start starts the expiry of idle
// flows.
func New(cfg Config) (*NAT, error) {
	if !cfg.Subnet.IsValid() || !cfg.Gateway.IsValid() || !cfg.Subnet.Contains(cfg.Gateway) {
		return nil, fmt.Errorf("nat: gateway %v must be inside subnet %v", cfg.Gateway, cfg.Subnet)
	}
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = DefaultDialTimeout
	}
	if cfg.UDPIdleTimeout <= 0 {
		cfg.UDPIdleTimeout = DefaultUDPIdleTimeout
	}
	if cfg.DNSIdleTimeout <= 0 {
		cfg.DNSIdleTimeout = DefaultDNSIdleTimeout
	}
	if cfg.MaxTCPConns <= 0 {
		cfg.MaxTCPConns = DefaultMaxTCPConns
	}
	if cfg.MaxUDPFlows <= 0 {
		cfg.MaxUDPFlows = DefaultMaxUDPFlows
	}
	if cfg.MaxEchoFlows <= 0 {
		cfg.MaxEchoFlows = DefaultMaxEchoFlows
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	n := &NAT{cfg: cfg, log: cfg.Logger, dialer: cfg.Dialer, tcp: make(map[*relay.Relay]struct{}), tcpWork: make(chan *stack.TCPRequest), pingRange: pingRange()}
	if n.log == nil {
		n.log = slog.New(slog.DiscardHandler)
	}
	n.tcpDone = n.doneTCP
	if n.dialer == nil {
		n.dialer = &net.Dialer{}
	}
	// The host's own kernel reports a loopback peer's death at once:
	// keepalive probes (four setsockopt calls per connection) buy nothing.
	ld := *n.dialer
	ld.KeepAlive = -1
	ld.KeepAliveConfig = net.KeepAliveConfig{Enable: false}
	n.loopDialer = &ld
	n.out = newOutbound(cfg.OutboundAddr, cfg.OutboundAddr6, cfg.OutboundEverywhere, n.dialer, n.loopDialer)
	n.ctx, n.cancel = context.WithCancel(context.Background())
	n.expiryWake = make(chan struct{}, 1)
	n.udp = flowtable.New[udpKey, *udpFlow](flowtable.Config[udpKey]{Max: cfg.MaxUDPFlows, Wake: n.expiryWake, Idle: func(k udpKey) time.Duration {
		if k.kind&udpToDNS != 0 {
			return cfg.DNSIdleTimeout
		}
		return cfg.UDPIdleTimeout
	}})
	n.echo = flowtable.New[echoKey, *echoFlow](flowtable.Config[echoKey]{Max: cfg.MaxEchoFlows, Wake: n.expiryWake, Idle: func(echoKey) time.Duration { return DefaultEchoIdle }})
	return n, nil
}

// Start starts the goroutine that expires idle flows.
func (n *NAT) Start() {
	n.wg.Go(func() {
		flowtable.ExpireEvery(n.ctx, time.Second, n.cfg.Now, func(c int) { n.log.Debug("expired idle flows", "count", c) }, n.expiryWake, n.udp, n.echo)
	})
}

// Close ends every flow and connection and waits for their goroutines.
// Idempotent; every call waits. A handshake with the sandbox still in
// progress holds Close until it completes or fails: close the stack first.
func (n *NAT) Close() error {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		n.wg.Wait()
		return nil
	}
	n.closed = true
	relays := make([]*relay.Relay, 0, len(n.tcp))
	for r := range n.tcp {
		relays = append(relays, r)
	}
	n.mu.Unlock()
	n.cancel()
	for _, r := range relays {
		r.Abort()
	}
	n.udp.CloseAll()
	n.echo.CloseAll()
	// No poller starts after this; one that started is stopped.
	n.udpPollOnce.Do(func() { n.udpPollErr = net.ErrClosed })
	if n.udpPoll != nil {
		n.udpPoll.Close()
	}
	n.wg.Wait()
	return nil
}

// begin registers a goroutine unless the NAT is closed.
func (n *NAT) begin() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return false
	}
	n.wg.Add(1)
	return true
}

// hostAddr maps a destination the sandbox asked for to the address to use
// on the host, or returns ErrRefused.
func (n *NAT) hostAddr(dst netip.Addr) (netip.Addr, error) {
	dst = dst.Unmap()
	switch {
	case dst == n.cfg.Gateway || (n.cfg.Gateway6.IsValid() && dst == n.cfg.Gateway6):
		if !n.cfg.HostLoopback {
			return netip.Addr{}, fmt.Errorf("%w: %v is the host's loopback, disabled by --disable-host-loopback", ErrRefused, dst)
		}
		if dst.Is4() {
			return netip.AddrFrom4([4]byte{127, 0, 0, 1}), nil
		}
		return netip.IPv6Loopback(), nil
	case dst.IsLoopback(), dst.IsUnspecified(), dst.IsMulticast(), dst == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return netip.Addr{}, fmt.Errorf("%w: %v cannot be reached from the sandbox", ErrRefused, dst)
	case n.cfg.Subnet.Contains(dst) || (n.cfg.Subnet6.IsValid() && n.cfg.Subnet6.Contains(dst)):
		return netip.Addr{}, fmt.Errorf("%w: no host %v on the sandbox's subnet", ErrRefused, dst)
	}
	return dst, nil
}
