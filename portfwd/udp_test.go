package portfwd

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gonetns/gonetns/port"
)

// udpWhoami answers "whoami" with the sender's address and echoes the rest.
func udpWhoami(t testing.TB, pc *net.UDPConn) netip.AddrPort {
	t.Helper()
	var wg sync.WaitGroup
	wg.Go(func() {
		buf := make([]byte, 65536)
		for {
			n, from, err := pc.ReadFromUDPAddrPort(buf)
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				continue
			}
			reply := buf[:n]
			if string(reply) == "whoami" {
				reply = []byte(from.String())
			}
			pc.WriteToUDPAddrPort(reply, from)
		}
	})
	t.Cleanup(func() { pc.Close(); wg.Wait() })
	return addrOf(pc.LocalAddr())
}

func listenUDP(t testing.TB, addr string) *net.UDPConn {
	t.Helper()
	pc, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.MustParseAddrPort(addr)))
	if err != nil {
		t.Fatal(err)
	}
	return pc
}

func udpClient(t testing.TB, st port.Status) *net.UDPConn {
	t.Helper()
	c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(netip.MustParseAddrPort(hostAddr(st))))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// ask sends msg and waits up to wait for an answer; "" if none came.
func ask(t testing.TB, c *net.UDPConn, msg string, wait time.Duration) string {
	t.Helper()
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 65536)
	c.SetReadDeadline(time.Now().Add(wait))
	n, err := c.Read(buf)
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return ""
		}
		t.Fatal(err)
	}
	return string(buf[:n])
}

// flowCount is the flows of all ports.
func (p *udpPort) flowCount() int { return p.m.udp.Len() }

func udpPortOf(t testing.TB, m *Manager, id int) *udpPort {
	m.mu.Lock()
	defer m.mu.Unlock()
	p, ok := m.ports[id].(*udpPort)
	if !ok {
		t.Fatalf("port %d is no UDP port", id)
	}
	return p
}

// TestUDPIdleFlowEnds: an idle flow ends, and the client's next datagram
// gets a new socket in the namespace.
func TestUDPIdleFlowEnds(t *testing.T) {
	m := newTestManager(t, Config{UDPIdleTimeout: 200 * time.Millisecond})
	st := publishLoop(t, m, "udp4", udpWhoami(t, listenUDP(t, "127.0.0.1:0")))
	c := udpClient(t, st)
	first := ask(t, c, "whoami", 5*time.Second)
	if first == "" {
		t.Fatal("no answer")
	}
	p := udpPortOf(t, m, st.ID)
	deadline := time.Now().Add(10 * time.Second)
	for p.flowCount() != 0 {
		if time.Now().After(deadline) {
			t.Fatal("the idle flow is still there after 50 idle timeouts")
		}
		time.Sleep(20 * time.Millisecond)
	}
	second := ask(t, c, "whoami", 5*time.Second)
	if second == "" || second == first {
		t.Fatalf("after the idle timeout the server saw %q, before %q; want a new source", second, first)
	}
}

// TestUDPFlowLimit: MaxUDPFlows is counted over all published ports; a
// new flow beyond it closes the idlest one, so every client is answered,
// the one whose flow was closed with a new socket inside.
func TestUDPFlowLimit(t *testing.T) {
	m := newTestManager(t, Config{MaxUDPFlows: 1})
	srv := udpWhoami(t, listenUDP(t, "127.0.0.1:0"))
	st, st2 := publishLoop(t, m, "udp4", srv), publishLoop(t, m, "udp4", srv)
	a, b := udpClient(t, st), udpClient(t, st2)
	first := ask(t, a, "whoami", 5*time.Second)
	if first == "" {
		t.Fatal("the first client got no answer")
	}
	if got := ask(t, b, "b", 5*time.Second); got != "b" {
		t.Fatalf("a client beyond MaxUDPFlows got %q, want its echo", got)
	}
	if again := ask(t, a, "whoami", 5*time.Second); again == "" || again == first {
		t.Fatalf("the first client, its flow closed for the second's, is seen as %q (before %q); want an answer from a new socket", again, first)
	}
	if s := m.UDPStats(); s.Flows != 1 || s.Max != 1 || s.Evicted != 2 {
		t.Errorf("stats %+v, want 1 flow of 1 and 2 evicted", s)
	}
}

// TestUDPFlowShare: the flows are shared among client addresses: a client
// that opens flow after flow at the limit closes its own idlest ones, and
// another client's idle flow stays.
func TestUDPFlowShare(t *testing.T) {
	m := newTestManager(t, Config{MaxUDPFlows: 3})
	st := publishLoop(t, m, "udp4", udpWhoami(t, listenUDP(t, "127.0.0.1:0")))
	quiet, err := net.DialUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 2)}, net.UDPAddrFromAddrPort(netip.MustParseAddrPort(hostAddr(st))))
	if err != nil {
		t.Fatal(err)
	}
	defer quiet.Close()
	seen := ask(t, quiet, "whoami", 5*time.Second)
	if seen == "" {
		t.Fatal("the quiet client got no answer")
	}
	for i := range 10 { // 127.0.0.1, from a new port each time
		if got := ask(t, udpClient(t, st), "x", 5*time.Second); got != "x" {
			t.Fatalf("busy client's flow %d: %q", i, got)
		}
	}
	if again := ask(t, quiet, "whoami", 5*time.Second); again != seen {
		t.Fatalf("the quiet client is seen as %q, before %q: its flow was closed for the busy client's", again, seen)
	}
}

