package tap

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// LinkConfig is the configuration of the sandbox's interface.
type LinkConfig struct {
	Name string
	MTU  int
	// Address is the sandbox's own address with its prefix, e.g.
	// 10.0.2.100/24.
	Address netip.Prefix
	// Gateway becomes the default route.
	Gateway netip.Addr
	// Address6 and Gateway6 are the IPv6 equivalents; zero to skip.
	Address6 netip.Prefix
	Gateway6 netip.Addr
}

// Configure brings up lo, then sets the MTU, address and state of the
// interface and adds the default route, all over rtnetlink.
func Configure(c LinkConfig) error {
	nl, err := dialNetlink()
	if err != nil {
		return err
	}
	defer nl.close()
	if err := nl.setLinkUp("lo", 0, 0); err != nil {
		return err
	}
	if err := nl.setLinkUp(c.Name, c.MTU, TxQueueLen); err != nil {
		return err
	}
	for _, a := range []netip.Prefix{c.Address, c.Address6} {
		if a.IsValid() {
			if err := nl.addAddr(c.Name, a); err != nil {
				return err
			}
		}
	}
	for _, gw := range []netip.Addr{c.Gateway, c.Gateway6} {
		if gw.IsValid() {
			if err := nl.addDefaultRoute(c.Name, gw); err != nil {
				return err
			}
		}
	}
	return nil
}

// LoopbackUp brings up lo (for --net=none).
func LoopbackUp() error {
	nl, err := dialNetlink()
	if err != nil {
		return err
	}
	defer nl.close()
	return nl.setLinkUp("lo", 0, 0)
}

// TxQueueLen is the length of the TAP's transmit queue: the frames the
// sandbox's kernel holds for gonetns to read before it drops. The
// kernel's default of 1000 dropped most of a burst of 5,000 datagrams
// from new source ports (1,225 answered) and 111,958 frames in a burst of
// 20,000 connections, while gonetns, one reader, set up the flows one by
// one. Only what waits costs memory, in the kernel: each queued frame is
// charged to the sending socket's buffer (wmem), so what a queue of 10,000
// can hold is bounded by the sandbox's sockets' send buffers, not by
// 10,000 frames of up to 64 KiB (TSO): small frames fill the queue, large
// ones stop their sockets first.
const TxQueueLen = 10000

// netlinkConn is a netlink socket of the calling thread's network
// namespace. Its exchanges are serialized, so it is safe for concurrent
// use; after close they fail.
type netlinkConn struct {
	what string // for errors: "rtnetlink", "netfilter netlink"
	mu   sync.Mutex
	fd   int // -1 once closed
	seq  atomic.Uint32
}

func dialNetlink() (*netlinkConn, error) { return dialNetlinkProto(unix.NETLINK_ROUTE, "rtnetlink") }

func dialNetlinkProto(proto int, what string) (*netlinkConn, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		return nil, fmt.Errorf("open %s socket: %w", what, err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("bind %s socket: %w", what, err)
	}
	return &netlinkConn{what: what, fd: fd}, nil
}

// close closes the socket; idempotent.
func (c *netlinkConn) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.fd >= 0 {
		unix.Close(c.fd)
		c.fd = -1
	}
}

// request sends one message and waits for its acknowledgement.
func (c *netlinkConn) request(typ uint16, flags uint16, body []byte) error {
	_, err := c.exchange(typ, flags|unix.NLM_F_ACK, body, true)
	return err
}

// get sends one request that the kernel answers with one message (no
// acknowledgement asked for) and returns that message's body.
func (c *netlinkConn) get(typ uint16, body []byte) ([]byte, error) {
	data, err := c.exchange(typ, 0, body, false)
	if err == nil && data == nil {
		return nil, errors.New("netlink acknowledged a request that wants an answer")
	}
	return data, err
}

// exchange sends one message and returns the kernel's answer to it: the
// body of the answer, or nil for an acknowledgement (NLMSG_ERROR with code
// 0); an error code comes back as the error. Late answers to earlier
// requests are skipped, and with ack so is anything but the
// acknowledgement.
func (c *netlinkConn) exchange(typ, flags uint16, body []byte, ack bool) ([]byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.fd < 0 {
		return nil, fmt.Errorf("the %s socket is closed", c.what)
	}
	seq := c.seq.Add(1)
	msg := make([]byte, unix.NLMSG_HDRLEN+len(body))
	binary.NativeEndian.PutUint32(msg[0:], uint32(len(msg)))
	binary.NativeEndian.PutUint16(msg[4:], typ)
	binary.NativeEndian.PutUint16(msg[6:], flags|unix.NLM_F_REQUEST)
	binary.NativeEndian.PutUint32(msg[8:], seq)
	copy(msg[unix.NLMSG_HDRLEN:], body)
	if err := unix.Sendto(c.fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, err
	}
	buf := make([]byte, 8192)
	for {
		n, _, err := unix.Recvfrom(c.fd, buf, 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, err
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return nil, err
		}
		for _, m := range msgs {
			if m.Header.Seq != seq {
				continue
			}
			if m.Header.Type != unix.NLMSG_ERROR {
				if ack {
					continue
				}
				return m.Data, nil
			}
			if len(m.Data) < 4 {
				return nil, errors.New("short netlink error message")
			}
			if code := int32(binary.NativeEndian.Uint32(m.Data)); code != 0 {
				return nil, unix.Errno(-code)
			}
			return nil, nil
		}
	}
}

