// Package taptest provides an in-memory twin of a TAP device: two Devices
// joined back to back, so that a netstack can be tested against a second,
// in-process netstack without a kernel.
package taptest

import (
	"net"
	"sync"

	"github.com/gonetns/gonetns/tap"
)

// Pipe returns two connected devices: a frame written to one is read from
// the other. Both ends use a virtio_net_hdr when vnetHdr is set. Frames are
// copied; up to queue frames wait in each direction before Write blocks.
func Pipe(vnetHdr bool, queue int) (a, b tap.Device) {
	ab := make(chan []byte, queue)
	ba := make(chan []byte, queue)
	done := make(chan struct{})
	var once sync.Once
	closeBoth := func() { once.Do(func() { close(done) }) }
	return &end{in: ba, out: ab, done: done, close: closeBoth, vnet: vnetHdr},
		&end{in: ab, out: ba, done: done, close: closeBoth, vnet: vnetHdr}
}

var _ tap.Device = (*end)(nil)

type end struct {
	in, out chan []byte
	done    chan struct{}
	close   func()
	vnet    bool
}

func (e *end) VNetHdr() bool { return e.vnet }

func (e *end) Read(bufs [][]byte) (int, error) {
	select {
	case f := <-e.in:
		n := 0
		for _, b := range bufs {
			if len(f) == 0 {
				break
			}
			c := copy(b, f)
			f = f[c:]
			n += c
		}
		return n, nil
	case <-e.done:
		return 0, net.ErrClosed
	}
}

func (e *end) Write(bufs [][]byte) (int, error) {
	var f []byte
	for _, b := range bufs {
		f = append(f, b...)
	}
	select {
	case <-e.done:
		return 0, net.ErrClosed
	default:
	}
	select {
	case e.out <- f:
		return len(f), nil
	case <-e.done:
		return 0, net.ErrClosed
	}
}

// Close closes both ends, as unplugging a cable would.
func (e *end) Close() error {
	e.close()
	return nil
}
