package main

import (
	"fmt"
	"strings"
	"testing"

	"github.com/gonetns/gonetns/internal/e2etest"
)

// packetLinkSuite is the network's end-to-end tests that run a second time
// on the packet link: everything that goes through the sandbox's link
// (TCP both ways at both MTUs, half-close, slow readers, UDP, ICMP, DNS,
// IPv6, the egress policy, --pcap, --outbound-addr, --detach-netns) and
// published ports with the client's address kept, whose replies are
// routed inside the sandbox's namespace. Left out: what never touches the
// link (the launcher, the API's own tests, the drop-ins for Docker and
// RootlessKit, the implicit port driver).
var packetLinkSuite = []struct {
	name string
	test func(*testing.T)
}{
	{"NetCurlLargeFileBothMTUs", TestNetCurlLargeFileBothMTUs},
	{"NetHalfClose", TestNetHalfClose},
	{"NetUDPEcho", TestNetUDPEcho},
	{"NetUDPBurst", TestNetUDPBurst},
	{"NetUDPSegmentation", TestNetUDPSegmentation},
	{"NetMTURaisedInside", TestNetMTURaisedInside},
	{"NetRefusedIsFast", TestNetRefusedIsFast},
	{"NetPing", TestNetPing},
	{"NetDNS", TestNetDNS},
	{"NetDisableHostLoopback", TestNetDisableHostLoopback},
	{"NetHostSocketsCloseOnExit", TestNetHostSocketsCloseOnExit},
	{"NetBytesLeftAtExitDelivered", TestNetBytesLeftAtExitDelivered},
	{"NetIPv6", TestNetIPv6},
	{"NetSlowReadersDoNotStall", TestNetSlowReadersDoNotStall},
	{"PortsPublishAndAPI", TestPortsPublishAndAPI},
	{"PortsKeepSourceIP", TestPortsKeepSourceIP},
	{"PortsKeepSourceIPDetachNetNS", TestPortsKeepSourceIPDetachNetNS},
	{"DetachNetNS", TestDetachNetNS},
	{"EgressPcap", TestEgressPcap},
	{"EgressDenyLoopback", TestEgressDenyLoopback},
	{"EgressAllowAlone", TestEgressAllowAlone},
	{"EgressDenyPrivateKeepsOwnServices", TestEgressDenyPrivateKeepsOwnServices},
	{"EgressOutboundAddr", TestEgressOutboundAddr},
}

// TestPacketLink runs the network's tests again where /dev/net/tun cannot
// be opened (e2etest.WithoutTun: 0600 for the test user, absent for root),
// so that gonetns, with no flag, takes the packet link; the first subtest
// checks that it does.
func TestPacketLink(t *testing.T) {
	e2etest.WithoutTun(t)
	t.Run("Chosen", func(t *testing.T) {
		for _, r := range e2etest.Both(t) {
			res := r.MustRun(t, netTimeout, "sh", "-c", r.Bin+" ctl info --json | tr -d ' \n'; echo; ip -o link show tap0")
			if !strings.Contains(res.Stdout, `"link":"packet"`) || !strings.Contains(res.Stdout, "tap0@") {
				t.Errorf("%s: /v1/info and ip link inside, without /dev/net/tun:\n%s", r.Name, res)
			}
			if n := strings.Count(res.Stderr, "packet sockets instead"); n != 1 {
				t.Errorf("%s: %d lines say the packet link was taken instead of the TAP, want 1:\n%s", r.Name, n, res.Stderr)
			}
		}
	})
	// The event loop needs the TAP itself: asked for here, it says it
	// has no effect, and the network works as without it.
	t.Run("EventLoopNoEffect", func(t *testing.T) {
		r := e2etest.Unprivileged(t)
		srv := startHostHTTP(t)
		res := r.MustRun(t, netTimeout, "--busy-poll=50us", "sh", "-c", fmt.Sprintf("curl -sS --fail http://10.0.2.2:%d/", srv.port))
		if !strings.Contains(res.Stderr, "--busy-poll has no effect here") || !strings.Contains(res.Stdout, "hello from the host") {
			t.Errorf("--busy-poll on the packet link:\n%s", res)
		}
	})
	for _, tc := range packetLinkSuite {
		t.Run(tc.name, tc.test)
	}
	// The TCP fast path takes its frames from the link before the stack
	// does: downloads and a half-closed upload with it on.
	t.Run("TCPFastPath", func(t *testing.T) {
		r := e2etest.Unprivileged(t)
		srv := startHostHTTP(t)
		echo := startHalfCloseServer(t)
		for _, mtu := range []string{"1500", "65520"} {
			res := r.MustRun(t, netTimeout, "--mtu="+mtu, "sh", "-c", fmt.Sprintf("curl -sS --fail http://10.0.2.2:%d/blob | sha256sum; %s",
				srv.port, e2etest.HelperCmd(t, "tcp-halfclose", fmt.Sprintf("10.0.2.2:%d", echo), "1000000")))
			if !strings.Contains(res.Stdout, srv.sum) || !strings.Contains(res.Stdout, "host read 1000000 bytes") {
				t.Errorf("the TCP fast path at --mtu=%s on the packet link:\n%s", mtu, res)
			}
		}
	})
}
