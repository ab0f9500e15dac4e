package stack

import (
	"errors"

	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// errAnswered is returned by Prohibit outside the handler call that
// received the packet.
var errAnswered = errors.New("stack: Prohibit called after the handler returned")

// prohibit answers pkt, a packet the sandbox sent, with ICMP destination
// unreachable "administratively prohibited" (code 13; ICMPv6 code 1), from
// the address pkt was sent to: what a firewall that rejects the packet
// sends. Linux reports it to the sender as EHOSTUNREACH (ICMPv6: EACCES),
// and ping(8) prints "Packet filtered" (ICMPv6: "Administratively
// prohibited"). gVisor's own ICMP rate limit applies.
func prohibit(s *stack.Stack, pkt *stack.PacketBuffer) error {
	return reject(s, pkt, stack.RejectIPv4WithICMPAdminProhibited, stack.RejectIPv6WithICMPAdminProhibited)
}

// reject answers pkt, a packet the sandbox sent, with the ICMP (ICMPv6)
// error given for its family, from the address pkt was sent to.
func reject(s *stack.Stack, pkt *stack.PacketBuffer, v4 stack.RejectIPv4WithICMPType, v6 stack.RejectIPv6WithICMPType) error {
	if pkt == nil {
		return errAnswered
	}
	switch pkt.NetworkProtocolNumber {
	case ipv4.ProtocolNumber:
		if h, ok := s.NetworkProtocolInstance(ipv4.ProtocolNumber).(stack.RejectIPv4WithHandler); ok {
			return Err(h.SendRejectionError(pkt, v4, true))
		}
	case ipv6.ProtocolNumber:
		if h, ok := s.NetworkProtocolInstance(ipv6.ProtocolNumber).(stack.RejectIPv6WithHandler); ok {
			return Err(h.SendRejectionError(pkt, v6, true))
		}
	}
	return errors.New("stack: cannot answer the packet's network protocol")
}
