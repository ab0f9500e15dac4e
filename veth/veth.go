// Package veth is the sandbox's link where /dev/net/tun cannot be opened
// (a container without the device, a host where it is mode 0600): a veth
// pair whose one end is the sandbox's interface, configured as a TAP would
// be (tap.Configure), and whose other end lives in a network namespace of
// its own, where gonetns reads and writes it through AF_PACKET sockets
// with the virtio-net header. The netstack sees what a TAP gives it:
// Ethernet frames, 64 KB TCP segments and partial checksums both ways,
// behind the same tap.Device.
//
// Why the far end has a namespace of its own: in the sandbox's, it would
// be one more interface for the command to see and to change, its IPv6
// link-local address would send duplicate address detection, router
// solicitations and MLD reports into the sandbox, and with forwarding on
// (rootless Docker turns it on) the sandbox's kernel would route frames
// it receives there back out of the sandbox's interface. Alone in its
// namespace, it has no address and nothing routes through it; the
// namespace lives as long as the sockets do, and takes the pair with it.
//
// All it needs is CAP_NET_ADMIN and CAP_NET_RAW in the sandbox's user
// namespace, which the sandbox's root has: no device node, no host
// privilege.
package veth

import (
	"errors"
	"fmt"
	"os"
	"runtime"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/netlink"
	"github.com/gonetns/gonetns/tap"
)

// peerName is the far end's name, in its own namespace.
const peerName = "gonetns0"

// MaxMTU is the largest MTU of a veth (ETH_MAX_MTU).
const MaxMTU = 65535

// Options of Open.
type Options struct {
	// Name of the sandbox's interface, e.g. "tap0".
	Name string
	// MTU of the sandbox's end; the far end's is MaxMTU.
	MTU int
}

// Opened is what Open made: the sandbox's interface (down, for
// tap.Configure to set up) and the sockets of the far end, for NewDevice.
type Opened struct {
	Name string
	// Files are the sending socket, then the receiving ones.
	Files []*os.File
	// RecvBuf is each receiving socket's receive buffer, as the kernel
	// granted it (net.core.rmem_max bounds it).
	RecvBuf int
}

// Close closes the sockets (and so removes the pair).
func (o Opened) Close() {
	for _, f := range o.Files {
		f.Close()
	}
}

// Open creates the pair: the interface o.Name in the calling thread's
// network namespace, and its far end, up and unnumbered, in a new one
// with the sockets on it. It needs CAP_NET_ADMIN and CAP_NET_RAW in the
// user namespace that owns the calling thread's network namespace, and
// CAP_SYS_ADMIN there to create the far end's.
func Open(o Options) (Opened, error) {
	if o.MTU < 68 || o.MTU > MaxMTU {
		return Opened{}, fmt.Errorf("veth %s: MTU %d out of range 68..%d", o.Name, o.MTU, MaxMTU)
	}
	here, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		return Opened{}, fmt.Errorf("open the sandbox's network namespace: %w", err)
	}
	defer here.Close()
	type result struct {
		op  Opened
		err error
	}
	done := make(chan result, 1)
	go func() {
		// Locked and never unlocked: the thread, in the far end's
		// namespace, ends with this goroutine.
		runtime.LockOSThread()
		op, err := openFarEnd(o, here)
		done <- result{op, err}
	}()
	r := <-done
	if r.err != nil {
		return Opened{}, r.err
	}
	if err := setOffloads(o.Name); err != nil {
		r.op.Close()
		return Opened{}, err
	}
	// The sandbox's end segments UDP itself: a veth passes a UDP GSO
	// send (UDP_SEGMENT, as QUIC clients use) to the far end whole, and
	// gonetns, which takes TCP segments whole (the fast path), handed it
	// to its stack as one datagram: 4 datagrams of 1,000 bytes reached
	// the host as one of 4,000 (the TAP, which offers the kernel TCP
	// segmentation only, never gets them whole).
	if err := setFeatures(o.Name, false, udpSegmentation...); err != nil {
		r.op.Close()
		return Opened{}, err
	}
	return r.op, nil
}

// udpSegmentation are the features under which the kernel sends UDP
// segments whole (their ethtool names).
var udpSegmentation = []string{"tx-udp-segmentation", "tx-gso-list"}

