package stack_test

import (
	"context"
	"fmt"
	"io"
	"net/netip"
	"testing"
	"time"

	"github.com/gonetns/gonetns/stack"
	"github.com/gonetns/gonetns/stack/stacktest"
	"github.com/gonetns/gonetns/tap/taptest"
)

// The frames of a TCP stream through the stack and its link endpoint over
// an in-memory device (no kernel): the guest stack plays the sandbox. The
// figure is the stream's payload per second, with and without the
// virtio-net header (host GSO, checksum offload), at the smallest and the
// largest MTU. Run: go test -run='^$' -bench=. ./stack

// benchChunk is what one iteration moves.
const benchChunk = 64 << 10

func benchCases() []struct {
	vnet bool
	mtu  uint32
} {
	return []struct {
		vnet bool
		mtu  uint32
	}{{false, 1500}, {true, 1500}, {false, 65520}, {true, 65520}}
}

// benchStack starts a stack with handler on one end of a pipe and a guest
// on the other.
func benchStack(b *testing.B, vnet bool, mtu uint32, handler func(*stack.TCPRequest)) *stacktest.Guest {
	b.Helper()
	devA, devB := taptest.Pipe(vnet, 1024)
	st, err := stack.New(stack.Config{
		Device:    devA,
		MTU:       mtu,
		Addresses: []netip.Prefix{netip.PrefixFrom(gateway, 24)},
		TCP:       handler,
	})
	if err != nil {
		b.Fatal(err)
	}
	if err := st.Start(); err != nil {
		b.Fatal(err)
	}
	g, err := stacktest.NewGuest(devB, guestIP, gateway, mtu)
	if err != nil {
		st.Close()
		b.Fatal(err)
	}
	b.Cleanup(func() {
		st.Close()
		g.Close()
	})
	return g
}

func benchDial(b *testing.B, g *stacktest.Guest) *stacktest.Conn {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := g.DialTCP(ctx, remote)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	return c
}

// BenchmarkTCPGuestToStack: the sandbox sends, the stack reads (the
// direction of an upload through gonetns).
func BenchmarkTCPGuestToStack(b *testing.B) {
	for _, tc := range benchCases() {
		b.Run(fmt.Sprintf("vnet=%v/mtu=%d", tc.vnet, tc.mtu), func(b *testing.B) {
			received := make(chan int64, 1)
			g := benchStack(b, tc.vnet, tc.mtu, func(r *stack.TCPRequest) {
				c, err := r.Accept()
				if err != nil {
					received <- -1
					return
				}
				defer c.Close()
				n, _ := c.WriteTo(io.Discard)
				received <- n
			})
			c := benchDial(b, g)
			buf := make([]byte, benchChunk)
			b.SetBytes(benchChunk)
			b.ResetTimer()
			for range b.N {
				if _, err := c.Write(buf); err != nil {
					b.Fatal(err)
				}
			}
			c.CloseWrite()
			// Timed until the stack has read everything, not until the
			// guest has buffered it.
			if n := <-received; n != int64(b.N)*benchChunk {
				b.Fatalf("stack received %d bytes, want %d", n, int64(b.N)*benchChunk)
			}
		})
	}
}

// BenchmarkTCPStackToGuest: the stack sends, the sandbox reads (a
// download through gonetns).
func BenchmarkTCPStackToGuest(b *testing.B) {
	for _, tc := range benchCases() {
		b.Run(fmt.Sprintf("vnet=%v/mtu=%d", tc.vnet, tc.mtu), func(b *testing.B) {
			total := int64(b.N) * benchChunk
			g := benchStack(b, tc.vnet, tc.mtu, func(r *stack.TCPRequest) {
				c, err := r.Accept()
				if err != nil {
					return
				}
				defer c.Close()
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
			})
			c := benchDial(b, g)
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
