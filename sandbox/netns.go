package sandbox

import (
	"fmt"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// netnsThread is an OS thread that lives in the sandbox's network
// namespace when that namespace is detached from the child's own
// (--detach-netns): Do runs functions on it, so that what they create
// (sockets, the TAP device, netlink requests) belongs to that namespace.
//
// Why one thread that never leaves: a thread enters a network namespace
// with setns(2), but could never return to the host's, which belongs to a
// user namespace this process has no capabilities in. So the thread that
// creates the namespace stays in it, locked, for the life of the child.
// Functions run there one at a time and must be short (create a socket,
// send a netlink request); waiting, e.g. for a connect, belongs outside.
type netnsThread struct {
	reqs chan func()
	tid  int // the thread's id, for its /proc/self/task/TID/ns/net
}

// newNetNSThread starts the thread, creates a new network namespace on it
// and bind-mounts that namespace at path (created as an empty file), so
// that other processes can enter it with nsenter -n<path>. The thread and
// its goroutine last as long as the child process: there is no Close,
// since nothing in the child outlives its need for the namespace.
func newNetNSThread(path string) (*netnsThread, error) {
	t := &netnsThread{reqs: make(chan func())}
	ready := make(chan error, 1)
	go func() {
		// Locked and never unlocked: the goroutine and its thread belong
		// to the namespace until the child exits.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			ready <- fmt.Errorf("create the detached network namespace: %w", err)
			return
		}
		if err := bindNetNS(path); err != nil {
			ready <- err
			return
		}
		t.tid = unix.Gettid()
		ready <- nil
		for f := range t.reqs {
			f()
		}
	}()
	if err := <-ready; err != nil {
		return nil, err
	}
	return t, nil
}

// bindNetNS bind-mounts the calling thread's network namespace at path.
func bindNetNS(path string) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDONLY, 0o444)
	if err != nil {
		return fmt.Errorf("create %s for the detached network namespace: %w", path, err)
	}
	f.Close()
	src := fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid())
	if err := unix.Mount(src, path, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind-mount the detached network namespace on %s: %w", path, err)
	}
	return nil
}

// enter moves the calling thread, which must be locked to its goroutine
// for good, into the namespace.
func (t *netnsThread) enter() error {
	fd, err := unix.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", t.tid), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return unix.Setns(fd, unix.CLONE_NEWNET)
}

// Do runs fn on the thread in the namespace and returns its error.
func (t *netnsThread) Do(fn func() error) error {
	done := make(chan error, 1)
	t.reqs <- func() { done <- fn() }
	return <-done
}
