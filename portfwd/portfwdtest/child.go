package portfwdtest

import (
	"context"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/gonetns/gonetns/internal/wire"
	"github.com/gonetns/gonetns/portfwd"
)

// WireChild runs the real dial protocol in this process: ServeChild on one
// end of a wire socket pair, a Dialer on the other. No namespaces:
// "inside" is this network namespace. The cleanup checks that both ends
// stop and leave no goroutine.
func WireChild(t *testing.T) Child {
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
	log := Logger(t).With("side", "child")
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
		CheckNoGoroutines(t, anyPortfwdGoroutine)
	})
	return Child{Dialer: d, Listen: net.Listen, ListenPacket: net.ListenPacket}
}

// anyPortfwdGoroutine matches a goroutine running code of package portfwd
// (not of its tests).
func anyPortfwdGoroutine(stack string) bool {
	return strings.Contains(stack, "github.com/gonetns/gonetns/portfwd.")
}

// InProcessChild is the plain in-process child: a net.Dialer in this
// network namespace.
func InProcessChild(*testing.T) Child {
	return Child{Dialer: netDialer{}, Listen: net.Listen, ListenPacket: net.ListenPacket}
}

type netDialer struct{}

func (netDialer) Dial(ctx context.Context, proto string, addr, _ netip.AddrPort) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, proto, addr.String())
}
