package tcpfast

import (
	"errors"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/gonetns/gonetns/tap"
	"github.com/gonetns/gonetns/tap/taptest"
)

// TestHalfOpenBurst: with the half-open table full, a new SYN evicts the
// oldest handshake only once the link has delivered more frames since its
// SYN-ACK than it can queue, or a second has passed; until then the SYN is dropped, and its
// sender's next try is taken once the handshakes before it completed.
// Before, a burst of connects larger than the table reset connections
// whose ACK was still waiting in the link: the sandbox had them open.
func TestHalfOpenBurst(t *testing.T) {
	const maxHalf, linkQueue = 4, 50
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	to := netip.MustParseAddrPort(ln.Addr().String())
	engineSide, sandbox := taptest.Pipe(true, 1024)
	e, err := New(Config{Device: engineSide, MTU: 1500, MAC: fuzzEngineMAC, MaxHalfOpen: maxHalf, LinkQueue: linkQueue,
		Dial: func(src, dst netip.AddrPort) (Host, error) {
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return Host{}, err
			}
			if err := unix.Connect(fd, &unix.SockaddrInet4{Port: int(to.Port()), Addr: to.Addr().As4()}); err != nil && !errors.Is(err, unix.EINPROGRESS) {
				unix.Close(fd)
				return Host{}, err
			}
			return Host{FD: fd, ConnectTimeout: 10 * time.Second}, nil
		}})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		e.Close()
		sandbox.Close()
	}()
	var mu sync.Mutex
	synAcks := map[uint16]uint32{} // the sandbox's port: the engine's ISN
	resets := map[uint16]int{}
	go readSegments(sandbox, func(_ []byte, _ header.IPv4, tcp header.TCP) {
		mu.Lock()
		defer mu.Unlock()
		switch {
		case tcp.Flags() == flagSYN|flagACK:
			synAcks[tcp.DestinationPort()] = tcp.SequenceNumber()
		case tcp.Flags()&flagRST != 0:
			resets[tcp.DestinationPort()]++
		}
	})
	dst := netip.MustParseAddrPort("192.0.2.7:80")
	from := func(port uint16) netip.AddrPort { return netip.AddrPortFrom(netip.MustParseAddr("10.0.2.100"), port) }
	send := func(port uint16, flags header.TCPFlags, ack uint32) {
		const l2, l3, l4 = header.EthernetMinimumSize, header.IPv4MinimumSize, header.TCPMinimumSize
		b := make([]byte, tap.VNetHdrLen+l2+l3+l4)
		f := b[tap.VNetHdrLen:]
		header.Ethernet(f).Encode(&header.EthernetFields{SrcAddr: fuzzSandboxMAC, DstAddr: fuzzEngineMAC, Type: header.IPv4ProtocolNumber})
		header.IPv4(f[l2:]).Encode(&header.IPv4Fields{TotalLength: l3 + l4, TTL: 64, Protocol: uint8(header.TCPProtocolNumber),
			SrcAddr: tcpip.AddrFrom4(from(port).Addr().As4()), DstAddr: tcpip.AddrFrom4(dst.Addr().As4())})
		seq := uint32(1000)
		if flags&flagSYN == 0 {
			seq++
		}
		header.TCP(f[l2+l3:]).Encode(&header.TCPFields{SrcPort: port, DstPort: dst.Port(), SeqNum: seq, AckNum: ack,
			DataOffset: l4, Flags: flags, WindowSize: 65535})
		e.Handle(b[:tap.VNetHdrLen], f, nil)
	}
	synAcked := func(port uint16) (uint32, bool) {
		var iss uint32
		ok := waitFor(func() bool {
			mu.Lock()
			defer mu.Unlock()
			var ok bool
			iss, ok = synAcks[port]
			return ok
		})
		return iss, ok
	}

	// A burst of 6 SYNs before any ACK: 4 handshakes, 2 SYNs dropped.
	for p := uint16(40001); p <= 40006; p++ {
		send(p, flagSYN, 0)
	}
	for p := uint16(40001); p <= 40004; p++ {
		if _, ok := synAcked(p); !ok {
			t.Fatalf("no SYN-ACK for port %d", p)
		}
	}
	if s := e.Stats(); s.Deferred != 2 || s.Evicted != 0 || s.HalfOpen != 4 || s.PeakHalfOpen != 4 {
		t.Fatalf("after a burst of 6 SYNs with room for 4: %+v; want 2 deferred, none evicted, 4 half-open", s)
	}
	// Their ACKs come (they waited in the link), then the two SYNs again.
	for p := uint16(40001); p <= 40004; p++ {
		iss, _ := synAcked(p)
		send(p, flagACK, iss+1)
	}
	for p := uint16(40005); p <= 40006; p++ {
		send(p, flagSYN, 0)
		if _, ok := synAcked(p); !ok {
			t.Fatalf("the SYN of port %d, sent again, was not taken", p)
		}
	}
	mu.Lock()
	nresets := len(resets)
	mu.Unlock()
	if s := e.Stats(); s.Evicted != 0 || nresets != 0 || s.Open != 6 {
		t.Fatalf("after the burst: %+v, resets to %d ports; want 6 open, none evicted or reset", s, nresets)
	}

	// Handshakes that never complete (a flood's) are evicted once the
	// link has delivered more frames since their SYN-ACK than it queues.
	for p := uint16(40007); p <= 40008; p++ { // 40005, 40006 are still half-open: 4
		send(p, flagSYN, 0)
		synAcked(p)
	}
	for range linkQueue + 1 {
		send(1, flagACK, 0) // a frame of no connection
	}
	send(40009, flagSYN, 0)
	if _, ok := synAcked(40009); !ok {
		t.Fatal("a SYN was not taken in place of a handshake older than the link's queue")
	}
	if !waitFor(func() bool { mu.Lock(); defer mu.Unlock(); return resets[40005] > 0 }) {
		t.Error("the oldest handshake was not reset")
	}
	if s := e.Stats(); s.Evicted != 1 {
		t.Errorf("evicted %d, want 1", s.Evicted)
	}

	// And after a second, whatever the link delivered: a flood that
	// stopped short of the link's queue, or host connects that never
	// complete, kept new connections out until the handshakes' deadline.
	for p := uint16(40010); p <= 40012; p++ { // in place of 40006-40008, older than the queue
		send(p, flagSYN, 0)
		synAcked(p)
	}
	deferred := e.Stats().Deferred
	send(40013, flagSYN, 0) // the table holds 40009-40012, young by both counts
	if s := e.Stats(); s.Deferred != deferred+1 || s.Evicted != 4 {
		t.Fatalf("a SYN with the table full of young handshakes: %+v; want it deferred and 4 evicted", s)
	}
	time.Sleep(handshakeAge + 100*time.Millisecond)
	send(40013, flagSYN, 0) // the sandbox's SYN again
	if _, ok := synAcked(40013); !ok {
		t.Fatal("a SYN was not taken in place of a handshake older than a second")
	}
	if s := e.Stats(); s.Evicted != 5 {
		t.Errorf("evicted %d, want 5", s.Evicted)
	}
}
