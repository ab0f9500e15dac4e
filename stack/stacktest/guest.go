// Package stacktest plays the sandbox in tests: a second, independent gVisor
// netstack with the sandbox's address, joined to the stack under test by an
// in-memory device pair, so TCP, UDP and ICMP behaviour can be tested
// without a kernel.
package stacktest

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	gstack "gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/gonetns/gonetns/stack"
	"github.com/gonetns/gonetns/stack/internal/link"
	"github.com/gonetns/gonetns/tap"
)

// GuestMAC is the guest's Ethernet address.
var GuestMAC = tcpip.LinkAddress("\x02\x00\x00\x00\x00\x64")

// Guest is the sandbox's side of the link: an IPv4 host with one address
// and a default route.
type Guest struct {
	s   *gstack.Stack
	ep  *link.Endpoint
	dev tap.Device

	senders sync.Map // local port -> *tcp.TCPSenderState, as of the last segment received
}

// NewGuest starts a guest stack on dev with address addr (e.g.
// 10.0.2.100/24) and default gateway gw.
func NewGuest(dev tap.Device, addr netip.Prefix, gw netip.Addr, mtu uint32) (*Guest, error) {
	g := &Guest{dev: dev}
	// The probe keeps each connection's sender state for Describe.
	probe := tcp.NewProtocolProbe(func(st *tcp.TCPEndpointState) {
		snd := st.Sender
		g.senders.Store(st.ID.LocalPort, &snd)
	})
	s := gstack.New(gstack.Options{
		NetworkProtocols:   []gstack.NetworkProtocolFactory{ipv4.NewProtocol, arp.NewProtocol},
		TransportProtocols: []gstack.TransportProtocolFactory{probe, udp.NewProtocol, icmp.NewProtocol4},
	})
	// SACK, as a Linux sandbox has it by default.
	sack := tcpip.TCPSACKEnabled(true)
	if err := s.SetTransportProtocolOption(tcp.ProtocolNumber, &sack); err != nil {
		s.Close()
		return nil, fmt.Errorf("guest SACK: %s", err)
	}
	ep := link.New(dev, mtu, GuestMAC, nil)
	if err := s.CreateNIC(1, ep); err != nil {
		s.Close()
		return nil, fmt.Errorf("guest NIC: %s", err)
	}
	pa := tcpip.ProtocolAddress{
		Protocol:          ipv4.ProtocolNumber,
		AddressWithPrefix: tcpip.AddressWithPrefix{Address: tcpip.AddrFrom4(addr.Addr().As4()), PrefixLen: addr.Bits()},
	}
	if err := s.AddProtocolAddress(1, pa, gstack.AddressProperties{}); err != nil {
		s.Close()
		return nil, fmt.Errorf("guest address: %s", err)
	}
	subnet, _ := tcpip.NewSubnet(tcpip.AddrFrom4(addr.Masked().Addr().As4()), tcpip.MaskFromBytes(net.CIDRMask(addr.Bits(), 32)))
	s.SetRouteTable([]tcpip.Route{
		{Destination: subnet, NIC: 1},
		{Destination: header.IPv4EmptySubnet, Gateway: tcpip.AddrFrom4(gw.As4()), NIC: 1},
	})
	g.s, g.ep = s, ep
	return g, nil
}

func full(a netip.AddrPort) tcpip.FullAddress {
	return tcpip.FullAddress{NIC: 1, Addr: tcpip.AddrFrom4(a.Addr().As4()), Port: a.Port()}
}

// Conn is a guest TCP connection; Abort resets it.
type Conn struct {
	*gonet.TCPConn
	ep tcpip.Endpoint
	g  *Guest
}

// Abort sends a reset to the peer.
func (c *Conn) Abort() { c.ep.Abort() }

// Describe says where the guest's end of the connection stands (state,
// retransmission timeout, congestion window): for diagnosis.
func (c *Conn) Describe() string {
	var i tcpip.TCPInfoOption
	if err := c.ep.GetSockOpt(&i); err != nil {
		return err.String()
	}
	d := fmt.Sprintf("%v state %v rto %v rtt %v cwnd %d ssthresh %d congestion %v", c.LocalAddr(), tcp.EndpointState(i.State), i.RTO, i.RTT, i.SndCwnd, i.SndSsthresh, i.CcState)
	if v, ok := c.g.senders.Load(c.LocalAddr().(*net.TCPAddr).AddrPort().Port()); ok {
		snd := v.(*tcp.TCPSenderState)
		d += fmt.Sprintf("; sender at the last segment in: sndUna %d sndNxt +%d sndWnd %d outstanding %d sacked %d dupAcks %d closed %t fast recovery %+v rack %+v",
			snd.SndUna, snd.SndNxt-snd.SndUna, snd.SndWnd, snd.Outstanding, snd.SackedOut, snd.DupAckCount, snd.Closed, snd.FastRecovery, snd.RACKState)
	}
	return d
}

