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
type idleWatch struct {
	after time.Duration
	fn    func()

	active atomic.Bool // a frame came since the timer last fired
	armed  atomic.Bool // the timer is set; the next frame need not set it

	mu      sync.Mutex
	timer   *time.Timer
	stop    bool
	running sync.WaitGroup // a call of fn
}

// SetIdle makes the endpoint call fn, on a goroutine of its own, once no
// frame has come from the device for between after and twice after, and
// then not again until frames have come and stopped again. Call it before
// attaching. Once the device is read no more (ReaderDone), fn is not
// called again, and a call in progress is waited for.
func (e *Endpoint) SetIdle(after time.Duration, fn func()) {
	e.idle = &idleWatch{after: after, fn: fn}
}

// frame notes a frame from the device.
func (w *idleWatch) frame() {
	if !w.active.Load() {
		w.active.Store(true)
	}
	if w.armed.Load() || !w.armed.CompareAndSwap(false, true) {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.stop {
		return
	}
	if w.timer == nil {
		w.timer = time.AfterFunc(w.after, w.fire)
	} else {
		w.timer.Reset(w.after)
	}
}

// fire runs when the timer fires: fn if no frame came in the last period,
// else the timer is set again.
func (w *idleWatch) fire() {
	w.mu.Lock()
	if w.stop {
		w.mu.Unlock()
		return
	}
	if w.active.Swap(false) {
		w.timer.Reset(w.after)
		w.mu.Unlock()
		return
	}
	w.armed.Store(false)
	w.running.Add(1)
	w.mu.Unlock()
	defer w.running.Done()
	w.fn()
}

// close stops the timer and waits for a call of fn in progress.
func (w *idleWatch) close() {
	w.mu.Lock()
	w.stop = true
	if w.timer != nil {
		w.timer.Stop()
	}
	w.mu.Unlock()
	w.running.Wait()
}
