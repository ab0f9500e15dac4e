package veth

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"slices"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/wire"
)

// rxTarget is how much the receiving sockets should hold together: what
// the TAP's transmit queue holds for a bulk sender (gVisor's receive
// window reaches 8 MB) or a burst of new flows (5,000 datagrams), with
// room to spare. Only what is queued costs memory.
const rxTarget = 16 << 20

// rcvbufRequest is the receive buffer asked of each receiving socket
// (tests ask for less, to see the kernel roll over).
var rcvbufRequest = rxTarget

// maxRX bounds the receiving sockets: the child sends every socket to the
// parent in one message, the sending one too.
const maxRX = wire.MaxFiles - 1

// fanoutGroup is the receiving sockets' fanout group, alone in the far
// end's namespace.
const fanoutGroup = 0x676e

// htons is v in network byte order, as sockaddr_ll's protocol wants it.
func htons(v uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], v)
	return binary.NativeEndian.Uint16(b[:])
}

// openSockets opens, on the far end ifindex (up), the sending socket and
// the receiving ones, as many as it takes to hold rxTarget with the
// receive buffer the kernel grants: net.core.rmem_max bounds it, so two
// where that is 4 MiB, and the most, fifteen, at Linux's default of 208 KiB.
func openSockets(ifindex int) (Opened, error) {
	var op Opened
	ok := false
	defer func() {
		if !ok {
			op.Close()
		}
	}()
	add := func(fd int) {
		op.Files = append(op.Files, os.NewFile(uintptr(fd), fmt.Sprintf("packet-link-%d", len(op.Files))))
	}
	tx, err := openSocket(ifindex, 0)
	if err != nil {
		return Opened{}, err
	}
	add(tx)
	// Frames sent go straight to the device, past the queueing
	// discipline (the pair has none anyway).
	if err := unix.SetsockoptInt(tx, unix.SOL_PACKET, unix.PACKET_QDISC_BYPASS, 1); err != nil {
		return Opened{}, fmt.Errorf("packet socket: PACKET_QDISC_BYPASS: %w", err)
	}
	// As much as the kernel allows: a frame the socket cannot take waits
	// for room (EAGAIN), it is not dropped.
	unix.SetsockoptInt(tx, unix.SOL_SOCKET, unix.SO_SNDBUF, rxTarget)
	for n := 1; len(op.Files) <= n; {
		fd, err := openSocket(ifindex, htons(unix.ETH_P_ALL))
		if err != nil {
			return Opened{}, err
		}
		add(fd)
		// The frames the far end sends itself (it has no address, so none)
		// are not for the netstack.
		unix.SetsockoptInt(fd, unix.SOL_PACKET, unix.PACKET_IGNORE_OUTGOING, 1)
		// Capped by net.core.rmem_max.
		unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, rcvbufRequest)
		if op.RecvBuf == 0 {
			if op.RecvBuf, err = unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF); err != nil {
				return Opened{}, fmt.Errorf("packet socket: SO_RCVBUF: %w", err)
			}
			n = min(max((rxTarget+op.RecvBuf-1)/op.RecvBuf, 1), maxRX)
		}
		if err := unix.SetsockoptInt(fd, unix.SOL_PACKET, unix.PACKET_FANOUT, fanoutGroup|unix.PACKET_FANOUT_ROLLOVER<<16); err != nil {
			return Opened{}, fmt.Errorf("packet socket: PACKET_FANOUT: %w", err)
		}
	}
	ok = true
	return op, nil
}

// openSocket opens a packet socket with the virtio-net header on ifindex:
// receiving frames of protocol proto (htons), or none with 0.
func openSocket(ifindex int, proto uint16) (int, error) {
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		if err == unix.EPERM || err == unix.EACCES {
			return -1, fmt.Errorf("open a packet socket: %w (it needs CAP_NET_RAW in the sandbox's user namespace; a container's seccomp profile may refuse AF_PACKET)", err)
		}
		return -1, fmt.Errorf("open a packet socket: %w", err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_PACKET, unix.PACKET_VNET_HDR, 1); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("packet socket: PACKET_VNET_HDR: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: proto, Ifindex: ifindex}); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("bind a packet socket to %s: %w", peerName, err)
	}
	return fd, nil
}

