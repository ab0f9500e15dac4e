package e2etest

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"sync/atomic"
	"testing"
)

// A port of the kernel's ephemeral range that was free a moment ago can be
// taken before the test binds it, as the source port of any connection
// the machine makes (another test's, gonetns's own): "address already in
// use", once in a while. Ports below the range are never handed out that
// way, so FreePort takes them from there, each once per test process.
var nextPort atomic.Int32

// FreePort returns a port under the kernel's ephemeral range that is free
// for TCP and UDP on every address, and that no other caller of FreePort in
// this process gets.
func FreePort(t testing.TB) int {
	t.Helper()
	low, high := 10000, ephemeralLow()-1
	if high-low < 1000 {
		low = 1024
	}
	nextPort.CompareAndSwap(0, int32(low+rand.IntN((high-low)/2)))
	for range high - low {
		p := int(nextPort.Add(1))
		if p > high {
			nextPort.Store(int32(low))
			continue
		}
		if portFree(p) {
			return p
		}
	}
	t.Fatalf("no free port between %d and %d: stop what holds them", low, high)
	return 0
}

func portFree(p int) bool {
	l, err := net.Listen("tcp", fmt.Sprintf(":%d", p))
	if err != nil {
		return false
	}
	defer l.Close()
	c, err := net.ListenPacket("udp", fmt.Sprintf(":%d", p))
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// ephemeralLow is the low end of net.ipv4.ip_local_port_range.
func ephemeralLow() int {
	low := 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		fmt.Sscan(string(b), &low)
	}
	return low
}