// TestUDPQueuedWhileDialing: datagrams that arrive while the flow's socket
// is being dialed are delivered, in order, once it is there.
func TestUDPQueuedWhileDialing(t *testing.T) {
	release := make(chan struct{})
	m := newTestManager(t, Config{Dialer: dialFunc(func(ctx context.Context, proto string, addr netip.AddrPort) (net.Conn, error) {
		<-release
		return netDial(ctx, proto, addr)
	})})
	st := publishLoop(t, m, "udp4", udpWhoami(t, listenUDP(t, "127.0.0.1:0")))
	c := udpClient(t, st)
	for _, s := range []string{"1", "2", "3"} {
		c.Write([]byte(s))
	}
	p := udpPortOf(t, m, st.ID)
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		var queued int
		if f, ok := m.udp.Get(udpKey{port: p.id, client: addrOf(c.LocalAddr())}); ok {
			f.mu.Lock()
			queued = len(f.queue)
			f.mu.Unlock()
		}
		if queued == 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d datagrams queued, want 3", queued)
		}
	}
	close(release)
	buf := make([]byte, 16)
	for _, want := range []string{"1", "2", "3"} {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, err := c.Read(buf)
		if err != nil || string(buf[:n]) != want {
			t.Fatalf("got %q, %v; want %q", buf[:n], err, want)
		}
	}
}

// TestUDPDialFailureRetries: a flow whose dial fails goes away, so the next
// datagram tries again.
func TestUDPDialFailureRetries(t *testing.T) {
	var calls atomic.Int32
	m := newTestManager(t, Config{Dialer: dialFunc(func(ctx context.Context, proto string, addr netip.AddrPort) (net.Conn, error) {
		if calls.Add(1) == 1 {
			return nil, errors.New("the child is busy")
		}
		return netDial(ctx, proto, addr)
	})})
	st := publishLoop(t, m, "udp4", udpWhoami(t, listenUDP(t, "127.0.0.1:0")))
	c := udpClient(t, st)
	deadline := time.Now().Add(5 * time.Second)
	for ask(t, c, "x", 200*time.Millisecond) != "x" {
		if time.Now().After(deadline) {
			t.Fatalf("no answer after the first dial failed (%d dials)", calls.Load())
		}
	}
}

// TestUDPServerStartsLater: nothing listens at first (ICMP port
// unreachable); the flow stays and works once the server is up.
func TestUDPServerStartsLater(t *testing.T) {
	m := newTestManager(t, Config{})
	pc := listenUDP(t, "127.0.0.1:0")
	target := addrOf(pc.LocalAddr())
	pc.Close()
	st := publishLoop(t, m, "udp4", target)
	c := udpClient(t, st)
	if got := ask(t, c, "anyone?", 200*time.Millisecond); got != "" {
		t.Fatalf("an answer from nowhere: %q", got)
	}
	udpWhoami(t, listenUDP(t, target.String()))
	deadline := time.Now().Add(5 * time.Second)
	for ask(t, c, "now?", 200*time.Millisecond) != "now?" {
		if time.Now().After(deadline) {
			t.Fatal("no answer after the server started")
		}
	}
}

// TestUDPFlowMemory: flows hold no receive buffer while they wait (with a
// 64 KiB one each, 1,000 flows are 64 MiB), and the memory goes back once
// they have ended.
func TestUDPFlowMemory(t *testing.T) {
	const flows = 1000
	m := newTestManager(t, Config{MaxUDPFlows: flows, UDPIdleTimeout: time.Hour, Logger: discardLogger})
	st := publishLoop(t, m, "udp4", udpWhoami(t, listenUDP(t, "127.0.0.1:0")))
	heap := func() uint64 {
		runtime.GC()
		runtime.GC() // a second cycle empties sync.Pools
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapInuse + ms.StackInuse // a 64 KiB buffer may live on a goroutine's stack
	}
	big := strings.Repeat("x", 60000) // every flow reads a large datagram once
	before := heap()
	for range flows {
		c := udpClient(t, st)
		if got := ask(t, c, big, 5*time.Second); got != big {
			t.Fatalf("no echo of a large datagram (%d bytes back)", len(got))
		}
	}
	p := udpPortOf(t, m, st.ID)
	if n := p.flowCount(); n != flows {
		t.Fatalf("%d flows, want %d", n, flows)
	}
	during := heap()
	if grown := int64(during) - int64(before); grown > 16<<20 {
		t.Errorf("%d idle flows take %d MiB of heap and stacks, want well under 16 MiB", flows, grown>>20)
	}
	if err := m.RemovePort(st.ID); err != nil { // ends the flows
		t.Fatal(err)
	}
	after := heap()
	if grown := int64(after) - int64(before); grown > 4<<20 {
		t.Errorf("after the flows ended, heap and stacks are still %d MiB above where they were", grown>>20)
	}
	t.Logf("heap and stacks in use: %d MiB before, %d MiB with %d flows, %d MiB after", before>>20, during>>20, flows, after>>20)
}
