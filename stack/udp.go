package stack

import (
	"errors"
	"net"
	"net/netip"
	"sync"

	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// UDPRequest is the first datagram of a new flow from the sandbox.
type UDPRequest struct {
	// Src is the sandbox's end; Dst is the address it sends to.
	Src, Dst netip.AddrPort

	r    *udp.ForwarderRequest
	once sync.Once
}

func newUDPRequest(_ *Stack, r *udp.ForwarderRequest) *UDPRequest {
	id := r.ID()
	return &UDPRequest{
		Src: toAddrPort(id.RemoteAddress, id.RemotePort),
		Dst: toAddrPort(id.LocalAddress, id.LocalPort),
		r:   r,
	}
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
