package dns

import (
	"encoding/binary"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
)

// Forwarding one query: a client on 127.0.0.1 asks the Server (on
// loopback sockets, as in the tests; in gonetns they are netstack
// sockets), which forwards it to an upstream on 127.0.0.1 and relays the
// answer. Run: go test -run='^$' -bench=. ./dns

// benchUpstream runs a miekg/dns server on 127.0.0.1 (UDP and TCP on one
// port) answering from the test zone.
func benchUpstream(b *testing.B) netip.AddrPort {
	b.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	pc, err := net.ListenPacket("udp4", ln.Addr().String())
	if err != nil {
		ln.Close()
		b.Fatalf("UDP on the TCP listener's port: %v", err)
	}
	for _, srv := range []*mdns.Server{
		{PacketConn: pc, Handler: mdns.HandlerFunc(zone)},
		{Listener: ln, Handler: mdns.HandlerFunc(zone)},
	} {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		done := make(chan struct{})
		go func() {
			defer close(done)
			srv.ActivateAndServe()
		}()
		<-started
		b.Cleanup(func() {
			srv.Shutdown()
			<-done
		})
	}
	return netip.MustParseAddrPort(ln.Addr().String())
}

// benchServer starts a Server forwarding to upstream and returns its UDP
// and TCP addresses.
func benchServer(b *testing.B, upstream netip.AddrPort) (udpAddr, tcpAddr string) {
	b.Helper()
	s, err := New(Config{Upstreams: []netip.AddrPort{upstream}})
	if err != nil {
		b.Fatal(err)
	}
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		pc.Close()
		b.Fatal(err)
	}
	s.Start(pc, ln)
	b.Cleanup(func() { s.Close() })
	return pc.LocalAddr().String(), ln.Addr().String()
}

func benchQuery(b *testing.B) []byte {
	b.Helper()
	q, err := query("a.example.", mdns.TypeA).Pack()
	if err != nil {
		b.Fatal(err)
	}
	return q
}

// benchCheck fails unless a is the answer to q (same ID, one A record).
func benchCheck(b *testing.B, q, a []byte) {
	var m mdns.Msg
	if err := m.Unpack(a); err != nil {
		b.Fatalf("answer does not parse: %v", err)
	}
	if m.Id != binary.BigEndian.Uint16(q) || len(m.Answer) != 1 {
		b.Fatalf("wrong answer: %v", &m)
	}
}

// BenchmarkForwardUDP: one query at a time over UDP, end to end.
func BenchmarkForwardUDP(b *testing.B) {
	udpAddr, _ := benchServer(b, benchUpstream(b))
	c, err := net.Dial("udp4", udpAddr)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	q := benchQuery(b)
	buf := make([]byte, 4096)
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		binary.BigEndian.PutUint16(q, uint16(i))
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write(q); err != nil {
			b.Fatal(err)
		}
		n, err := c.Read(buf)
		if err != nil {
			b.Fatal(err)
		}
		benchCheck(b, q, buf[:n])
	}
}

// BenchmarkForwardTCP: one query at a time on one TCP connection (the
// Server forwards each over a fresh TCP connection upstream).
func BenchmarkForwardTCP(b *testing.B) {
	_, tcpAddr := benchServer(b, benchUpstream(b))
	c, err := net.Dial("tcp4", tcpAddr)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	q := benchQuery(b)
	msg := make([]byte, 2+len(q))
	binary.BigEndian.PutUint16(msg, uint16(len(q)))
	copy(msg[2:], q)
	buf := make([]byte, 65535)
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		binary.BigEndian.PutUint16(msg[2:], uint16(i))
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write(msg); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf[:2]); err != nil {
			b.Fatal(err)
		}
		n := int(binary.BigEndian.Uint16(buf))
		if _, err := io.ReadFull(c, buf[:n]); err != nil {
			b.Fatal(err)
		}
		benchCheck(b, msg[2:], buf[:n])
	}
}
