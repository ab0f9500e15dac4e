package tap

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// inNewNetns runs f on a goroutine whose OS thread has its own network
// namespace; the thread is never returned to Go's pool (it exits with the
// goroutine), so no other goroutine ever runs in that namespace.
func inNewNetns(t *testing.T, f func()) {
	t.Helper()
	if os.Getuid() != 0 {
		t.Fatal("this test creates a network namespace and needs root: run `make test` (as root)")
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread() // never unlocked: the thread dies with this goroutine
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			t.Errorf("unshare(CLONE_NEWNET): %v", err)
			return
		}
		f()
	}()
	<-done
}

func TestOpenConfigureAndExchangeFrames(t *testing.T) {
	for _, vnet := range []bool{false, true} {
		inNewNetns(t, func() {
			dev, err := Open(Options{Name: "gtest0", VNetHdr: vnet})
			if err != nil {
				t.Errorf("Open: %v", err)
				return
			}
			defer dev.File.Close()
			if dev.Name != "gtest0" || dev.VNetHdr != vnet || dev.Offload != vnet {
				t.Errorf("Opened = %+v", dev)
			}
			cfg := LinkConfig{
				Name:    "gtest0",
				MTU:     9000,
				Address: netip.MustParsePrefix("10.0.9.100/24"),
				Gateway: netip.MustParseAddr("10.0.9.2"),
			}
			if err := Configure(cfg); err != nil {
				t.Errorf("Configure: %v", err)
				return
			}
			ifi, err := net.InterfaceByName("gtest0")
			if err != nil {
				t.Error(err)
				return
			}
			if ifi.MTU != 9000 || ifi.Flags&net.FlagUp == 0 {
				t.Errorf("interface = %+v, want MTU 9000 and up", ifi)
			}
			if q, err := txQueueLen("gtest0"); err != nil || q != TxQueueLen {
				t.Errorf("transmit queue length %d, %v; want %d", q, err, TxQueueLen)
			}
			addrs, _ := ifi.Addrs()
			if len(addrs) == 0 || addrs[0].String() != "10.0.9.100/24" {
				t.Errorf("addresses = %v", addrs)
			}
			lo, _ := net.InterfaceByName("lo")
			if lo == nil || lo.Flags&net.FlagUp == 0 {
				t.Errorf("lo is not up: %+v", lo)
			}
			routes, _ := os.ReadFile("/proc/thread-self/net/route")
			// default route: destination 0, gateway 10.0.9.2 (little endian hex)
			if !strings.Contains(string(routes), "gtest0\t00000000\t0209000A") {
				t.Errorf("no default route via 10.0.9.2:\n%s", routes)
			}
			// Configuring again fails clearly (the address exists).
			if err := Configure(cfg); err == nil || !strings.Contains(err.Error(), "add address 10.0.9.100/24 to gtest0") {
				t.Errorf("second Configure: %v", err)
			}

			d, err := NewDevice(dev.File, dev.VNetHdr)
			if err != nil {
				t.Error(err)
				return
			}
			defer d.Close()
			exchangeARP(t, d, ifi.HardwareAddr)
		})
	}
}

// exchangeARP asks the kernel, through the device, who has 10.0.9.100, and
// reads its answer: Write injects a frame, Read returns one.
func exchangeARP(t *testing.T, d Device, kernelMAC net.HardwareAddr) {
	t.Helper()
	ourMAC := net.HardwareAddr{0x02, 0, 0, 0, 0, 0x02}
	frame := make([]byte, 0, 42)
	frame = append(frame, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff)
	frame = append(frame, ourMAC...)
	frame = append(frame, 0x08, 0x06) // ARP
	frame = binary.BigEndian.AppendUint16(frame, 1)
	frame = binary.BigEndian.AppendUint16(frame, 0x0800)
	frame = append(frame, 6, 4, 0, 1) // request
	frame = append(frame, ourMAC...)
	frame = append(frame, 10, 0, 9, 2)
	frame = append(frame, 0, 0, 0, 0, 0, 0)
	frame = append(frame, 10, 0, 9, 100)
	bufs := [][]byte{frame}
	if d.VNetHdr() {
		bufs = [][]byte{make([]byte, VNetHdrLen), frame}
	}
	if _, err := d.Write(bufs); err != nil {
		t.Errorf("Write: %v", err)
		return
	}
	got := make(chan []byte, 1)
	go func() {
		for {
			b := make([]byte, 2048)
			n, err := d.Read([][]byte{b[:100], b[100:]})
			if err != nil {
				got <- nil
				return
			}
			b = b[:n]
			if d.VNetHdr() {
				b = b[VNetHdrLen:]
			}
			// Skip IPv6 noise (router solicitations); keep ARP replies.
			if len(b) >= 42 && b[12] == 0x08 && b[13] == 0x06 && b[21] == 2 {
				got <- b
				return
			}
		}
	}()
	select {
	case b := <-got:
		if b == nil {
			t.Error("device closed before the ARP reply")
			return
		}
		if !bytes.Equal(b[22:28], kernelMAC) || !bytes.Equal(b[28:32], []byte{10, 0, 9, 100}) || !bytes.Equal(b[0:6], ourMAC) {
			t.Errorf("ARP reply = % x", b)
		}
	case <-time.After(5 * time.Second):
		t.Error("no ARP reply from the kernel")
	}
}

