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
// poller watches, so Run sleeps until some flow's socket is readable. Or
// an event loop of another's reads them (NewAttachedPoller). A flow costs
// a descriptor and an entry here: no goroutine and no buffer of its own.
type Poller struct {
	set  *epoll.Set // the Poller's own, without a Loop
	loop Loop

	buf []byte // an attached poller's, allocated by the loop's first call

	mu     sync.Mutex
	flows  map[uint32]Receiver
	next   uint32
	closed bool
}

// Loop is an event loop that reads a Poller's flows in its own epoll set
// (stack.Stack's, when it runs one). AttachFlows hands it the function to
// call on its thread with the id of each flow whose socket is readable,
// for as long as the socket is (level-triggered), and fails if the loop
// cannot take flows (then the Poller runs on its own); WatchFlow adds a
// flow's socket to its set under the flow's id (below MaxID). Closing the
// socket takes it out.
type Loop interface {
	AttachFlows(receive func(id uint32)) error
	WatchFlow(fd int, id uint32) error
}

// MaxID bounds the ids of a Poller's flows.
const MaxID = 1 << 30

// NewPoller makes the epoll set. It starts nothing: run Run on a goroutine
// of the caller's, and Close to end it.
func NewPoller() (*Poller, error) {
	set, err := epoll.New("flows")
	if err != nil {
		return nil, err
	}
	return &Poller{set: set, flows: make(map[uint32]Receiver)}, nil
}

// NewAttachedPoller makes a Poller read by loop instead of by Run: each
// flow's socket is in the loop's epoll set, and the loop calls the flow's
// Receive on its thread. The flows' owner closes them, which takes them
// out of the loop's set; after Close, the loop's calls for flows still
// there do nothing. Run is not for it.
func NewAttachedPoller(loop Loop) (*Poller, error) {
	p := &Poller{loop: loop, flows: make(map[uint32]Receiver)}
	if err := loop.AttachFlows(p.receive); err != nil {
		return nil, err
	}
	return p, nil
}

// receive is an attached poller's: the loop calls it with the id of a
// flow whose socket is readable.
func (p *Poller) receive(id uint32) {
	if p.buf == nil {
		p.buf = make([]byte, RecvBufSize)
	}
	if r := p.lookup(id); r != nil {
		r.Receive(p.buf)
	}
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
// takes it out of the epoll set); on an error, the caller closes it.
func (p *Poller) Add(fd int, r Receiver) (uint32, error) {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return 0, epoll.ErrClosed
	}
	for {
		p.next = (p.next + 1) % MaxID
		if _, taken := p.flows[p.next]; !taken && p.next != 0 {
			break
		}
	}
	id := p.next
	p.flows[id] = r
	p.mu.Unlock()
	var err error
	if p.loop != nil {
		err = p.loop.WatchFlow(fd, id)
	} else {
		err = p.set.Add(fd, unix.EPOLLIN, id)
	}
	if err == nil {
		p.mu.Lock()
		if p.closed {
			// Closed meanwhile: the caller closes fd, which takes it
			// out of a loop's set that would otherwise keep calling
			// for a flow nobody reads.
			err = epoll.ErrClosed
		}
		p.mu.Unlock()
	}
	if err != nil {
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

// Close ends Run (and the epoll set), or an attached poller's receiving;
// the flows are closed by their owner.
func (p *Poller) Close() error {
	p.mu.Lock()
	p.closed = true
	clear(p.flows)
	p.mu.Unlock()
	if p.set == nil {
		return nil
	}
	return p.set.Close()
}

// Len is the number of flows watched.
func (p *Poller) Len() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.flows)
}