func ifIndex(name string) (int, error) {
	ifi, err := net.InterfaceByName(name)
	if err != nil {
		return 0, fmt.Errorf("interface %s: %w", name, err)
	}
	return ifi.Index, nil
}

// setLinkUp sets the interface up; an MTU or transmit queue length of 0
// is left as it is.
func (c *netlinkConn) setLinkUp(name string, mtu, txqlen int) error {
	idx, err := ifIndex(name)
	if err != nil {
		return err
	}
	ifi := unix.IfInfomsg{Family: unix.AF_UNSPEC, Index: int32(idx), Flags: unix.IFF_UP, Change: unix.IFF_UP}
	body := structBytes(&ifi)
	if mtu > 0 {
		body = appendAttr(body, unix.IFLA_MTU, binary.NativeEndian.AppendUint32(nil, uint32(mtu)))
	}
	if txqlen > 0 {
		body = appendAttr(body, unix.IFLA_TXQLEN, binary.NativeEndian.AppendUint32(nil, uint32(txqlen)))
	}
	if err := c.request(unix.RTM_NEWLINK, 0, body); err != nil {
		if mtu > 0 {
			return fmt.Errorf("set %s up with MTU %d: %w", name, mtu, err)
		}
		return fmt.Errorf("set %s up: %w", name, err)
	}
	return nil
}

func (c *netlinkConn) addAddr(name string, p netip.Prefix) error {
	idx, err := ifIndex(name)
	if err != nil {
		return err
	}
	family := uint8(unix.AF_INET)
	if p.Addr().Is6() {
		family = unix.AF_INET6
	}
	ifa := unix.IfAddrmsg{Family: family, Prefixlen: uint8(p.Bits()), Index: uint32(idx)}
	body := structBytes(&ifa)
	addr := p.Addr().AsSlice()
	body = appendAttr(body, unix.IFA_LOCAL, addr)
	body = appendAttr(body, unix.IFA_ADDRESS, addr)
	if p.Addr().Is4() {
		body = appendAttr(body, unix.IFA_BROADCAST, broadcast(p).AsSlice())
	} else {
		// No duplicate address detection: nothing else is on this link,
		// and DAD would hold the address "tentative" for a second.
		body = appendAttr(body, unix.IFA_FLAGS, binary.NativeEndian.AppendUint32(nil, unix.IFA_F_NODAD))
	}
	if err := c.request(unix.RTM_NEWADDR, unix.NLM_F_CREATE|unix.NLM_F_EXCL, body); err != nil {
		return fmt.Errorf("add address %s to %s: %w", p, name, err)
	}
	return nil
}

func (c *netlinkConn) addDefaultRoute(name string, gw netip.Addr) error {
	idx, err := ifIndex(name)
	if err != nil {
		return err
	}
	family := uint8(unix.AF_INET)
	if gw.Is6() {
		family = unix.AF_INET6
	}
	rtm := unix.RtMsg{
		Family:   family,
		Table:    unix.RT_TABLE_MAIN,
		Protocol: unix.RTPROT_BOOT,
		Scope:    unix.RT_SCOPE_UNIVERSE,
		Type:     unix.RTN_UNICAST,
	}
	body := structBytes(&rtm)
	body = appendAttr(body, unix.RTA_GATEWAY, gw.AsSlice())
	body = appendAttr(body, unix.RTA_OIF, binary.NativeEndian.AppendUint32(nil, uint32(idx)))
	if err := c.request(unix.RTM_NEWROUTE, unix.NLM_F_CREATE|unix.NLM_F_EXCL, body); err != nil {
		return fmt.Errorf("add default route via %s dev %s: %w", gw, name, err)
	}
	return nil
}

func broadcast(p netip.Prefix) netip.Addr {
	a := p.Masked().Addr().As4()
	host := uint32(1)<<(32-p.Bits()) - 1
	v := binary.BigEndian.Uint32(a[:]) | host
	binary.BigEndian.PutUint32(a[:], v)
	return netip.AddrFrom4(a)
}

func structBytes[T any](v *T) []byte {
	b := unsafe.Slice((*byte)(unsafe.Pointer(v)), unsafe.Sizeof(*v))
	return append([]byte(nil), b...)
}

func appendAttr(b []byte, typ uint16, data []byte) []byte {
	l := unix.SizeofRtAttr + len(data)
	b = binary.NativeEndian.AppendUint16(b, uint16(l))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = append(b, data...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}
