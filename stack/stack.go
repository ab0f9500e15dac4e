// Package stack is gonetns's userspace TCP/IP stack: the only importer of
// gVisor. It runs a gVisor netstack on the sandbox's TAP device (a
// tap.Device), answers ARP and ICMP echo for the addresses it owns (the
// gateway and the DNS server), intercepts every other TCP connection, UDP
// flow and ICMP echo the sandbox sends — whatever its destination — and
// hands them to the handlers of Config as small Go types. It also offers
// listeners on its own addresses for services such as DNS.
package stack

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"

	"github.com/gonetns/gonetns/internal/flowtable"
	"github.com/gonetns/gonetns/stack/internal/link"
	"github.com/gonetns/gonetns/stack/internal/tcpfast"
	"github.com/gonetns/gonetns/tap"
)

const nicID tcpip.NICID = 1

// DefaultMAC is the Ethernet address of the stack's end of the link (the
// one slirp uses for its gateway).
var DefaultMAC = net.HardwareAddr{0x52, 0x55, 0x0a, 0x00, 0x02, 0x02}

// Config describes the stack. Device, MTU and Addresses are required.
type Config struct {
	Device tap.Device
	// MTU of the link; the sandbox's interface must use the same.
	MTU uint32
	// MAC is the stack's Ethernet address; DefaultMAC when nil.
	MAC net.HardwareAddr
	// Addresses the stack owns and answers ARP/NDP and ICMP echo for, with
	// the prefix of their subnet: e.g. the gateway 10.0.2.2/24 and the DNS
	// server 10.0.2.3/24. IPv6 is enabled when one of them is IPv6.
	Addresses []netip.Prefix

	// TCP is called, on a goroutine of its own, for every connection the
	// sandbox opens to an address with no listener of this stack. It must
	// call Accept or Refuse on the request.
	TCP func(*TCPRequest)
	// DialTCP, when set, turns the TCP fast path on: each connection the
	// sandbox opens to an address with no listener of this stack becomes
	// the mirror of a host socket DialTCP makes (package tcpfast), with
	// no TCP implementation in between; TCP then sees only the odd SYN
	// the fast path does not take (IP options, fragments). DialTCP runs
	// on the reader goroutine, one SYN at a time: it must not block. An
	// error refuses the connection (the sandbox gets a reset).
	DialTCP func(src, dst netip.AddrPort) (HostTCP, error)
	// MaxHalfOpenTCP bounds the fast path's connections whose handshake
	// is not complete; a SYN beyond it evicts the oldest, or is dropped
	// (its sender tries again) while the oldest's ACK may still be
	// waiting in the link. Default 4096.
	MaxHalfOpenTCP int
	// NoPeekOffset makes the fast path read the host sockets as it must
	// on kernels without SO_PEEK_OFF for TCP (tests).
	NoPeekOffset bool
	// OnIdle, when set, is called on a goroutine of its own once no frame
	// has come from the sandbox for between IdleAfter and twice that, and
	// then not again until frames have come and stopped again (the
	// network process gives its memory back then).
	OnIdle    func()
	IdleAfter time.Duration // default defaultIdleAfter
	// EventLoop, with the fast path on and a device that offers it
	// (tap.Pollable: the TAP itself, not a recorder or a packet link),
	// reads the device on the fast path's own thread, in one epoll set
	// with the host sockets (tcpfast.LinkReader) instead of on a reader
	// goroutine. While traffic flows that thread sleeps in epoll_wait
	// holding a P (it goes to Go's poller once quiet): the process needs
	// GOMAXPROCS one above what its other work needs.
	EventLoop bool
	// BusyPoll, with the event loop, is the longest its thread polls for
	// the next event before it sleeps, adapting below it (sandbox.Config's
	// BusyPoll); 0: it sleeps at once.
	BusyPoll time.Duration
	// MaxInFlightTCP bounds the handshakes waiting for TCP to decide
	// (SYNs beyond it are dropped and retransmitted by the sandbox).
	// Default 4096.
	MaxInFlightTCP int
	// UDP is called for every datagram the sandbox sends to an address
	// and port with no endpoint of this stack, on the packet path (the
	// reader goroutine, one datagram at a time): it must not block.
	// Returning false answers the datagram with ICMP port unreachable;
	// UDPPacket.Prohibit (then return true) with "administratively
	// prohibited". Answers go back through the packet's ReturnPath.
	UDP func(*UDPPacket) bool
	// Echo is called for every ICMP echo request the sandbox sends, on the
	// packet path. Returning true means the handler answers (or not);
	// false lets the stack answer for its own addresses and stay silent
	// for others.
	Echo func(*EchoRequest) bool

	// TCPBufferMax is the largest receive and send buffer of a TCP
	// connection (auto-tuned up to it); default 8 MB.
	TCPBufferMax int

	Logger *slog.Logger
}

