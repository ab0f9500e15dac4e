package portfwd_test

import (
	"context"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/gonetns/gonetns/internal/wire"
	"github.com/gonetns/gonetns/portfwd"
	"github.com/gonetns/gonetns/portfwd/portfwdtest"
)

// wireChild runs the real dial protocol in this process: ServeChild on one
// end of a wire socket pair, a Dialer on the other. No namespaces: "inside"
// is this network namespace.
func wireChild(t *testing.T) portfwdtest.Child {
	a, b, err := wire.Socketpair()
	if err != nil {
		t.Fatal(err)
	}
	parentEnd, err := wire.FileConn(a)
	a.Close()
	if err != nil {
		t.Fatal(err)
	}
	childEnd, err := wire.FileConn(b)
	b.Close()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	log := portfwdtest.Logger(t).With("side", "child")
	go func() { served <- portfwd.ServeChild(ctx, childEnd, portfwd.ChildConfig{Logger: log}) }()
	d := portfwd.NewDialer(parentEnd)
	d.Start()
	t.Cleanup(func() {
		if err := d.Close(); err != nil {
			t.Errorf("Dialer.Close: %v", err)
		}
		// The child sees EOF and returns; cancel is for a failure path.
		if err := <-served; err != nil {
			t.Errorf("ServeChild: %v", err)
		}
		cancel()
		portfwdtest.CheckNoGoroutines(t, anyPortfwdGoroutine)
	})
	return portfwdtest.Child{Dialer: d, Listen: net.Listen, ListenPacket: net.ListenPacket}
}

// anyPortfwdGoroutine matches a goroutine running code of package portfwd
// (not of its tests).
func anyPortfwdGoroutine(stack string) bool {
	return strings.Contains(stack, "github.com/gonetns/gonetns/portfwd.")
}

func TestConformanceWireProtocol(t *testing.T) {
	portfwdtest.Run(t, wireChild)
}

// netDialer is the plain in-process ChildDialer: a net.Dialer.
type netDialer struct{}

func (netDialer) Dial(ctx context.Context, proto string, addr, _ netip.AddrPort) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, proto, addr.String())
}

func TestConformanceInProcessDialer(t *testing.T) {
	portfwdtest.Run(t, func(t *testing.T) portfwdtest.Child {
		return portfwdtest.Child{Dialer: netDialer{}, Listen: net.Listen, ListenPacket: net.ListenPacket}
	})
}
