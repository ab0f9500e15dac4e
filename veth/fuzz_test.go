package veth_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"os"
	"runtime"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/tap"
	"github.com/gonetns/gonetns/veth"
)

// fuzzLink is one packet link for every input of a fuzzing process: a
// pair in a namespace of its own, the device, and a packet socket with the
// virtio-net header on the sandbox's end. The sandbox's end has no IPv6, so
// that every frame on the link is one the input made.
type fuzzLink struct {
	dev tap.Device
	fd  int // the sandbox's end
}

var (
	fuzzOnce sync.Once
	fuzzL    *fuzzLink
	fuzzErr  error
)

func getFuzzLink(t testing.TB) *fuzzLink {
	t.Helper()
	if os.Getuid() != 0 {
		t.Fatal("FuzzFrames creates a network namespace and a veth pair and needs root: run it as root (make test does)")
	}
	fuzzOnce.Do(func() {
		ready := make(chan error)
		fl := &fuzzLink{}
		go func() {
			runtime.LockOSThread() // the thread stays in the namespace, parked, for the process's life
			ready <- fl.setUp()
			select {}
		}()
		if fuzzErr = <-ready; fuzzErr == nil {
			fuzzL = fl
		}
	})
	if fuzzErr != nil {
		t.Fatal(fuzzErr)
	}
	return fuzzL
}

func (fl *fuzzLink) setUp() error {
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		return err
	}
	op, err := veth.Open(veth.Options{Name: ifname, MTU: 65520})
	if err != nil {
		return err
	}
	defer op.Close()
	if err := os.WriteFile("/proc/sys/net/ipv6/conf/"+ifname+"/disable_ipv6", []byte("1"), 0); err != nil {
		return err
	}
	if err := tap.Configure(tap.LinkConfig{Name: ifname, MTU: 65520}); err != nil {
		return err
	}
	if fl.dev, err = veth.NewDevice(op.Files); err != nil {
		return err
	}
	ifi, err := net.InterfaceByName(ifname)
	if err != nil {
		return err
	}
	if fl.fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL))); err != nil {
		return err
	}
	if err := unix.SetsockoptInt(fl.fd, unix.SOL_PACKET, unix.PACKET_VNET_HDR, 1); err != nil {
		return err
	}
	unix.SetsockoptInt(fl.fd, unix.SOL_PACKET, unix.PACKET_IGNORE_OUTGOING, 1)
	return unix.Bind(fl.fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index})
}

// sentinel is a well-formed frame of an EtherType no input uses, with
// a zero virtio-net header, that ends each direction's checks.
func sentinel(n uint32) []byte {
	f := make([]byte, vnetHdrLen+ethHdrLen+8)
	copy(f[vnetHdrLen:], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0, 0, 0, 0, 2, 0x88, 0xb6})
	binary.BigEndian.PutUint32(f[vnetHdrLen+ethHdrLen:], n)
	return f
}

func isSentinel(frame []byte) bool {
	return len(frame) >= ethHdrLen+8 && binary.BigEndian.Uint16(frame[12:]) == 0x88b6
}

var sentinels uint32