// Stack is a running netstack. Create it with New, start it with Start,
// stop it with Close.
type Stack struct {
	cfg   Config
	log   *slog.Logger
	mac   tcpip.LinkAddress
	ipv6  bool
	s     *stack.Stack
	link  *link.Endpoint
	mu    sync.Mutex
	state int // 0 new, 1 started, 2 closed

	fast *tcpfast.Engine // the TCP fast path; nil when off
	// idleFast is fast for the idle hook, which the link can call from
	// its own goroutine before Start has made fast.
	idleFast atomic.Pointer[tcpfast.Engine]
	loop     bool // the fast path's poller reads the link (Config.EventLoop)

	listenMu  sync.Mutex
	udpListen atomic.Pointer[map[netip.AddrPort]struct{}] // ListenUDP's addresses (fastUDP)
	tcpListen atomic.Pointer[map[netip.AddrPort]struct{}] // ListenTCP's addresses (the fast path)
}

// DefaultMaxHalfOpenTCP is Config.MaxHalfOpenTCP's default.
const DefaultMaxHalfOpenTCP = tcpfast.DefaultMaxHalfOpen

// HostTCP is the host socket of one of the sandbox's TCP connections, made
// by Config.DialTCP.
type HostTCP struct {
	// FD is a non-blocking TCP socket whose connect to the destination
	// is under way or done; the stack owns it from here on.
	FD int
	// ConnectTimeout is how long the connect may take before the
	// sandbox gets a reset.
	ConnectTimeout time.Duration
	// Done, when not nil, is called once when the connection is over.
	Done func()
}

// New validates the configuration. It starts nothing.
func New(cfg Config) (*Stack, error) {
	if cfg.Device == nil {
		return nil, errors.New("stack: no device")
	}
	if cfg.MTU < 576 || cfg.MTU > 65535 {
		return nil, fmt.Errorf("stack: MTU %d out of range", cfg.MTU)
	}
	if len(cfg.Addresses) == 0 {
		return nil, errors.New("stack: no addresses")
	}
	st := &Stack{cfg: cfg, log: cfg.Logger}
	for _, p := range cfg.Addresses {
		if !p.IsValid() || p.Addr().Zone() != "" {
			return nil, fmt.Errorf("stack: bad address %v", p)
		}
		if p.Addr().Is6() {
			st.ipv6 = true
		}
	}
	if st.log == nil {
		st.log = slog.New(slog.DiscardHandler)
	}
	if st.cfg.MaxInFlightTCP <= 0 {
		st.cfg.MaxInFlightTCP = 4096
	}
	if st.cfg.TCPBufferMax <= 0 {
		st.cfg.TCPBufferMax = 8 << 20
	}
	mac := cfg.MAC
	if mac == nil {
		mac = DefaultMAC
	}
	if len(mac) != 6 {
		return nil, fmt.Errorf("stack: bad MAC %v", mac)
	}
	st.mac = tcpip.LinkAddress(mac)
	return st, nil
}