// DialTCP connects to addr through the stack under test.
func (g *Guest) DialTCP(ctx context.Context, addr netip.AddrPort) (*Conn, error) {
	var wq waiter.Queue
	ep, terr := g.s.NewEndpoint(tcp.ProtocolNumber, ipv4.ProtocolNumber, &wq)
	if terr != nil {
		return nil, fmt.Errorf("tcp endpoint: %s", terr)
	}
	entry, ch := waiter.NewChannelEntry(waiter.WritableEvents | waiter.EventHUp | waiter.EventErr)
	wq.EventRegister(&entry)
	defer wq.EventUnregister(&entry)
	terr = ep.Connect(full(addr))
	if _, ok := terr.(*tcpip.ErrConnectStarted); ok {
		select {
		case <-ch:
		case <-ctx.Done():
			ep.Close()
			return nil, ctx.Err()
		}
		terr = ep.LastError()
	}
	if terr != nil {
		ep.Close()
		return nil, fmt.Errorf("dial %v: %w", addr, stack.Err(terr))
	}
	return &Conn{TCPConn: gonet.NewTCPConn(&wq, ep), ep: ep, g: g}, nil
}

// DialUDP returns a UDP socket connected to addr.
func (g *Guest) DialUDP(addr netip.AddrPort) (*gonet.UDPConn, error) {
	r := full(addr)
	return gonet.DialUDP(g.s, nil, &r, ipv4.ProtocolNumber)
}

// ListenUDP returns an unconnected UDP socket, bound to a port of its
// own by its first WriteTo.
func (g *Guest) ListenUDP() (*gonet.UDPConn, error) {
	return gonet.DialUDP(g.s, nil, nil, ipv4.ProtocolNumber)
}

// Ping sends one ICMP echo request to dst and waits for the reply until
// ctx ends; it returns the reply's payload.
func (g *Guest) Ping(ctx context.Context, dst netip.Addr, seq uint16, data []byte) ([]byte, error) {
	var wq waiter.Queue
	ep, err := g.s.NewEndpoint(icmp.ProtocolNumber4, ipv4.ProtocolNumber, &wq)
	if err != nil {
		return nil, fmt.Errorf("icmp endpoint: %s", err)
	}
	defer ep.Close()
	if err := ep.Connect(tcpip.FullAddress{NIC: 1, Addr: tcpip.AddrFrom4(dst.As4())}); err != nil {
		return nil, fmt.Errorf("icmp connect: %s", err)
	}
	msg := make([]byte, header.ICMPv4MinimumSize+len(data))
	h := header.ICMPv4(msg)
	h.SetType(header.ICMPv4Echo)
	h.SetSequence(seq)
	copy(msg[header.ICMPv4MinimumSize:], data)
	var r bytesReader
	r.b = msg
	if _, err := ep.Write(&r, tcpip.WriteOptions{}); err != nil {
		return nil, fmt.Errorf("icmp write: %s", err)
	}
	entry, ch := waiter.NewChannelEntry(waiter.ReadableEvents)
	wq.EventRegister(&entry)
	defer wq.EventUnregister(&entry)
	for {
		buf := make([]byte, 65536)
		w := tcpip.SliceWriter(buf)
		res, err := ep.Read(&w, tcpip.ReadOptions{})
		if err == nil {
			reply := header.ICMPv4(buf[:res.Count])
			if reply.Type() == header.ICMPv4EchoReply && reply.Sequence() == seq {
				return append([]byte(nil), reply.Payload()...), nil
			}
			continue
		}
		if _, ok := err.(*tcpip.ErrWouldBlock); !ok {
			return nil, fmt.Errorf("icmp read: %s", err)
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

type bytesReader struct{ b []byte }

func (r *bytesReader) Read(p []byte) (int, error) {
	if len(r.b) == 0 {
		return 0, io.EOF
	}
	n := copy(p, r.b)
	r.b = r.b[n:]
	return n, nil
}

func (r *bytesReader) Len() int { return len(r.b) }

// Stats returns counters of the guest stack (e.g. ICMP replies seen).
func (g *Guest) Stats() tcpip.Stats { return g.s.Stats() }

// Close stops the guest stack and closes its device (for a taptest pipe,
// both ends). The link's reader goes first: gVisor's Stack.Wait holds the
// stack's lock while it waits for the link, and a reader still delivering a
// frame needs that lock (a reset to a late segment), so stopping them in the
// other order can deadlock.
func (g *Guest) Close() {
	g.dev.Close()
	g.ep.Wait()
	g.s.Close()
	g.s.Wait()
}

// WaitFor polls cond until it holds or d passes; for state that settles
// asynchronously (connections closing).
func WaitFor(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if cond() {
			return true
		}
		time.Sleep(5 * time.Millisecond)
	}
	return cond()
}
