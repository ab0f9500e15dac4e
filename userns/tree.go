package userns

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// endRounds bounds endChildren: each round kills the children it finds
// and reaps them; their own children, re-parented to this process (a
// subreaper), are the next round's. A process with a SIGKILL pending
// cannot fork, so the rounds are as many as the tree's generations that
// were forking at that instant.
const endRounds = 50

// endChildren kills (SIGKILL) every child of this process and, as this
// process is a subreaper, every process re-parented to it meanwhile, and
// reaps them. It returns how many it killed, and the children still there
// after the last round.
func endChildren() (killed int, left []int) {
	for range endRounds {
		kids := ownChildren()
		if len(kids) == 0 {
			return killed, nil
		}
		for _, pid := range kids {
			if unix.Kill(pid, unix.SIGKILL) == nil {
				killed++
			}
		}
		// Reap what died (each by its pid: an embedding program's own
		// waits for other children are not disturbed); what is not dead
		// yet shows up in the next round.
		pending := kids
		for deadline := time.Now().Add(100 * time.Millisecond); len(pending) > 0 && time.Now().Before(deadline); {
			still := pending[:0]
			for _, pid := range pending {
				var ws unix.WaitStatus
				got, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil)
				if got == 0 && err == nil || err == unix.EINTR {
					still = append(still, pid)
				}
			}
			pending = still
			if len(pending) > 0 {
				time.Sleep(time.Millisecond)
			}
		}
	}
	return killed, ownChildren()
}

// ownChildren lists this process's children, zombies included, from
// /proc/self/task/*/children (the children of each thread: a subreaper's
// adopted processes are attributed to any of its threads), which a
// process confined to /proc/self can read; without CONFIG_PROC_CHILDREN,
// from every process's /proc/PID/stat.
func ownChildren() []int {
	if kids, ok := scanTasks(); ok {
		return kids
	}
	return childrenOf(os.Getpid())
}

// scanTasks lists the children of this process's threads; false if it
// cannot. Confined to /proc/self (Landlock), this process has no other
// way, so a thread that ends between the listing and the read (the one
// that started the gonetns child ends once the child is reaped: its end
// is what the child's parent-death signal waits for) must not end the
// scan with nothing: it lists again. Before this, the subreaper's last
// look could come back empty in that instant and leave the command's
// processes running (TestNothingOutlivesTheSandbox, once in a few CI runs).
func scanTasks() ([]int, bool) {
	for range taskScans {
		kids, err := taskChildren()
		if err == nil {
			return kids, true
		}
		if !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, unix.ESRCH) {
			break
		}
	}
	return nil, false
}

// taskScans bounds ownChildren's listings of the threads, each of which a
// thread's end can spoil. Go ends a thread only when a goroutine locked
// to it returns: one or two in a row at most.
const taskScans = 10

// taskChildren reads the children of each of this process's threads.
func taskChildren() ([]int, error) {
	files, _ := filepath.Glob("/proc/self/task/*/children")
	if len(files) == 0 {
		return nil, errors.New("no /proc/self/task/*/children (a kernel without CONFIG_PROC_CHILDREN)")
	}
	var kids []int
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		for _, w := range strings.Fields(string(b)) {
			if pid, err := strconv.Atoi(w); err == nil {
				kids = append(kids, pid)
			}
		}
	}
	return kids, nil
}

// childrenOf lists the children of pid, from /proc/PID/stat.
func childrenOf(pid int) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var kids []int
	for _, e := range ents {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...; comm may hold spaces and parentheses.
		i := bytes.LastIndexByte(b, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(b[i+1:]))
		if len(f) < 2 {
			continue
		}
		if ppid, err := strconv.Atoi(f[1]); err == nil && ppid == pid {
			kids = append(kids, p)
		}
	}
	return kids
}
