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

// testLoop is a Loop: an epoll set of its own, the flows' ids its keys.
type testLoop struct {
	fd      int
	receive func(id uint32)
	refuse  error
}

func (l *testLoop) AttachFlows(receive func(id uint32)) error {
	if l.refuse != nil {
		return l.refuse
	}
	l.receive = receive
	return nil
}

func (l *testLoop) WatchFlow(fd int, id uint32) error {
	return unix.EpollCtl(l.fd, unix.EPOLL_CTL_ADD, fd, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(id)})
}

// TestAttachedPoller: a poller read by another's event loop puts each
// flow's socket into the loop's set under the flow's id; the loop's call
// with that id runs the flow's Receive, and nothing after Close. A loop
// that refuses leaves no poller.
func TestAttachedPoller(t *testing.T) {
	if _, err := NewAttachedPoller(&testLoop{refuse: errors.New("no loop")}); err == nil {
		t.Fatal("NewAttachedPoller succeeded though the loop refused")
	}

	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(epfd)
	loop := &testLoop{fd: epfd}
	p, err := NewAttachedPoller(loop)
	if err != nil {
		t.Fatal(err)
	}
	fd, peer := udpPair(t)
	r := &recorder{fd: fd, got: make(chan string, 4)}
	id, err := p.Add(fd, r)
	if err != nil {
		t.Fatal(err)
	}
	local, _ := unix.Getsockname(fd)
	if _, err := peer.WriteToUDP([]byte("answer"), &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: local.(*unix.SockaddrInet4).Port}); err != nil {
		t.Fatal(err)
	}
	events := make([]unix.EpollEvent, 1)
	if n, err := unix.EpollWait(epfd, events, 5000); err != nil || n != 1 || uint32(events[0].Fd) != id {
		t.Fatalf("the loop's set saw %d events (%v, %+v); want flow %d readable", n, err, events[0], id)
	}
	loop.receive(id)
	select {
	case got := <-r.got:
		if got != "answer" {
			t.Errorf("Receive read %q", got)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the loop's call did not run the flow's Receive")
	}
	if n, _ := unix.EpollWait(epfd, events, 0); n != 0 {
		t.Error("the flow's socket still readable after Receive read everything")
	}
	loop.receive(id + 1) // no such flow: nothing happens

	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	peer.WriteToUDP([]byte("late"), &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: local.(*unix.SockaddrInet4).Port})
	loop.receive(id) // as the loop would while the owner has not closed the flow yet
	select {
	case got := <-r.got:
		t.Errorf("Receive called after Close (read %q)", got)
	case <-time.After(50 * time.Millisecond):
	}
	if _, err := p.Add(fd, r); err == nil {
		t.Error("Add after Close succeeded")
	}
}

// closingLoop is a Loop whose WatchFlow sees the poller closed meanwhile.
type closingLoop struct {
	testLoop
	p *Poller
}

func (l *closingLoop) WatchFlow(fd int, id uint32) error {
	l.p.Close()
	return l.testLoop.WatchFlow(fd, id)
}

// TestAttachedPollerClosedDuringAdd: a flow whose socket joined the loop's
// set while the poller closed is refused, so that its owner closes the
// socket and the loop is not left calling for a flow nobody reads.
func TestAttachedPollerClosedDuringAdd(t *testing.T) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(epfd)
	loop := &closingLoop{testLoop: testLoop{fd: epfd}}
	p, err := NewAttachedPoller(loop)
	if err != nil {
		t.Fatal(err)
	}
	loop.p = p
	fd, _ := udpPair(t)
	if _, err := p.Add(fd, &recorder{fd: fd}); err == nil {
		t.Error("Add succeeded though the poller closed while it ran")
	}
	if n := p.Len(); n != 0 {
		t.Errorf("%d flows left after the refused Add", n)
	}
}
