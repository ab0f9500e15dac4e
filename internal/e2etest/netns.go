package e2etest

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// ClientNetns is a network namespace the test makes as a stand-in for a
// remote client: a veth pair to the host with addresses from
// 198.18.0.0/15 (RFC 2544 benchmarking) and 2001:db8::/32
// (documentation). Only these, the host's loopback and the sandbox's own
// addresses are ever contacted.
type ClientNetns struct {
	Name      string
	HostIf    string     // the host's end of the veth pair
	HostIP4   netip.Addr // the host's end, where published ports are reached
	ClientIP4 netip.Addr
	HostIP6   netip.Addr
	ClientIP6 netip.Addr
}

// NewClientNetns makes the namespace (as root, with ip(8)) and deletes it
// when the test ends.
func NewClientNetns(t testing.TB) *ClientNetns {
	t.Helper()
	if os.Getuid() != 0 {
		t.Fatalf("making a client network namespace needs root: %s", setupHint)
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Fatalf("ip (iproute2) is not installed: %s", setupHint)
	}
	inUse, _ := net.InterfaceAddrs()
	var n int
	for range 100 {
		n = rand.IntN(512) // a /24 of 198.18.0.0/15
		free := true
		p := netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 18 + byte(n/256), byte(n % 256), 0}), 24)
		for _, a := range inUse {
			if ip, ok := netip.AddrFromSlice(a.(*net.IPNet).IP); ok && p.Contains(ip.Unmap()) {
				free = false
			}
		}
		if free {
			break
		}
	}
	b3, b2 := byte(n%256), byte(18+n/256)
	c := &ClientNetns{
		Name:      fmt.Sprintf("gonetns-e2e-%d-%d", os.Getpid(), n),
		HostIP4:   netip.AddrFrom4([4]byte{198, b2, b3, 1}),
		ClientIP4: netip.AddrFrom4([4]byte{198, b2, b3, 2}),
		HostIP6:   netip.MustParseAddr(fmt.Sprintf("2001:db8:%x::1", n)),
		ClientIP6: netip.MustParseAddr(fmt.Sprintf("2001:db8:%x::2", n)),
	}
	hostIf, clientIf := fmt.Sprintf("gne2e%dh", n), fmt.Sprintf("gne2e%dc", n)
	c.HostIf = hostIf
	ip := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	ip("netns", "add", c.Name)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", c.Name).Run() })
	ip("link", "add", hostIf, "type", "veth", "peer", "name", clientIf, "netns", c.Name)
	t.Cleanup(func() { exec.Command("ip", "link", "del", hostIf).Run() })
	ip("addr", "add", c.HostIP4.String()+"/24", "dev", hostIf)
	ip("addr", "add", c.HostIP6.String()+"/64", "dev", hostIf, "nodad")
	ip("link", "set", hostIf, "up")
	ip("-n", c.Name, "addr", "add", c.ClientIP4.String()+"/24", "dev", clientIf)
	ip("-n", c.Name, "addr", "add", c.ClientIP6.String()+"/64", "dev", clientIf, "nodad")
	ip("-n", c.Name, "link", "set", clientIf, "up")
	ip("-n", c.Name, "link", "set", "lo", "up")
	return c
}

// Command prepares name with args to run inside the namespace, as root.
func (c *ClientNetns) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", c.Name, name}, args...)...)
}

// Output runs name inside the namespace with a time limit and returns its
// combined output.
func (c *ClientNetns) Output(timeout time.Duration, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := c.Command(ctx, name, args...)
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	return string(out), err
}
