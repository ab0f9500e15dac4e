package link

import (
	"sync"
	"sync/atomic"
	"time"
)

// idleWatch calls a function once the device has read no frame for a
// while: after traffic stops, not while it flows, and never again until a
// frame comes. Each frame costs two atomic loads; while frames flow the
// timer fires once a period, and when they have stopped, never.
//
// The timer is served by one goroutine for the endpoint's life, not by a
// goroutine per firing (time.AfterFunc): the function is the network
// process's release of memory, which shrinks Go to one P and so frees the
// stacks of the other Ps' finished goroutines, and a goroutine made
// afresh after it took a stack whose pages were often new (pages of the Go
// heap's arena that became resident at a soak's quiet points held this
// goroutine's frames; see timers in stack/internal/tcpfast).
type idleWatch struct {
	after time.Duration
	fn    func()

	active atomic.Bool // a frame came since the timer last fired
	armed  atomic.Bool // the timer is set; the next frame need not set it

	timer   *time.Timer
	quit    chan struct{} // closed by close
	stop    sync.Once
	started atomic.Bool   // serve runs, or is about to (Attach)
	served  chan struct{} // closed when serve returns
}

// SetIdle makes the endpoint call fn, on a goroutine of its own, once no
// frame has come from the device for between after and twice after, and
// then not again until frames have come and stopped again. Call it before
// attaching. Once the device is read no more (ReaderDone), fn is not
// called again, and a call in progress is waited for.
func (e *Endpoint) SetIdle(after time.Duration, fn func()) {
	w := &idleWatch{after: after, fn: fn, timer: time.NewTimer(after),
		quit: make(chan struct{}), served: make(chan struct{})}
	w.timer.Stop()
	e.idle = w
}

// frame notes a frame from the device.
func (w *idleWatch) frame() {
	if !w.active.Load() {
		w.active.Store(true)
	}
	if w.armed.Load() || !w.armed.CompareAndSwap(false, true) {
		return
	}
	w.timer.Reset(w.after)
}

// serve waits for the timer until close: it calls fn if no frame came in
// the last period, else sets the timer again.
func (w *idleWatch) serve() {
	defer close(w.served)
	for {
		select {
		case <-w.quit:
			return
		case <-w.timer.C:
		}
		select {
		case <-w.quit:
			return
		default:
		}
		if w.active.Swap(false) {
			w.timer.Reset(w.after)
			continue
		}
		w.armed.Store(false)
		w.fn()
	}
}

// close stops the timer and serve, and waits for a call of fn in
// progress.
func (w *idleWatch) close() {
	w.stop.Do(func() { close(w.quit) })
	w.timer.Stop()
	if w.started.Load() {
		<-w.served
	}
}
