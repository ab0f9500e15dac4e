package stack_test

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/gonetns/gonetns/stack"
	"github.com/gonetns/gonetns/stack/stacktest"
	"github.com/gonetns/gonetns/tap"
	"github.com/gonetns/gonetns/tap/taptest"
)

// sniffer passes frames through and copies those the stack writes to a
// channel (without a virtio-net header).
type sniffer struct {
	tap.Device
	written chan []byte
}

func (s *sniffer) Write(bufs [][]byte) (int, error) {
	var f []byte
	for _, b := range bufs {
		f = append(f, b...)
	}
	select {
	case s.written <- f:
	default:
	}
	return s.Device.Write(bufs)
}

// icmpError waits for an ICMPv4 error frame from the stack and returns its
// type and code.
func icmpError(t *testing.T, frames <-chan []byte) (typ, code byte) {
	t.Helper()
	timeout := time.After(5 * time.Second)
	for {
		select {
		case f := <-frames:
			// Ethernet (14) + IPv4 (IHL) + ICMP: type 3 is destination
			// unreachable.
			if len(f) < 14+20+8 || f[12] != 0x08 || f[13] != 0x00 || f[14+9] != 1 {
				continue
			}
			icmp := f[14+int(f[14]&0x0f)*4:]
			if icmp[0] == 3 {
				return icmp[0], icmp[1]
			}
		case <-timeout:
			t.Fatal("the stack sent no ICMP destination unreachable")
		}
	}
}

func sniffedPair(t *testing.T, cfg stack.Config) (*stacktest.Guest, <-chan []byte) {
	t.Helper()
	a, b := taptest.Pipe(false, 1024)
	s := &sniffer{Device: a, written: make(chan []byte, 64)}
	cfg.Device = s
	cfg.MTU = 1500
	cfg.Addresses = []netip.Prefix{netip.PrefixFrom(gateway, 24)}
	st, err := stack.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Start(); err != nil {
		t.Fatal(err)
	}
	g, err := stacktest.NewGuest(b, guestIP, gateway, 1500)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		st.Close()
		g.Close()
	})
	return g, s.written
}

// Prohibit answers with destination unreachable, code 13
// (administratively prohibited); returning false still gives code 3 (port
// unreachable).
func TestUDPProhibit(t *testing.T) {
	var kept *stack.UDPPacket
	g, frames := sniffedPair(t, stack.Config{UDP: func(r *stack.UDPPacket) bool {
		if r.Dst.Port() == 9 {
			return false
		}
		if err := r.Prohibit(); err != nil {
			t.Errorf("Prohibit: %v", err)
		}
		kept = r
		return true
	}})
	for _, c := range []struct {
		port uint16
		code byte
	}{{53, 13}, {9, 3}} {
		u, err := g.DialUDP(netip.AddrPortFrom(remote.Addr(), c.port))
		if err != nil {
			t.Fatal(err)
		}
		u.Write([]byte("x"))
		if typ, code := icmpError(t, frames); typ != 3 || code != c.code {
			t.Errorf("port %d: ICMP type %d code %d, want 3 and %d", c.port, typ, code, c.code)
		}
		u.Close()
	}
	if kept == nil || kept.Prohibit() == nil {
		t.Error("Prohibit after the handler returned did not fail")
	}
}

func TestEchoProhibit(t *testing.T) {
	g, frames := sniffedPair(t, stack.Config{Echo: func(r *stack.EchoRequest) bool {
		if err := r.Prohibit(); err != nil {
			t.Errorf("Prohibit: %v", err)
		}
		return true
	}})
	short, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if _, err := g.Ping(short, remote.Addr(), 1, []byte("x")); err == nil {
		t.Error("a prohibited echo request got a reply")
	}
	if typ, code := icmpError(t, frames); typ != 3 || code != 13 {
		t.Errorf("ICMP type %d code %d, want 3 and 13", typ, code)
	}
}

// A request kept past its handler cannot be prohibited any more (the
// packet is gone).
func TestProhibitAfterHandler(t *testing.T) {
	kept := make(chan *stack.EchoRequest, 1)
	g, _ := sniffedPair(t, stack.Config{Echo: func(r *stack.EchoRequest) bool {
		kept <- r
		return true
	}})
	short, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	g.Ping(short, remote.Addr(), 1, []byte("x"))
	if err := (<-kept).Prohibit(); err == nil {
		t.Error("Prohibit after the handler returned succeeded")
	}
}