// Start builds the gVisor stack and starts reading the device.
func (st *Stack) Start() error {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.state != 0 {
		return errors.New("stack: already started")
	}
	routeGVisorLog(st.log)
	netProtos := []stack.NetworkProtocolFactory{ipv4.NewProtocol, arp.NewProtocol}
	transProtos := []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol, icmp.NewProtocol4}
	if st.ipv6 {
		// NDP answers for our addresses at once: no duplicate address
		// detection (nothing else is on this link) and no router
		// solicitations (we are the router).
		netProtos = append(netProtos, ipv6.NewProtocolWithOptions(ipv6.Options{AutoGenLinkLocal: true}))
		transProtos = append(transProtos, icmp.NewProtocol6)
	}
	s := stack.New(stack.Options{
		NetworkProtocols:   netProtos,
		TransportProtocols: transProtos,
		HandleLocal:        false,
	})
	// On failure, undo what is done; the device stays open (Close closes
	// it), except once attached, when closing it is what stops the reader.
	// The reader must be gone before s.Wait, which holds the stack's lock
	// while it waits for the link (see Close).
	fail := func(attached bool, err error) error {
		if attached {
			st.cfg.Device.Close()
			if st.loop {
				st.link.ReaderDone()
			}
			st.link.Wait()
		}
		s.Close()
		s.Wait()
		return err
	}
	if err := st.tune(s); err != nil {
		return fail(false, err)
	}
	st.link = link.New(st.cfg.Device, st.cfg.MTU, st.mac, func(err error) {
		st.log.Error("the sandbox's network device failed; its network is down", "err", err)
	})
	if onIdle := st.idleWork(); onIdle != nil {
		after := st.cfg.IdleAfter
		if after <= 0 {
			after = defaultIdleAfter
		}
		st.link.SetIdle(after, onIdle)
	}
	var linkReader *tcpfast.LinkReader
	if st.cfg.EventLoop && st.cfg.DialTCP != nil && st.link.SetExternalReader() {
		linkReader = &tcpfast.LinkReader{FD: st.cfg.Device.(tap.Pollable).FD(), Pump: st.link.Pump, Done: st.link.ReaderDone, BusyPoll: st.cfg.BusyPoll}
		st.loop = true
	}
	if err := s.CreateNICWithOptions(nicID, st.link, stack.NICOptions{Name: "tap"}); err != nil {
		return fail(false, fmt.Errorf("stack: create NIC: %w", Err(err)))
	}
	// Intercept traffic to every address, and answer from every address.
	s.SetPromiscuousMode(nicID, true)
	s.SetSpoofing(nicID, true)
	for _, p := range st.cfg.Addresses {
		proto := ipv4.ProtocolNumber
		if p.Addr().Is6() {
			proto = ipv6.ProtocolNumber
		}
		pa := tcpip.ProtocolAddress{
			Protocol:          proto,
			AddressWithPrefix: tcpip.AddressWithPrefix{Address: tcpip.AddrFromSlice(p.Addr().AsSlice()), PrefixLen: p.Bits()},
		}
		if err := s.AddProtocolAddress(nicID, pa, stack.AddressProperties{}); err != nil {
			return fail(true, fmt.Errorf("stack: add address %v: %w", p, Err(err)))
		}
	}
	routes := []tcpip.Route{{Destination: header.IPv4EmptySubnet, NIC: nicID}}
	if st.ipv6 {
		routes = append(routes, tcpip.Route{Destination: header.IPv6EmptySubnet, NIC: nicID})
	}
	s.SetRouteTable(routes)

	if st.cfg.DialTCP != nil {
		fast, err := tcpfast.New(tcpfast.Config{
			Device: st.cfg.Device,
			MTU:    st.cfg.MTU,
			MAC:    st.mac,
			Dial: func(src, dst netip.AddrPort) (tcpfast.Host, error) {
				h, err := st.cfg.DialTCP(src, dst)
				return tcpfast.Host(h), err
			},
			Local:        st.listensTCP,
			MaxHalfOpen:  st.cfg.MaxHalfOpenTCP,
			NoPeekOffset: st.cfg.NoPeekOffset,
			Link:         linkReader,
			Logger:       st.log,
		})
		if err == nil {
			err = fast.Start()
		}
		if err != nil {
			return fail(true, fmt.Errorf("stack: TCP fast path: %w", err))
		}
		st.fast = fast
		st.idleFast.Store(fast)
		if st.loop {
			st.log.Debug("the TCP fast path's thread reads the TAP (event loop)", "busy-poll", st.cfg.BusyPoll)
		}
	}
	if st.cfg.TCP != nil {
		fwd := tcp.NewForwarder(s, 0, st.cfg.MaxInFlightTCP, func(r *tcp.ForwarderRequest) {
			st.cfg.TCP(newTCPRequest(st, r))
		})
		s.SetTransportProtocolHandler(tcp.ProtocolNumber, func(id stack.TransportEndpointID, pkt *stack.PacketBuffer) bool {
			if st.fast != nil && st.fast.Owns(toAddrPort(id.RemoteAddress, id.RemotePort), toAddrPort(id.LocalAddress, id.LocalPort)) {
				// A segment of a fast-path connection the fast path
				// could not parse (IP options, a fragment): dropped,
				// as a lossy link would; the sandbox sends it again.
				return true
			}
			return fwd.HandlePacket(id, pkt)
		})
	}
	if st.cfg.UDP != nil {
		s.SetTransportProtocolHandler(udp.ProtocolNumber, func(id stack.TransportEndpointID, pkt *stack.PacketBuffer) bool {
			return st.handleUDP(s, id, pkt)
		})
	}
	if st.fast != nil || st.cfg.UDP != nil {
		st.link.SetFastPath(func(vnetHdr, head, tail []byte) bool {
			if st.fast != nil && st.fast.Handle(vnetHdr, head, tail) {
				return true
			}
			return st.cfg.UDP != nil && tail == nil && st.fastUDP(s, vnetHdr, head)
		})
	}
	if st.cfg.Echo != nil {
		s.SetTransportProtocolHandler(icmp.ProtocolNumber4, func(_ stack.TransportEndpointID, pkt *stack.PacketBuffer) bool {
			return st.handleICMPv4(s, pkt)
		})
		if st.ipv6 {
			s.SetTransportProtocolHandler(icmp.ProtocolNumber6, func(_ stack.TransportEndpointID, pkt *stack.PacketBuffer) bool {
				return st.handleICMPv6(s, pkt)
			})
		}
	}
	st.s = s
	st.state = 1
	return nil
}

