package flowtable

import (
	"sync"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/epoll"
)

// Receiver is what the Poller calls when a flow's socket is readable.
type Receiver interface {
	// Receive reads what the socket has, up to a burst (the socket stays
	// ready and is polled again: epoll is level-triggered), and passes it
	// on, with buf as its scratch space, shared by every flow. It must not
	// wait for the socket.
	Receive(buf []byte)
}

// DatagramMax holds the largest UDP payload over IPv6 (65,527 bytes).
const DatagramMax = 64 << 10

// RecvBufSize is the size of the buffer the Poller lends each Receive:
// two of the largest datagrams, for a Receive that reads two at a time
// (see nat's), so that one read tells it the socket is empty.
const RecvBufSize = 2 * DatagramMax

// Poller reads the sockets of many flows on one goroutine: their
// descriptors are in an epoll set (internal/epoll) whose descriptor Go's
// poller watches, so Run sleeps until some flow's socket is readable. A
// flow costs a descriptor and an entry here: no goroutine and no buffer
// of its own.
type Poller struct {
	set *epoll.Set

	// An attached poller's (NewAttachedPoller): what drain reads with,
	// allocated by its first call (only the loop's thread calls it).
	events []unix.EpollEvent
	buf    []byte

	mu    sync.Mutex
	flows map[uint32]Receiver
	next  uint32
}

// NewPoller makes the epoll set. It starts nothing: run Run on a goroutine
// of the caller's, and Close to end it.
func NewPoller() (*Poller, error) {
	set, err := epoll.New("flows")
	if err != nil {
		return nil, err
	}
	return &Poller{set: set, flows: make(map[uint32]Receiver)}, nil
}

// NewAttachedPoller makes a Poller read by an event loop of the caller's
// instead of by Run: attach is given the descriptor of the Poller's epoll
// set, to watch in the loop's own set, and the function the loop is to
// call on its thread whenever that descriptor is readable; it reads what
// is ready without waiting. The set is closed with Close (which also takes
// it out of the loop's set); Run is not for it.
func NewAttachedPoller(attach func(fd int, drain func()) error) (*Poller, error) {
	set, err := epoll.NewBlocking("flows")
	if err != nil {
		return nil, err
	}
	p := &Poller{set: set, flows: make(map[uint32]Receiver)}
	if err := attach(set.FD(), p.drain); err != nil {
		set.Close()
		return nil, err
	}
	return p, nil
}

// drain calls the Receive of the flows whose sockets are readable now.
func (p *Poller) drain() {
	if p.events == nil {
		p.events = make([]unix.EpollEvent, 64)
		p.buf = make([]byte, RecvBufSize)
	}
	n, err := p.set.Poll(p.events)
	if err != nil {
		return // closed
	}
	p.dispatch(p.events[:n], p.buf)
}

// dispatch calls Receive for each flow of events.
func (p *Poller) dispatch(events []unix.EpollEvent, buf []byte) {
	for i := range events {
		if r := p.lookup(epoll.Key(&events[i])); r != nil {
			r.Receive(buf)
		}
	}
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
	if err := p.set.Add(fd, unix.EPOLLIN, id); err != nil {
		p.Remove(id)
		return 0, err
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
		n, err := p.set.Wait(events)
		if err != nil {
			return // closed
		}
		p.dispatch(events[:n], buf)
	}
}

// Close ends Run (and the epoll set); the flows are closed by their owner.
func (p *Poller) Close() error { return p.set.Close() }

// Len is the number of flows watched.
func (p *Poller) Len() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.flows)
}
