package flowtable

import (
	"fmt"
	"os"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/rawconn"
)

// Receiver is what the Poller calls when a flow's socket is readable.
type Receiver interface {
	// Receive reads what the socket has, up to a burst (the socket stays
	// ready and is polled again: epoll is level-triggered), and passes it
	// on, with buf as its scratch space, shared by every flow. It must not
	// wait for the socket.
	Receive(buf []byte)
}

// RecvBufSize is the size of the buffer the Poller lends each Receive:
// the largest UDP payload over IPv6 (65,527 bytes) fits.
const RecvBufSize = 64 << 10

// Poller reads the sockets of many flows on one goroutine: their
// descriptors are in an epoll set of its own, whose descriptor Go's
// poller watches, so Run sleeps until some flow's socket is readable. A
// flow costs a descriptor and an entry here: no goroutine and no buffer
// of its own.
type Poller struct {
	ep *os.File
	rc syscall.RawConn

	mu    sync.Mutex
	flows map[uint32]Receiver
	next  uint32
}

// NewPoller makes the epoll set. It starts nothing: run Run on a goroutine
// of the caller's, and Close to end it.
func NewPoller() (*Poller, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll: %w", err)
	}
	// Non-blocking, so that Go's poller takes the descriptor (readable
	// when a flow's socket is).
	if err := unix.SetNonblock(epfd, true); err != nil {
		unix.Close(epfd)
		return nil, fmt.Errorf("epoll: %w", err)
	}
	ep := os.NewFile(uintptr(epfd), "flows")
	rc, err := ep.SyscallConn()
	if err != nil {
		ep.Close()
		return nil, fmt.Errorf("epoll: %w", err)
	}
	return &Poller{ep: ep, rc: rc, flows: make(map[uint32]Receiver)}, nil
}

// Add watches fd, calling r.Receive when it is readable, and returns the
// id to Remove it by. fd must stay open until Remove (closing it also
// takes it out of the epoll set).
func (p *Poller) Add(fd int, r Receiver) (uint32, error) {
	p.mu.Lock()
	for {
		p.next++
		if _, taken := p.flows[p.next]; !taken && p.next != 0 {
			break
		}
	}
	id := p.next
	p.flows[id] = r
	p.mu.Unlock()
	epfd, err := rawconn.FD(p.rc)
	if err == nil {
		ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(id)}
		err = unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, fd, &ev)
	}
	if err != nil {
		p.Remove(id)
		return 0, fmt.Errorf("epoll add: %w", err)
	}
	return id, nil
}

// Remove forgets the flow of id: events for it that are on their way are
// dropped. Close the flow's descriptor after Remove.
func (p *Poller) Remove(id uint32) {
	p.mu.Lock()
	delete(p.flows, id)
	p.mu.Unlock()
}

func (p *Poller) lookup(id uint32) Receiver {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.flows[id]
}

// Run calls the flows' Receive as their sockets become readable, until
// Close.
func (p *Poller) Run() {
	events := make([]unix.EpollEvent, 64)
	buf := make([]byte, RecvBufSize) // one buffer for every flow
	for {
		n, err := rawconn.Read(p.rc, func(fd int) (int, error) {
			n, err := rawconn.EpollPoll(fd, events)
			if err == nil && n == 0 {
				return 0, unix.EAGAIN // nothing ready: wait for the poller
			}
			return n, err
		})
		if err != nil {
			return // closed
		}
		for _, ev := range events[:n] {
			if r := p.lookup(uint32(ev.Fd)); r != nil {
				r.Receive(buf)
			}
		}
	}
}

// Close ends Run (and the epoll set); the flows are closed by their owner.
func (p *Poller) Close() error { return p.ep.Close() }

// Len is the number of flows watched.
func (p *Poller) Len() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.flows)
}