// defaultIdleAfter is Config.IdleAfter's default.
const defaultIdleAfter = time.Second

// idleWork is what runs once the sandbox's network is quiet (nil: nothing):
// the fast path gives back what its traffic left (tcpfast.Engine.
// ReleaseMemory), then Config.OnIdle.
func (st *Stack) idleWork() func() {
	onIdle := st.cfg.OnIdle
	if st.cfg.DialTCP == nil {
		return onIdle
	}
	return func() {
		if fast := st.idleFast.Load(); fast != nil {
			fast.ReleaseMemory()
		}
		if onIdle != nil {
			onIdle()
		}
	}
}

// tune sets the TCP options gonetns runs with (docs/design.md, "The data path").
func (st *Stack) tune(s *stack.Stack) error {
	sack := tcpip.TCPSACKEnabled(true)
	moderate := tcpip.TCPModerateReceiveBufferOption(true)
	rcv := tcpip.TCPReceiveBufferSizeRangeOption{Min: tcp.MinBufferSize, Default: 1 << 20, Max: st.cfg.TCPBufferMax}
	snd := tcpip.TCPSendBufferSizeRangeOption{Min: tcp.MinBufferSize, Default: 1 << 20, Max: st.cfg.TCPBufferMax}
	// Connections to the sandbox end in TIME_WAIT on this side when the
	// host closed first. gVisor takes a new SYN on a connection in
	// TIME_WAIT only for a listener, never for the forwarder, so the
	// sandbox's next connection from the same port (its kernel reuses
	// ports, a client may pin one) waits until TIME_WAIT ends: with 10 s,
	// a client closing after a server that closes first stalled 4 s per
	// connection once about 3,000 had gone, and one pinned to a source
	// port made 2 connections in 5 s. 1 s still outlasts the sandbox's
	// resend of a lost last ACK (its retransmission timeout starts at
	// 200 ms on the same machine).
	tw := tcpip.TCPTimeWaitTimeoutOption(time.Second)
	for _, o := range []tcpip.SettableTransportProtocolOption{&sack, &moderate, &rcv, &snd, &tw} {
		if err := s.SetTransportProtocolOption(tcp.ProtocolNumber, o); err != nil {
			return fmt.Errorf("stack: TCP option %T: %w", o, Err(err))
		}
	}
	return nil
}

// Sending reports whether the sandbox's kernel may still be sending what
// its TCP connections on the fast path have for the host (a program that
// closed a socket with bytes still queued, and exited), for a caller that
// waits before Close ends them as a local program's are
// (tcpfast.Engine.Sending). Without the fast path, false: gVisor's
// connections are reset at Close.
func (st *Stack) Sending() bool {
	st.mu.Lock()
	fast := st.fast
	running := st.state == 1
	st.mu.Unlock()
	return fast != nil && running && fast.Sending()
}

// Close stops the stack: every connection is closed, the device is closed,
// and Close waits for the stack's goroutines. Idempotent.
func (st *Stack) Close() error {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.state == 2 {
		return nil
	}
	started := st.state == 1
	st.state = 2
	if !started {
		return st.cfg.Device.Close()
	}
	// Closing the device stops the link's reader; it must be gone before
	// s.Wait, which holds the stack's lock while it waits for the link, and
	// a reader delivering a late frame needs that lock. With the event
	// loop, the fast path's poller is the reader: it stops first, and
	// before the device closes (an epoll set would report a descriptor
	// closed while the TAP's file lives on in the child's hands).
	if st.loop {
		st.fast.Close()
	}
	err := st.cfg.Device.Close()
	st.link.Wait()
	if st.fast != nil {
		st.fast.Close()
	}
	st.s.Close()
	st.s.Wait()
	return err
}

