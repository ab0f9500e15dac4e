package stack

import (
	"errors"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"

	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// UDPRequest is the first datagram of a new flow from the sandbox.
type UDPRequest struct {
	// Src is the sandbox's end; Dst is the address it sends to.
	Src, Dst netip.AddrPort

	s    *stack.Stack
	r    *udp.ForwarderRequest
	pkt  atomic.Pointer[stack.PacketBuffer] // the datagram, during the handler only
	once sync.Once
}

func newUDPRequest(s *stack.Stack, r *udp.ForwarderRequest, pkt *stack.PacketBuffer) *UDPRequest {
	id := r.ID()
	req := &UDPRequest{
		Src: toAddrPort(id.RemoteAddress, id.RemotePort),
		Dst: toAddrPort(id.LocalAddress, id.LocalPort),
		s:   s,
		r:   r,
	}
	req.pkt.Store(pkt)
	return req
}

// Accept returns a connection bound to Dst and connected to Src: Read
// returns the flow's datagrams (the first one included), Write sends
// datagrams from Dst to Src. Deadlines work as on any net.Conn.
func (r *UDPRequest) Accept() (net.Conn, error) {
	var (
		c   net.Conn
		err error = errors.New("stack: request already answered")
	)
	r.once.Do(func() {
		wq := new(waiter.Queue)
		ep, terr := r.r.CreateEndpoint(wq)
		if terr != nil {
			err = Err(terr)
			return
		}
		c, err = gonet.NewUDPConn(wq, ep), nil
	})
	return c, err
}

// Prohibit refuses the flow as a firewall does: the datagram is answered
// with ICMP destination unreachable, "administratively prohibited" (the
// sandbox's socket gets EHOSTUNREACH; over IPv6, EACCES). Call it from the
// UDP handler, which then returns true (the datagram is dealt with).
func (r *UDPRequest) Prohibit() error {
	err := errors.New("stack: request already answered")
	r.once.Do(func() { err = prohibit(r.s, r.pkt.Load()) })
	return err
}
