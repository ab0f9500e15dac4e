package userns

import (
	"errors"
	"io/fs"
	"os/exec"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestScanTasksWhileThreadsEnd: the children of this process are listed
// from its threads' /proc/self/task/*/children even while threads end
// (a goroutine locked to its thread returns: Go ends the thread), which
// is the instant the subreaper looks, as the thread that started the
// gonetns child ends once the child is reaped.
func TestScanTasksWhileThreadsEnd(t *testing.T) {
	if _, ok := scanTasks(); !ok {
		t.Fatal("/proc/self/task/*/children cannot be read: the kernel lacks CONFIG_PROC_CHILDREN, or /proc is not mounted")
	}
	child := exec.Command("sleep", "60")
	if err := child.Start(); err != nil {
		t.Fatalf("start a child to look for: %v", err)
	}
	defer func() { child.Process.Kill(); child.Wait() }()

	var stop atomic.Bool
	var wg sync.WaitGroup
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !stop.Load() {
				done := make(chan struct{})
				go func() {
					runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
					close(done)
				}()
				<-done
			}
		}()
	}
	defer func() { stop.Store(true); wg.Wait() }()

	var spoiled, scans int
	for deadline := time.Now().Add(3 * time.Second); scans < 3000 && time.Now().Before(deadline); scans++ {
		if _, err := taskChildren(); errors.Is(err, fs.ErrNotExist) || errors.Is(err, unix.ESRCH) {
			spoiled++
		}
		kids, ok := scanTasks()
		if !ok || !slices.Contains(kids, child.Process.Pid) {
			t.Fatalf("scanTasks = %v, %v while threads end; want the child %d among them", kids, ok, child.Process.Pid)
		}
	}
	t.Logf("%d of %d single listings were spoiled by a thread's end", spoiled, scans)
}
