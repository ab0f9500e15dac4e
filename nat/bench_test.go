package nat

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/gonetns/gonetns/stack"
	"github.com/gonetns/gonetns/stack/stacktest"
	"github.com/gonetns/gonetns/tap/taptest"
)

// A TCP stream relayed by the NAT between a netstack connection (the
// guest stack plays the sandbox, over an in-memory device with the
// virtio-net header, as gonetns runs) and a real host socket on
// 127.0.0.1, both ways. Run: go test -run='^$' -bench=. ./nat

const benchChunk = 64 << 10

// benchNAT is newFixture for benchmarks, at a given MTU.
func benchNAT(b *testing.B, mtu uint32) *stacktest.Guest {
	b.Helper()
	n, err := New(Config{Subnet: subnet, Gateway: gateway, HostLoopback: true})
	if err != nil {
		b.Fatal(err)
	}
	devA, devB := taptest.Pipe(true, 1024)
	st, err := stack.New(stack.Config{
		Device:    devA,
		MTU:       mtu,
		Addresses: []netip.Prefix{netip.PrefixFrom(gateway, 24)},
		TCP:       n.HandleTCP,
		UDP:       n.HandleUDP,
	})
	if err != nil {
		b.Fatal(err)
	}
	if err := st.Start(); err != nil {
		b.Fatal(err)
	}
	n.Start()
	g, err := stacktest.NewGuest(devB, guestIP, gateway, mtu)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		n.Close()
		st.Close()
		g.Close()
	})
	return g
}

// benchServer runs handle for the one connection it accepts on
// 127.0.0.1 and returns the address the guest reaches it by.
func benchServer(b *testing.B, handle func(*net.TCPConn)) netip.AddrPort {
	b.Helper()
	l, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		b.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		c, err := l.AcceptTCP()
		if err != nil {
			return
		}
		defer c.Close()
		handle(c)
	}()
	b.Cleanup(func() { l.Close(); wg.Wait() })
	return netip.AddrPortFrom(gateway, l.Addr().(*net.TCPAddr).AddrPort().Port())
}

func benchDial(b *testing.B, g *stacktest.Guest, addr netip.AddrPort) *stacktest.Conn {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := g.DialTCP(ctx, addr)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	return c
}

// BenchmarkTCPRelayGuestToHost: the sandbox sends to a host socket.
func BenchmarkTCPRelayGuestToHost(b *testing.B) {
	for _, mtu := range []uint32{1500, 65520} {
		b.Run(fmt.Sprintf("mtu=%d", mtu), func(b *testing.B) {
			g := benchNAT(b, mtu)
			received := make(chan int64, 1)
			addr := benchServer(b, func(c *net.TCPConn) {
				n, _ := io.Copy(io.Discard, c)
				received <- n
			})
			c := benchDial(b, g, addr)
			buf := make([]byte, benchChunk)
			b.SetBytes(benchChunk)
			b.ResetTimer()
			for range b.N {
				if _, err := c.Write(buf); err != nil {
					b.Fatal(err)
				}
			}
			c.CloseWrite()
			if n := <-received; n != int64(b.N)*benchChunk {
				b.Fatalf("host received %d bytes, want %d", n, int64(b.N)*benchChunk)
			}
		})
	}
}

// BenchmarkTCPRelayHostToGuest: a host socket sends to the sandbox.
func BenchmarkTCPRelayHostToGuest(b *testing.B) {
	for _, mtu := range []uint32{1500, 65520} {
		b.Run(fmt.Sprintf("mtu=%d", mtu), func(b *testing.B) {
			g := benchNAT(b, mtu)
			total := int64(b.N) * benchChunk
			addr := benchServer(b, func(c *net.TCPConn) {
				// Wait for the guest's go, so the timer covers the stream only.
				if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
					return
				}
				buf := make([]byte, benchChunk)
				for range b.N {
					if _, err := c.Write(buf); err != nil {
						return
					}
				}
				c.CloseWrite()
				io.Copy(io.Discard, c)
			})
			c := benchDial(b, g, addr)
			b.SetBytes(benchChunk)
			b.ResetTimer()
			if _, err := c.Write([]byte{1}); err != nil {
				b.Fatal(err)
			}
			n, err := io.Copy(io.Discard, c)
			if err != nil || n != total {
				b.Fatalf("guest received %d bytes (%v), want %d", n, err, total)
			}
		})
	}
}