// ListenTCP listens on one of the stack's own addresses.
func (st *Stack) ListenTCP(addr netip.AddrPort) (net.Listener, error) {
	s, err := st.running()
	if err != nil {
		return nil, err
	}
	st.addListener(&st.tcpListen, addr)
	l, err := gonet.ListenTCP(s, fullAddr(addr), netProto(addr.Addr()))
	if err != nil {
		return nil, fmt.Errorf("stack: listen tcp %v: %w", addr, err)
	}
	return l, nil
}

// ListenUDP opens a UDP socket on one of the stack's own addresses.
func (st *Stack) ListenUDP(addr netip.AddrPort) (net.PacketConn, error) {
	s, err := st.running()
	if err != nil {
		return nil, err
	}
	st.addListener(&st.udpListen, addr)
	fa := fullAddr(addr)
	c, err := gonet.DialUDP(s, &fa, nil, netProto(addr.Addr()))
	if err != nil {
		return nil, fmt.Errorf("stack: listen udp %v: %w", addr, err)
	}
	return c, nil
}

func (st *Stack) running() (*stack.Stack, error) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.state != 1 {
		return nil, errors.New("stack: not running")
	}
	return st.s, nil
}

func fullAddr(a netip.AddrPort) tcpip.FullAddress {
	return tcpip.FullAddress{NIC: nicID, Addr: tcpip.AddrFromSlice(a.Addr().Unmap().AsSlice()), Port: a.Port()}
}

func netProto(a netip.Addr) tcpip.NetworkProtocolNumber {
	if a.Unmap().Is4() {
		return ipv4.ProtocolNumber
	}
	return ipv6.ProtocolNumber
}

func toAddrPort(a tcpip.Address, port uint16) netip.AddrPort {
	ip, _ := netip.AddrFromSlice(a.AsSlice())
	return netip.AddrPortFrom(ip, port)
}

// FastTCPStats are the TCP fast path's counters.
type FastTCPStats = tcpfast.Stats

// FastTCPStats returns the TCP fast path's counters; zero when it is off.
func (st *Stack) FastTCPStats() FastTCPStats {
	if st.fast == nil {
		return FastTCPStats{}
	}
	return st.fast.Stats()
}

// DescribeFastTCP says where each fast-path connection stands (sequence
// numbers, window, queue, timers), one line each: for diagnosis.
func (st *Stack) DescribeFastTCP() string {
	if st.fast == nil {
		return ""
	}
	return st.fast.Describe()
}

// RunsEventLoop reports whether the fast path's thread reads the link
// (Config.EventLoop, with the fast path on and a device that offers it).
func (st *Stack) RunsEventLoop() bool { return st.loop }

// A Stack is the event loop a flowtable.Poller's flows are read on
// (nat.Config.Loop), and every id such a poller hands out has a key in
// the loop's epoll set: the build fails if the one bound outgrows the
// other.
var _ flowtable.Loop = (*Stack)(nil)

const _ = uint32(tcpfast.MaxFlowID - flowtable.MaxID)

// ErrNoEventLoop is AttachFlows's error when the stack runs no event loop
// (Config.EventLoop off, the fast path off, or a device that is not the
// TAP itself).
var ErrNoEventLoop = tcpfast.ErrNoLoop

// AttachFlows makes the event loop, after Start, the reader of the NAT's
// UDP flows: receive runs on the loop's thread with the id of a flow whose
// socket, put into the loop's epoll set by WatchFlow, is readable
// (level-triggered), until the socket is closed; so the host's answers
// are read by the thread that reads the TAP, in the same wait.
// ErrNoEventLoop when there is no loop: the caller reads them itself.
func (st *Stack) AttachFlows(receive func(id uint32)) error {
	if st.fast == nil {
		return ErrNoEventLoop
	}
	return st.fast.AttachFlows(receive) // ErrNoLoop itself when the loop does not run
}

// WatchFlow puts a flow's socket into the event loop's epoll set under
// id (below flowtable.MaxID), after AttachFlows.
func (st *Stack) WatchFlow(fd int, id uint32) error {
	if st.fast == nil {
		return ErrNoEventLoop
	}
	return st.fast.WatchFlow(fd, id)
}