// openFarEnd runs on a thread of its own: it moves it into a new network
// namespace, creates the pair there with the sandbox's end in the
// namespace sandboxNS, brings the far end up and opens the sockets.
func openFarEnd(o Options, sandboxNS *os.File) (Opened, error) {
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		return Opened{}, fmt.Errorf("create the network namespace of the link's far end: %w", err)
	}
	nl, err := netlink.Open(unix.NETLINK_ROUTE)
	if err != nil {
		return Opened{}, err
	}
	defer nl.Close()
	// The far end takes frames as large as a veth can: a veth drops what
	// is larger than its receiver's MTU, and the command may raise its
	// end's (to 9,000 from 1,500: its larger frames were lost, where the
	// TAP takes any).
	if err := createPair(nl, peerName, MaxMTU, o.Name, o.MTU, int(sandboxNS.Fd())); err != nil {
		return Opened{}, err
	}
	idx, err := tap.LinkIndex(nl, peerName)
	if err != nil {
		return Opened{}, err
	}
	// No IPv6 address on the far end, not even link-local: its duplicate
	// address detection, router solicitations and MLD reports would go
	// into the sandbox.
	if err := setAddrGenModeNone(nl, idx); err != nil {
		return Opened{}, err
	}
	if err := setOffloads(peerName); err != nil {
		return Opened{}, err
	}
	// Up before the sockets are bound: a packet socket joins its fanout
	// group only while its interface is up. Nothing comes through yet: the
	// sandbox's end is down until tap.Configure.
	if err := setUp(nl, idx); err != nil {
		return Opened{}, err
	}
	return openSockets(idx)
}

// vethInfoPeer is VETH_INFO_PEER (linux/veth.h).
const vethInfoPeer = 1

// createPair creates the veth pair name (here, with MTU mtu) and peer (in
// the namespace of the descriptor peerNS, with peerMTU).
func createPair(nl *netlink.Conn, name string, mtu int, peer string, peerMTU, peerNS int) error {
	peerMsg := netlink.StructBytes(&unix.IfInfomsg{Family: unix.AF_UNSPEC})
	peerMsg = netlink.AppendAttr(peerMsg, unix.IFLA_IFNAME, append([]byte(peer), 0))
	peerMsg = netlink.AppendUint32Attr(peerMsg, unix.IFLA_NET_NS_FD, uint32(peerNS))
	peerMsg = netlink.AppendUint32Attr(peerMsg, unix.IFLA_MTU, uint32(peerMTU))
	info := netlink.AppendAttr(nil, unix.IFLA_INFO_KIND, []byte("veth"))
	info = netlink.AppendAttr(info, unix.IFLA_INFO_DATA, netlink.AppendAttr(nil, vethInfoPeer, peerMsg))
	body := netlink.StructBytes(&unix.IfInfomsg{Family: unix.AF_UNSPEC})
	body = netlink.AppendAttr(body, unix.IFLA_IFNAME, append([]byte(name), 0))
	body = netlink.AppendUint32Attr(body, unix.IFLA_MTU, uint32(mtu))
	body = netlink.AppendAttr(body, unix.IFLA_LINKINFO, info)
	if err := nl.Request(unix.RTM_NEWLINK, unix.NLM_F_CREATE|unix.NLM_F_EXCL, body); err != nil {
		if errors.Is(err, unix.EOPNOTSUPP) {
			return fmt.Errorf("create the veth pair %s: %w (the kernel has no veth driver: modprobe veth)", peer, err)
		}
		return fmt.Errorf("create the veth pair %s: %w", peer, err)
	}
	return nil
}

// in6AddrGenModeNone is IN6_ADDR_GEN_MODE_NONE (linux/if_link.h).
const in6AddrGenModeNone = 1

func setAddrGenModeNone(nl *netlink.Conn, idx int) error {
	inet6 := netlink.AppendAttr(nil, unix.IFLA_INET6_ADDR_GEN_MODE, []byte{in6AddrGenModeNone})
	body := netlink.StructBytes(&unix.IfInfomsg{Family: unix.AF_UNSPEC, Index: int32(idx)})
	body = netlink.AppendAttr(body, unix.IFLA_AF_SPEC, netlink.AppendAttr(nil, unix.AF_INET6, inet6))
	if err := nl.Request(unix.RTM_NEWLINK, 0, body); err != nil {
		return fmt.Errorf("turn IPv6 address generation off on %s: %w", peerName, err)
	}
	return nil
}

func setUp(nl *netlink.Conn, idx int) error {
	body := netlink.StructBytes(&unix.IfInfomsg{Family: unix.AF_UNSPEC, Index: int32(idx), Flags: unix.IFF_UP, Change: unix.IFF_UP})
	if err := nl.Request(unix.RTM_NEWLINK, 0, body); err != nil {
		return fmt.Errorf("set %s up: %w", peerName, err)
	}
	return nil
}