// ifreqData is struct ifreq with ifr_data.
type ifreqData struct {
	name [unix.IFNAMSIZ]byte
	data unsafe.Pointer
	_    [24 - unsafe.Sizeof(unsafe.Pointer(nil))]byte
}

// ethtoolValue is struct ethtool_value.
type ethtoolValue struct {
	cmd, data uint32
}

// setOffloads turns on the offloads that let 64 KB segments cross the
// pair whole, in the calling thread's namespace: checksum (TSO needs it),
// scatter-gather, TSO and GSO. A veth has them on when it is made; this
// makes sure of it.
func setOffloads(name string) error {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socket for ethtool: %w", err)
	}
	defer unix.Close(fd)
	for _, c := range []struct {
		cmd  uint32
		what string
	}{
		{unix.ETHTOOL_STXCSUM, "checksum offload"},
		{unix.ETHTOOL_SSG, "scatter-gather"},
		{unix.ETHTOOL_STSO, "TSO"},
		{unix.ETHTOOL_SGSO, "GSO"},
	} {
		v := ethtoolValue{cmd: c.cmd, data: 1}
		if err := ethtool(fd, name, unsafe.Pointer(&v)); err != nil {
			return fmt.Errorf("turn %s on for %s: %w", c.what, name, err)
		}
	}
	return nil
}

// Ethtool's feature strings (linux/ethtool.h).
const (
	ethSSFeatures  = 4  // ETH_SS_FEATURES
	ethGStringLen  = 32 // ETH_GSTRING_LEN
	maxFeatureBits = 1024
)

// ethtool runs one SIOCETHTOOL request on name with data.
func ethtool(fd int, name string, data unsafe.Pointer) error {
	var ifr ifreqData
	copy(ifr.name[:], name)
	ifr.data = data
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SIOCETHTOOL, uintptr(unsafe.Pointer(&ifr))); e != 0 {
		return e
	}
	return nil
}

// setFeatures turns the features named (ethtool -k's names) on or off
// for name, in the calling thread's namespace; a name the kernel does
// not have is left out.
func setFeatures(name string, on bool, features ...string) error {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socket for ethtool: %w", err)
	}
	defer unix.Close(fd)
	// struct ethtool_sset_info with one data word: the count of feature
	// strings.
	var info struct {
		cmd, reserved uint32
		mask          uint64
		count         uint32
	}
	info.cmd, info.mask = unix.ETHTOOL_GSSET_INFO, 1<<ethSSFeatures
	if err := ethtool(fd, name, unsafe.Pointer(&info)); err != nil {
		return fmt.Errorf("ethtool features of %s: %w", name, err)
	}
	n := int(info.count)
	if info.mask == 0 || n == 0 || n > maxFeatureBits {
		return fmt.Errorf("ethtool features of %s: %d strings", name, n)
	}
	// struct ethtool_gstrings, then the strings.
	strs := make([]byte, 12+n*ethGStringLen)
	binary.NativeEndian.PutUint32(strs[0:], unix.ETHTOOL_GSTRINGS)
	binary.NativeEndian.PutUint32(strs[4:], ethSSFeatures)
	binary.NativeEndian.PutUint32(strs[8:], uint32(n))
	if err := ethtool(fd, name, unsafe.Pointer(&strs[0])); err != nil {
		return fmt.Errorf("ethtool feature names of %s: %w", name, err)
	}
	// struct ethtool_sfeatures: a valid and a requested word per 32
	// features.
	words := (n + 31) / 32
	set := make([]uint32, 2+2*words)
	set[0], set[1] = unix.ETHTOOL_SFEATURES, uint32(words)
	for i := range n {
		s := strs[12+i*ethGStringLen : 12+(i+1)*ethGStringLen]
		if end := bytes.IndexByte(s, 0); end >= 0 {
			s = s[:end]
		}
		if !slices.Contains(features, string(s)) {
			continue
		}
		set[2+2*(i/32)] |= 1 << (i % 32)
		if on {
			set[3+2*(i/32)] |= 1 << (i % 32)
		}
	}
	if err := ethtool(fd, name, unsafe.Pointer(&set[0])); err != nil && !errors.Is(err, unix.EOPNOTSUPP) {
		return fmt.Errorf("ethtool: set %v of %s: %w", features, name, err)
	}
	return nil
}
