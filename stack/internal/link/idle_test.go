package link

import (
	"runtime"
	"runtime/metrics"
	"sync/atomic"
	"testing"
	"time"
)

// TestIdleCalledOnceTrafficStops: the idle function runs once the device
// has been quiet for a period, not while frames flow, once per quiet
// spell, and never after the device is read no more; the timer, which
// fires once a period while frames flow, starts no goroutine.
func TestIdleCalledOnceTrafficStops(t *testing.T) {
	const after = 50 * time.Millisecond
	dev := &fakeDevice{frames: make(chan []byte, 1)}
	e := New(dev, 1500, ourMAC, nil)
	var calls atomic.Int32
	e.SetIdle(after, func() { calls.Add(1) })
	var rec recorder
	e.Attach(&rec)
	send := func(d time.Duration) { // a frame every after/5 for d
		for end := time.Now().Add(d); time.Now().Before(end); {
			dev.frames <- frame(ourMAC, 60)
			time.Sleep(after / 5)
		}
	}
	runtime.GC() // the collector's own goroutines start at its first cycle
	started := goroutinesStarted()
	send(5 * after)
	if d := goroutinesStarted() - started; d > 1 {
		t.Errorf("%d goroutines started while frames flowed; want none", d)
	}
	if n := calls.Load(); n != 0 {
		t.Errorf("idle called %d times while frames flowed", n)
	}
	time.Sleep(3 * after)
	if n := calls.Load(); n != 1 {
		t.Errorf("idle called %d times after the frames stopped, want 1", n)
	}
	time.Sleep(3 * after)
	if n := calls.Load(); n != 1 {
		t.Errorf("idle called %d times in one quiet spell, want 1", n)
	}
	send(2 * after)
	time.Sleep(3 * after)
	if n := calls.Load(); n != 2 {
		t.Errorf("idle called %d times after a second spell of frames, want 2", n)
	}
	close(dev.frames)
	e.Wait()
	dev2 := &fakeDevice{frames: make(chan []byte, 1)}
	e2 := New(dev2, 1500, ourMAC, nil)
	e2.SetIdle(after, func() { calls.Add(1) })
	e2.Attach(&rec)
	dev2.frames <- frame(ourMAC, 60)
	close(dev2.frames)
	e2.Wait()
	time.Sleep(3 * after)
	if n := calls.Load(); n != 2 {
		t.Errorf("idle called after the device was read no more (%d calls, want 2)", n)
	}
}

// goroutinesStarted is how many goroutines the process has started.
func goroutinesStarted() uint64 {
	s := []metrics.Sample{{Name: "/sched/goroutines-created:goroutines"}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}
