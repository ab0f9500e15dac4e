package rawconn

import (
	"errors"
	"os"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func pair(t *testing.T) (a, b syscall.RawConn, closeA func()) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	fa, fb := os.NewFile(uintptr(fds[0]), "a"), os.NewFile(uintptr(fds[1]), "b")
	t.Cleanup(func() { fa.Close(); fb.Close() })
	ra, err := fa.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	rb, err := fb.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	return ra, rb, func() { fa.Close() }
}

// notReadyOnce wraps op and closes the returned channel the first time op
// finds the descriptor not ready: from then on the caller waits on the
// poller, the state the tests below reach before acting.
func notReadyOnce(op Op) (Op, <-chan struct{}) {
	waiting := make(chan struct{})
	var once sync.Once
	return func(fd int) (int, error) {
		n, err := op(fd)
		if errors.Is(err, syscall.EAGAIN) {
			once.Do(func() { close(waiting) })
		}
		return n, err
	}, waiting
}

// TestReadWaitsForData: the call finds nothing, the poller wakes it when
// data comes, and its result is the data's; through Read and through a
// Calls (whose op here runs the same Op).
func TestReadWaitsForData(t *testing.T) {
	calls := NewCalls(func(fd int, op Op) (int, error) { return op(fd) })
	for name, read := range map[string]func(syscall.RawConn, Op) (int, error){
		"Read":  Read,
		"Calls": calls.Read,
	} {
		t.Run(name, func(t *testing.T) { testReadWaitsForData(t, read) })
	}
}

func testReadWaitsForData(t *testing.T, read func(syscall.RawConn, Op) (int, error)) {
	a, b, _ := pair(t)
	got := make(chan string, 1)
	tries := 0
	buf := make([]byte, 16)
	op, waiting := notReadyOnce(func(fd int) (int, error) {
		tries++
		return unix.Read(fd, buf)
	})
	go func() {
		n, err := read(b, op)
		if err != nil {
			got <- err.Error()
			return
		}
		got <- string(buf[:n])
	}()
	// Write only once Read has found nothing: it must then wait for the
	// data rather than return EAGAIN.
	select {
	case <-waiting:
	case s := <-got:
		t.Fatalf("Read returned %q before any data was written", s)
	}
	if _, err := Write(a, func(fd int) (int, error) { return unix.Write(fd, []byte("hello")) }); err != nil {
		t.Fatal(err)
	}
	if s := <-got; s != "hello" {
		t.Fatalf("Read = %q", s)
	}
	if tries < 2 {
		t.Errorf("op ran %d times: the first try should have found no data", tries)
	}
}

func TestRetriesEINTRAndPassesOtherErrors(t *testing.T) {
	_, b, _ := pair(t)
	calls := 0
	n, err := Write(b, func(int) (int, error) {
		calls++
		if calls < 3 {
			return 0, syscall.EINTR
		}
		return 7, nil
	})
	if n != 7 || err != nil || calls != 3 {
		t.Errorf("n=%d err=%v calls=%d, want 7 <nil> 3", n, err, calls)
	}
	_, err = Read(b, func(int) (int, error) { return 0, syscall.ECONNRESET })
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("err = %v, want ECONNRESET", err)
	}
}

func TestClosedWhileWaiting(t *testing.T) {
	_, b, _ := pair(t)
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fds[1])
	fc := os.NewFile(uintptr(fds[0]), "c")
	rc, err := fc.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	buf := make([]byte, 1)
	op, waiting := notReadyOnce(func(fd int) (int, error) { return unix.Read(fd, buf) })
	go func() {
		_, err := Read(rc, op)
		done <- err
	}()
	// Close once Read waits on the poller.
	select {
	case <-waiting:
	case err := <-done:
		t.Fatalf("Read returned %v before the descriptor was closed", err)
	}
	fc.Close()
	select {
	case err := <-done:
		// os.File's poller says "use of closed file", a net.Conn's
		// net.ErrClosed: either way an error, not a retry forever.
		if err == nil || errors.Is(err, syscall.EAGAIN) {
			t.Errorf("err = %v, want the poller's closed error", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Read did not return after Close")
	}
	if fd, err := FD(b); err != nil || fd < 0 {
		t.Errorf("FD = %d, %v", fd, err)
	}
}

// dgramPair is a pair of connected, non-blocking datagram sockets, closed
// at the end of the test.
func dgramPair(t *testing.T) [2]int {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fds[0]); unix.Close(fds[1]) })
	return fds
}

// TestReadBatch: three datagrams waiting come as two and then one, each
// whole and in order, and a count short of the buffers is what says the
// queue is empty; then EAGAIN.
func TestReadBatch(t *testing.T) {
	fds := dgramPair(t)
	for _, d := range []string{"one", "second", "3"} {
		if _, err := unix.Write(fds[0], []byte(d)); err != nil {
			t.Fatal(err)
		}
	}
	bufs := [][]byte{make([]byte, 16), make([]byte, 16)}
	lens := make([]int, 2)
	var got []string
	for _, want := range []int{2, 1} {
		n, err := ReadBatch(fds[1], bufs, lens)
		if err != nil || n != want {
			t.Fatalf("ReadBatch: %d, %v; want %d datagrams", n, err, want)
		}
		for i := range n {
			got = append(got, string(bufs[i][:lens[i]]))
		}
	}
	if want := []string{"one", "second", "3"}; !slices.Equal(got, want) {
		t.Errorf("read %q; want %q", got, want)
	}
	if n, err := ReadBatch(fds[1], bufs, lens); !errors.Is(err, unix.EAGAIN) {
		t.Errorf("ReadBatch of an empty socket: %d, %v; want EAGAIN", n, err)
	}
}
