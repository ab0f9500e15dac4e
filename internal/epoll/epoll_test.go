package epoll

import (
	"errors"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func pipe(t *testing.T) (r, w int) {
	t.Helper()
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(p[0]); unix.Close(p[1]) })
	return p[0], p[1]
}

// TestBlockingSet: Poll and WaitFor return a member's events with its key, times
// out with none (to the sub-millisecond: the held ACKs' 500 µs rely on
// it), returns at once after Wake, and returns ErrClosed to a waiter when
// the set is closed.
func TestBlockingSet(t *testing.T) {
	s, err := NewBlocking("test")
	if err != nil {
		t.Fatal(err)
	}
	r, w := pipe(t)
	if err := s.Add(r, unix.EPOLLIN, ReservedKey); err == nil {
		t.Error("Add with the reserved key succeeded")
	}
	if err := s.Add(r, unix.EPOLLIN, 7); err != nil {
		t.Fatal(err)
	}
	events := make([]unix.EpollEvent, 4)

	start := time.Now()
	n, err := s.WaitFor(events, 300*time.Microsecond)
	if took := time.Since(start); err != nil || n != 0 || took < 300*time.Microsecond || (!noPwait2.Load() && took > 50*time.Millisecond) {
		t.Errorf("WaitFor with nothing ready: %d, %v after %v; want 0, nil after 300µs", n, err, took)
	}

	if n, err := s.Poll(events); err != nil || n != 0 {
		t.Errorf("Poll with nothing ready: %d, %v; want 0, nil", n, err)
	}
	unix.Write(w, []byte("x"))
	if n, err := s.Poll(events); err != nil || n != 1 || Key(&events[0]) != 7 {
		t.Errorf("Poll with the pipe readable: %d, %v, %+v", n, err, events[0])
	}
	if n, err := s.WaitFor(events, -1); err != nil || n != 1 || Key(&events[0]) != 7 || events[0].Events&unix.EPOLLIN == 0 {
		t.Errorf("WaitFor with the pipe readable: %d, %v, %+v", n, err, events[0])
	}
	var b [8]byte
	unix.Read(r, b[:])

	s.Wake()
	if n, err := s.Poll(events); err != nil || n != 0 {
		t.Errorf("Poll after Wake: %d, %v; want 0, nil (the wake-up is no member)", n, err)
	}
	s.Wake()
	if n, err := s.WaitFor(events, -1); err != nil || n != 0 {
		t.Errorf("WaitFor after Wake: %d, %v; want 0, nil", n, err)
	}

	errc := make(chan error, 1)
	go func() {
		_, err := s.WaitFor(events, -1)
		errc <- err
	}()
	time.Sleep(20 * time.Millisecond)
	if err := s.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	// Close returns once WaitFor has; the goroutine's send comes after.
	select {
	case err := <-errc:
		if !errors.Is(err, ErrClosed) {
			t.Errorf("WaitFor across Close: %v, want ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Error("WaitFor still waiting after Close")
	}
	if _, err := s.WaitFor(events, -1); !errors.Is(err, ErrClosed) {
		t.Errorf("WaitFor after Close: %v", err)
	}
	if _, err := s.Poll(events); !errors.Is(err, ErrClosed) {
		t.Errorf("Poll after Close: %v", err)
	}
	s.Close() // idempotent
}

// TestPollerSet: a set waited on in Go's poller reports a member and
// returns ErrClosed once closed.
func TestPollerSet(t *testing.T) {
	s, err := New("test")
	if err != nil {
		t.Fatal(err)
	}
	r, w := pipe(t)
	if err := s.Add(r, unix.EPOLLIN, 3); err != nil {
		t.Fatal(err)
	}
	unix.Write(w, []byte("x"))
	events := make([]unix.EpollEvent, 4)
	if n, err := s.Wait(events); err != nil || n != 1 || Key(&events[0]) != 3 {
		t.Errorf("Wait: %d, %v, %+v", n, err, events[0])
	}
	s.Close()
	if _, err := s.Wait(events); !errors.Is(err, ErrClosed) {
		t.Errorf("Wait after Close: %v", err)
	}
}

// TestSleepAndBrief: Sleep (in Go's poller) and WaitBrief (on the P) take
// turns on one set: each reports a member's events, WaitBrief times out
// with none and cuts a long timeout to MaxBrief, Sleep returns for a Wake
// and with ErrClosed across Close, and the descriptor Sleep puts in the
// poller is gone once WaitBrief has run and once the set is closed.
func TestSleepAndBrief(t *testing.T) {
	fds := func() int {
		ents, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			t.Fatal(err)
		}
		return len(ents)
	}
	s, err := NewBlocking("test")
	if err != nil {
		t.Fatal(err)
	}
	r, w := pipe(t)
	if err := s.Add(r, unix.EPOLLIN, 7); err != nil {
		t.Fatal(err)
	}
	before := fds()
	events := make([]unix.EpollEvent, 4)

	go func() {
		time.Sleep(20 * time.Millisecond)
		unix.Write(w, []byte("x"))
	}()
	if n, err := s.Sleep(events); err != nil || n != 1 || Key(&events[0]) != 7 {
		t.Fatalf("Sleep until the pipe is written: %d, %v, %+v", n, err, events[0])
	}
	if n, err := s.Sleep(events); err != nil || n != 1 || Key(&events[0]) != 7 {
		t.Errorf("Sleep with the pipe still readable: %d, %v, %+v", n, err, events[0])
	}
	if got := fds(); got != before+1 {
		t.Errorf("descriptors while the set is in the poller: %d, want %d", got, before+1)
	}
	if n, err := s.WaitBrief(events, time.Millisecond); err != nil || n != 1 || Key(&events[0]) != 7 {
		t.Errorf("WaitBrief with the pipe readable: %d, %v, %+v", n, err, events[0])
	}
	if got := fds(); got != before {
		t.Errorf("descriptors after WaitBrief: %d, want %d (the poller's duplicate closed)", got, before)
	}
	var b [8]byte
	unix.Read(r, b[:])

	start := time.Now()
	n, err := s.WaitBrief(events, 300*time.Microsecond)
	if took := time.Since(start); err != nil || n != 0 || took < 300*time.Microsecond || took > 50*time.Millisecond {
		t.Errorf("WaitBrief with nothing ready: %d, %v after %v; want 0, nil after 300µs", n, err, took)
	}
	start = time.Now()
	n, err = s.WaitBrief(events, time.Hour)
	if took := time.Since(start); err != nil || n != 0 || took < MaxBrief || took > MaxBrief+50*time.Millisecond {
		t.Errorf("WaitBrief for an hour: %d, %v after %v; want 0, nil after MaxBrief (%v)", n, err, took, MaxBrief)
	}

	s.Wake()
	if n, err := s.Sleep(events); err != nil || n != 0 {
		t.Errorf("Sleep after Wake: %d, %v; want 0, nil", n, err)
	}

	errc := make(chan error, 1)
	go func() {
		for {
			n, err := s.Sleep(events)
			if err != nil || n != 0 {
				errc <- err
				return
			}
		}
	}()
	time.Sleep(20 * time.Millisecond)
	s.Close()
	select {
	case err := <-errc:
		if !errors.Is(err, ErrClosed) {
			t.Errorf("Sleep across Close: %v, want ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Sleep still waiting after Close")
	}
	if _, err := s.WaitBrief(events, time.Millisecond); !errors.Is(err, ErrClosed) {
		t.Errorf("WaitBrief after Close: %v", err)
	}
	if got := fds(); got != before-2 {
		t.Errorf("descriptors after Close: %d, want %d (the set, its wake-up and the poller's duplicate closed)", got, before-2)
	}
}
