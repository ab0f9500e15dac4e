package flowtable

import (
	"errors"
	"net"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// recorder is a Receiver that reads its socket and keeps what it read.
type recorder struct {
	fd  int
	got chan string
}

func (r *recorder) Receive(buf []byte) {
	for {
		n, err := unix.Read(r.fd, buf)
		if err != nil {
			return
		}
		r.got <- string(buf[:n])
	}
}

// udpPair is a non-blocking UDP socket connected to a net.UDPConn that
// answers it.
func udpPair(t *testing.T) (fd int, peer *net.UDPConn) {
	t.Helper()
	peer, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { peer.Close() })
	fd, err = unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Connect(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}, Port: peer.LocalAddr().(*net.UDPAddr).Port}); err != nil {
		t.Fatal(err)
	}
	return fd, peer
}

// TestAttachedPoller: a poller read by another's event loop hands that
// loop its set's descriptor, which becomes readable when a flow's socket
// is; the drain it hands over calls that flow's Receive, and nothing after
// Close. An attach that fails leaves no poller.
func TestAttachedPoller(t *testing.T) {
	if _, err := NewAttachedPoller(func(int, func()) error { return errors.New("no loop") }); err == nil {
		t.Fatal("NewAttachedPoller succeeded though attach failed")
	}

	// The caller's loop: an epoll set of its own with the poller's set in it.
	loop, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(loop)
	var drain func()
	p, err := NewAttachedPoller(func(fd int, d func()) error {
		drain = d
		return unix.EpollCtl(loop, unix.EPOLL_CTL_ADD, fd, &unix.EpollEvent{Events: unix.EPOLLIN})
	})
	if err != nil {
		t.Fatal(err)
	}
	fd, peer := udpPair(t)
	r := &recorder{fd: fd, got: make(chan string, 4)}
	if _, err := p.Add(fd, r); err != nil {
		t.Fatal(err)
	}
	local, _ := unix.Getsockname(fd)
	if _, err := peer.WriteToUDP([]byte("answer"), &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: local.(*unix.SockaddrInet4).Port}); err != nil {
		t.Fatal(err)
	}
	events := make([]unix.EpollEvent, 1)
	if n, err := unix.EpollWait(loop, events, 5000); err != nil || n != 1 {
		t.Fatalf("the loop's set saw %d events (%v); want the poller's set readable", n, err)
	}
	drain()
	select {
	case got := <-r.got:
		if got != "answer" {
			t.Errorf("Receive read %q", got)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("drain did not call the flow's Receive")
	}
	if n, _ := unix.EpollWait(loop, events, 0); n != 0 {
		t.Error("the poller's set still readable after drain read everything")
	}

	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	peer.WriteToUDP([]byte("late"), &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: local.(*unix.SockaddrInet4).Port})
	drain() // as a loop would for an event already on its way
	select {
	case got := <-r.got:
		t.Errorf("Receive called after Close (read %q)", got)
	case <-time.After(50 * time.Millisecond):
	}
}