// openDevice opens a TAP named name as a Device (no virtio-net header);
// nil, the test failed, if it cannot.
func openDevice(t *testing.T, name string) Device {
	t.Helper()
	dev, err := Open(Options{Name: name})
	if err != nil {
		t.Error(err)
		return nil
	}
	defer dev.File.Close()
	d, err := NewDevice(dev.File, false)
	if err != nil {
		t.Error(err)
		return nil
	}
	return d
}

func TestCloseUnblocksRead(t *testing.T) {
	inNewNetns(t, func() {
		d := openDevice(t, "gtest1")
		if d == nil {
			return
		}
		errc := make(chan error, 1)
		go func() {
			_, err := d.Read([][]byte{make([]byte, 2048)})
			errc <- err
		}()
		time.Sleep(50 * time.Millisecond)
		d.Close()
		select {
		case err := <-errc:
			if !errors.Is(err, os.ErrClosed) {
				t.Errorf("Read after Close: %v, want os.ErrClosed", err)
			}
		case <-time.After(5 * time.Second):
			t.Error("Read still blocked after Close")
		}
		if err := d.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
	})
}

func TestTunOpenError(t *testing.T) {
	cases := []struct {
		err  error
		want []string
	}{
		{unix.EACCES, []string{"permission denied", "sudo chmod 0666 /dev/net/tun", "udev", "--net=none"}},
		{unix.ENOENT, []string{"modprobe tun"}},
		{unix.EIO, []string{"cannot open /dev/net/tun", "input/output error"}},
	}
	for _, c := range cases {
		err := tunOpenError(c.err)
		if !errors.Is(err, ErrTunAccess) {
			t.Errorf("%v: not ErrTunAccess", c.err)
		}
		for _, w := range c.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%v: %q lacks %q", c.err, err, w)
			}
		}
	}
}

func TestBroadcast(t *testing.T) {
	for in, want := range map[string]string{
		"10.0.2.100/24": "10.0.2.255",
		"10.0.2.100/25": "10.0.2.127",
		"10.0.0.5/16":   "10.0.255.255",
	} {
		if got := broadcast(netip.MustParsePrefix(in)).String(); got != want {
			t.Errorf("broadcast(%s) = %s, want %s", in, got, want)
		}
	}
}

// txQueueLen reads an interface's transmit queue length in this thread's
// network namespace (SIOCGIFTXQLEN).
func txQueueLen(name string) (int, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return 0, err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFTXQLEN, ifr); err != nil {
		return 0, err
	}
	return int(ifr.Uint32()), nil
}

// withPollable runs f in a network namespace of its own with the TAP
// device name open, as a Pollable.
func withPollable(t *testing.T, name string, f func(d Device, p Pollable)) {
	inNewNetns(t, func() {
		d := openDevice(t, name)
		if d == nil {
			return
		}
		defer d.Close()
		p, ok := d.(Pollable)
		if !ok {
			t.Error("the TAP device is not Pollable")
			return
		}
		f(d, p)
	})
}

// TestReadNowFromAnEventLoop reads the device as the fast path's event loop
// does: the descriptor waited on in an epoll set of the caller's, frames
// read with ReadNow, EAGAIN when none is there; Close then leaves ReadNow
// and Write with os.ErrClosed.
func TestReadNowFromAnEventLoop(t *testing.T) {
	withPollable(t, "gtest2", func(d Device, p Pollable) {
		b := make([]byte, 2048)
		if _, err := p.ReadNow([][]byte{b}); !errors.Is(err, unix.EAGAIN) {
			t.Errorf("ReadNow with nothing sent: %v, want EAGAIN", err)
		}
		if err := Configure(LinkConfig{Name: "gtest2", MTU: 1500, Address: netip.MustParsePrefix("10.0.10.100/24"), Gateway: netip.MustParseAddr("10.0.10.2")}); err != nil {
			t.Error(err)
			return
		}
		// The kernel sends frames of its own on an interface that comes
		// up (router solicitations, and the ARP for the gateway once
		// something is sent there): wait for any.
		c, err := net.DialTimeout("udp4", "10.0.10.2:9", time.Second)
		if err == nil {
			c.Write([]byte("x"))
			c.Close()
		}
		epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
		if err != nil {
			t.Error(err)
			return
		}
		defer unix.Close(epfd)
		if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, p.FD(), &unix.EpollEvent{Events: unix.EPOLLIN}); err != nil {
			t.Error(err)
			return
		}
		events := make([]unix.EpollEvent, 1)
		if n, err := unix.EpollWait(epfd, events, 5000); err != nil || n != 1 {
			t.Errorf("epoll_wait on the TAP: %d, %v; want it readable", n, err)
			return
		}
		if n, err := p.ReadNow([][]byte{b}); err != nil || n < 14 {
			t.Errorf("ReadNow once readable: %d, %v", n, err)
		}
		unix.EpollCtl(epfd, unix.EPOLL_CTL_DEL, p.FD(), nil)
		d.Close()
		if _, err := p.ReadNow([][]byte{b}); !errors.Is(err, os.ErrClosed) {
			t.Errorf("ReadNow after Close: %v, want os.ErrClosed", err)
		}
		if _, err := d.Write([][]byte{b[:60]}); !errors.Is(err, os.ErrClosed) {
			t.Errorf("Write after Close: %v, want os.ErrClosed", err)
		}
	})
}
