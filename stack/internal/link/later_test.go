package link

import (
	"strings"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

var (
	stackAddr = tcpip.AddrFrom4([4]byte{10, 0, 2, 2})
	guestAddr = tcpip.AddrFrom4([4]byte{10, 0, 2, 100})
)

// segment builds a TCP segment from the stack to the guest as gVisor
// hands it to WritePackets: network and transport headers pushed, the
// payload as data.
func segment(sport uint16, flags header.TCPFlags, ack uint32, payload int) *stack.PacketBuffer {
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
		ReserveHeaderBytes: header.EthernetMinimumSize + header.IPv4MinimumSize + header.TCPMinimumSize,
		Payload:            buffer.MakeWithData(make([]byte, payload)),
	})
	tcp := header.TCP(pkt.TransportHeader().Push(header.TCPMinimumSize))
	tcp.Encode(&header.TCPFields{SrcPort: 80, DstPort: sport, SeqNum: 1, AckNum: ack, DataOffset: header.TCPMinimumSize, Flags: flags, WindowSize: 1000})
	pkt.TransportProtocolNumber = header.TCPProtocolNumber
	ip := header.IPv4(pkt.NetworkHeader().Push(header.IPv4MinimumSize))
	ip.Encode(&header.IPv4Fields{TotalLength: uint16(header.IPv4MinimumSize + header.TCPMinimumSize + payload), TTL: 64,
		Protocol: uint8(header.TCPProtocolNumber), SrcAddr: stackAddr, DstAddr: guestAddr})
	pkt.NetworkProtocolNumber = header.IPv4ProtocolNumber
	pkt.EgressRoute.RemoteLinkAddress = "\x02\x00\x00\x00\x00\x64"
	return pkt
}

// running is an endpoint whose reader and writer goroutines run; stop
// ends them.
func running(t *testing.T) (e *Endpoint, dev *fakeDevice, stop func()) {
	dev = &fakeDevice{frames: make(chan []byte)}
	e = New(dev, 1500, ourMAC, nil)
	e.Attach(&recorder{})
	stopped := false
	stop = func() {
		if !stopped {
			stopped = true
			close(dev.frames)
			e.Wait()
		}
	}
	t.Cleanup(stop)
	return e, dev, stop
}

func write(t *testing.T, e *Endpoint, pkts ...*stack.PacketBuffer) {
	t.Helper()
	var l stack.PacketBufferList
	for _, p := range pkts {
		e.AddHeader(p)
		l.PushBack(p)
	}
	if n, err := e.WritePackets(l); n != len(pkts) || err != nil {
		t.Fatalf("WritePackets = %d, %v", n, err)
	}
	l.DecRef()
}

// written returns the flags (and +data) of the frames
// written so far.
func written(dev *fakeDevice) (out []string) {
	dev.mu.Lock()
	defer dev.mu.Unlock()
	for _, f := range dev.written {
		tcp := header.TCP(f[header.EthernetMinimumSize+header.IPv4MinimumSize:])
		s := strings.ReplaceAll(tcp.Flags().String(), " ", "")
		if len(tcp) > header.TCPMinimumSize {
			s += "+data"
		}
		out = append(out, s)
	}
	return out
}

func waitFrames(t *testing.T, dev *fakeDevice, n int) []string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := written(dev)
		if len(got) >= n || time.Now().After(deadline) {
			return got
		}
		time.Sleep(time.Millisecond)
	}
}

// In a request/response exchange the ACK of the request is dropped when
// the response, which carries it, goes out first.
func TestResponseCarriesTheACK(t *testing.T) {
	e, dev, _ := running(t)
	write(t, e, segment(1000, header.TCPFlagAck|header.TCPFlagPsh, 100, 5)) // a response
	write(t, e, segment(1000, header.TCPFlagAck, 110, 0))                   // ACK of the next request: held
	write(t, e, segment(1000, header.TCPFlagAck|header.TCPFlagPsh, 110, 5)) // its response
	got := written(dev)
	if len(got) != 2 || got[0] != "PA+data" || got[1] != "PA+data" {
		t.Errorf("frames %q, want the two responses only", got)
	}
	e.later.mu.Lock()
	armed := !e.later.armed.IsZero()
	e.later.mu.Unlock()
	if armed {
		t.Error("the timer is still armed with nothing held")
	}
}

// A held ACK with no response to carry it goes out by itself.
func TestHeldACKGoesOutAlone(t *testing.T) {
	e, dev, _ := running(t)
	write(t, e, segment(1001, header.TCPFlagAck, 100, 7))
	write(t, e, segment(1001, header.TCPFlagAck, 120, 0))
	if got := waitFrames(t, dev, 2); len(got) != 2 || got[1] != "A" {
		t.Errorf("frames %q, want the data then the held ACK", got)
	}
}

// ACKs that do not move the acknowledgement forward (duplicates, window
// updates) and the ACKs of a flow we only receive on go out at once.
func TestOtherACKsAreNotHeld(t *testing.T) {
	e, dev, _ := running(t)
	write(t, e, segment(1002, header.TCPFlagAck, 100, 0)) // a receiver's ACKs
	write(t, e, segment(1002, header.TCPFlagAck, 200, 0))
	write(t, e, segment(1003, header.TCPFlagAck, 100, 9)) // data, then a duplicate ACK
	write(t, e, segment(1003, header.TCPFlagAck, 100, 0))
	if got := written(dev); len(got) != 4 {
		t.Errorf("frames %q, want all four at once", got)
	}
}

// A SYN-ACK is written by the writer goroutine, and what the flow sends
// next follows it.
func TestSYNACKFromTheWriter(t *testing.T) {
	e, dev, _ := running(t)
	e.later.mu.Lock() // the writer cannot take the queue yet
	go func() {
		time.Sleep(10 * time.Millisecond)
		e.later.mu.Unlock()
	}()
	var l stack.PacketBufferList
	for _, p := range []*stack.PacketBuffer{
		segment(1004, header.TCPFlagSyn|header.TCPFlagAck, 1, 0),
		segment(1004, header.TCPFlagRst, 1, 0),
	} {
		e.AddHeader(p)
		l.PushBack(p)
	}
	// deferWrite takes the lock the goroutine above holds for a moment.
	if n, err := e.WritePackets(l); n != 2 || err != nil {
		t.Fatalf("WritePackets = %d, %v", n, err)
	}
	l.DecRef()
	if got := waitFrames(t, dev, 2); len(got) != 2 || got[0] != "SA" || got[1] != "R" {
		t.Errorf("frames %q, want the SYN-ACK then the RST", got)
	}
}

// Without the writer goroutine (not attached, or stopped) nothing is held.
func TestNothingHeldWithoutTheWriter(t *testing.T) {
	e, dev, stop := running(t)
	stop()
	write(t, e, segment(1005, header.TCPFlagAck, 100, 5))
	write(t, e, segment(1005, header.TCPFlagAck, 110, 0))
	write(t, e, segment(1005, header.TCPFlagSyn|header.TCPFlagAck, 1, 0))
	if got := written(dev); len(got) != 3 {
		t.Errorf("frames %q, want all three written at once", got)
	}
}
