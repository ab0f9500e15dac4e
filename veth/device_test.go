package veth

import (
	"errors"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// socketpairFiles returns both ends of a unix datagram socket pair with
// small send buffers.
func socketpairFiles(t *testing.T) (*os.File, *os.File) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	unix.SetsockoptInt(fds[0], unix.SOL_SOCKET, unix.SO_SNDBUF, 4096)
	a, b := os.NewFile(uintptr(fds[0]), "a"), os.NewFile(uintptr(fds[1]), "b")
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

// A Write that finds the send buffer full waits for room (its socket is
// not in Go's poller), and Close ends that wait.
func TestWriteWaitsForRoom(t *testing.T) {
	tx, peer := socketpairFiles(t)
	rx, _ := socketpairFiles(t)
	dev, err := NewDevice([]*os.File{tx, rx})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	frame := make([]byte, 1000)
	full := false
	for range 10000 {
		var werr error
		dev.(*device).txrc.Control(func(fd uintptr) { _, werr = unix.SendmsgBuffers(int(fd), [][]byte{frame}, nil, nil, unix.MSG_DONTWAIT) })
		if errors.Is(werr, unix.EAGAIN) {
			full = true
			break
		}
	}
	if !full {
		t.Fatal("the send buffer never filled")
	}
	done := make(chan error, 1)
	go func() {
		_, err := dev.Write([][]byte{frame})
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("Write into a full send buffer returned at once: %v", err)
	case <-time.After(200 * time.Millisecond):
	}
	// Room for the waiting frame: the peer reads what is queued.
	b := make([]byte, 2000)
	prc, _ := peer.SyscallConn()
	prc.Control(func(fd uintptr) {
		for {
			if _, _, err := unix.Recvfrom(int(fd), b, unix.MSG_DONTWAIT); err != nil {
				return
			}
		}
	})
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Write after room was made: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Write still waits after the peer made room")
	}
	// Full again; Close ends the wait.
	for {
		var werr error
		dev.(*device).txrc.Control(func(fd uintptr) { _, werr = unix.SendmsgBuffers(int(fd), [][]byte{frame}, nil, nil, unix.MSG_DONTWAIT) })
		if errors.Is(werr, unix.EAGAIN) {
			break
		}
	}
	go func() {
		_, err := dev.Write([][]byte{frame})
		done <- err
	}()
	time.Sleep(50 * time.Millisecond)
	dev.Close()
	select {
	case err := <-done:
		if !errors.Is(err, os.ErrClosed) {
			t.Errorf("Write waiting for room, then Close: %v, want os.ErrClosed", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not end a Write waiting for room")
	}
}