// FuzzFrames sends the frames an input describes through the link both
// ways (each: a virtio-net header and an Ethernet frame, whatever their
// bytes say), the one way from the sandbox's end into the device's
// reader, the other through the device to the sandbox's end. Whatever the
// kernel takes must come out the other side intact and in order (or not
// at all: it may drop what it cannot forward), nothing else may come out,
// Read never reports more than its buffers hold, and after every input
// the link still carries a frame each way.
func FuzzFrames(f *testing.F) {
	eth := func(proto uint16, payload []byte) []byte {
		b := append([]byte{0x52, 0x55, 0x0a, 0, 2, 2, 0x02, 0, 0, 0, 0, 3}, byte(proto>>8), byte(proto))
		return append(b, payload...)
	}
	hdr := func(flags, gso byte, hdrLen, gsoSize, csumStart, csumOff uint16) []byte {
		h := []byte{flags, gso}
		for _, v := range []uint16{hdrLen, gsoSize, csumStart, csumOff} {
			h = binary.LittleEndian.AppendUint16(h, v)
		}
		return h
	}
	rec := func(toDevice bool, b []byte) []byte {
		op := byte(0)
		if !toDevice {
			op = 1
		}
		return append([]byte{op, byte(len(b) >> 8), byte(len(b))}, b...)
	}
	ipv4 := make([]byte, 20+20+1000)
	ipv4[0], ipv4[9] = 0x45, 6
	binary.BigEndian.PutUint16(ipv4[2:], uint16(len(ipv4)))
	ipv4[32] = 0x50
	f.Add(rec(true, append(hdr(0, 0, 0, 0, 0, 0), eth(0x0800, ipv4)...)))
	f.Add(rec(false, append(hdr(0, 0, 0, 0, 0, 0), eth(0x0800, ipv4)...)))
	f.Add(append(rec(true, append(hdr(1, 1, 54, 500, 34, 16), eth(0x0800, ipv4)...)),
		rec(false, append(hdr(1, 1, 54, 500, 34, 16), eth(0x0800, ipv4)...))...))
	f.Add(rec(true, append(hdr(1, 0, 0, 0, 5000, 16), eth(0x0800, ipv4)...))) // checksum start past the end
	f.Add(rec(false, append(hdr(0, 4, 0, 0, 0, 0), eth(0x86dd, ipv4)...)))    // TCPv6 GSO without NEEDS_CSUM
	f.Add(rec(true, []byte{1, 2, 3}))                                         // shorter than the header
	f.Add(rec(false, hdr(0, 0, 0, 0, 0, 0)))                                  // a header and no frame
	f.Fuzz(func(t *testing.T, in []byte) {
		fl := getFuzzLink(t)
		var toDev, toSandbox [][]byte // frames the kernel took, without their header
		for len(in) >= 3 {
			op, n := in[0], int(binary.BigEndian.Uint16(in[1:]))
			in = in[3:]
			b := in[:min(n, len(in))]
			in = in[len(b):]
			if op&1 == 0 {
				if _, err := unix.Write(fl.fd, b); err == nil && len(b) > vnetHdrLen {
					toDev = append(toDev, b[vnetHdrLen:])
				}
			} else {
				var bufs [][]byte
				if len(b) > vnetHdrLen {
					bufs = [][]byte{b[:vnetHdrLen], b[vnetHdrLen:]}
				} else {
					bufs = [][]byte{b}
				}
				if _, err := fl.dev.Write(bufs); err == nil && len(b) > vnetHdrLen {
					toSandbox = append(toSandbox, b[vnetHdrLen:])
				} else if errors.Is(err, net.ErrClosed) || errors.Is(err, os.ErrClosed) {
					t.Fatalf("a written frame closed the link: %v", err)
				}
			}
		}
		sentinels++
		s := sentinel(sentinels)
		if _, err := unix.Write(fl.fd, s); err != nil {
			t.Fatalf("the sandbox's end no longer sends: %v", err)
		}
		checkOut(t, "from the sandbox's end into the device", toDev, s[vnetHdrLen:], func(buf []byte) (int, error) {
			return readDevice(fl.dev, buf)
		})
		if _, err := fl.dev.Write([][]byte{s[:vnetHdrLen], s[vnetHdrLen:]}); err != nil {
			t.Fatalf("the device no longer sends: %v", err)
		}
		checkOut(t, "from the device to the sandbox's end", toSandbox, s[vnetHdrLen:], func(buf []byte) (int, error) {
			tv := unix.NsecToTimeval(int64(10 * time.Second))
			unix.SetsockoptTimeval(fl.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
			return unix.Read(fl.fd, buf)
		})
	})
}

// readDevice reads a frame from dev, failing after 10 s (the device is
// closed then: no later input could use it).
func readDevice(dev tap.Device, buf []byte) (int, error) {
	stop := time.AfterFunc(10*time.Second, func() { dev.Close() })
	defer stop.Stop()
	n, err := dev.Read([][]byte{buf[:vnetHdrLen], buf[vnetHdrLen:]})
	if n > len(buf) {
		return n, errors.New("Read reported more bytes than its buffers hold")
	}
	return n, err
}

// checkOut reads frames (header first) with read up to the sentinel last
// and checks that those before it are, in order, some of sent.
func checkOut(t *testing.T, what string, sent [][]byte, last []byte, read func([]byte) (int, error)) {
	t.Helper()
	buf := make([]byte, vnetHdrLen+70000)
	next := 0
	for {
		n, err := read(buf)
		if err != nil {
			t.Fatalf("%s: read: %v (the sentinel frame did not come)", what, err)
		}
		if n < vnetHdrLen {
			t.Fatalf("%s: a frame of %d bytes, shorter than its header", what, n)
		}
		frame := buf[vnetHdrLen:n]
		if isSentinel(frame) {
			if !bytes.Equal(frame, last) {
				t.Fatalf("%s: sentinel % x, want % x (an earlier one was late)", what, frame, last)
			}
			return
		}
		for next < len(sent) && !bytes.Equal(sent[next], frame) {
			next++ // dropped by the kernel
		}
		if next == len(sent) {
			t.Fatalf("%s: a frame that was not sent, or out of order: % x", what, frame[:min(len(frame), 64)])
		}
		next++
	}
}
