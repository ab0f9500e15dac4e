package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Every process the harness starts runs in a process group of its own,
// with SIGKILL as its parent-death signal (so a killed harness takes its
// direct children along, and they take theirs: gonetns, RootlessKit and our
// client all set it), and is registered here, so that a timeout or a
// signal kills the whole tree: the group, and every descendant found by
// parent pid, since namespaced children may leave the group.

// procs is the registry of running processes.
var procs = struct {
	sync.Mutex
	m map[*proc]struct{}
}{m: map[*proc]struct{}{}}

// proc is a started process.
type proc struct {
	cmd    *exec.Cmd
	pid    int
	done   chan struct{} // closed when the process has been reaped
	err    error         // Wait's result, valid after done
	stderr *tailBuffer
	killed bool // set by kill, under procs' lock
}

// procOptions describe how to start a process.
type procOptions struct {
	argv   []string
	env    []string // added to the harness's environment
	dir    string
	stdin  io.Reader
	stdout io.Writer
}

// startProc starts o.argv. The process is killed (with its descendants)
// when ctx ends. The forking goroutine keeps its OS thread locked until
// the process is reaped: Linux sends the parent-death signal when the
// forking thread exits, not the process.
func startProc(ctx context.Context, o procOptions) (*proc, error) {
	if len(o.argv) == 0 {
		return nil, errors.New("empty command")
	}
	p := &proc{done: make(chan struct{}), stderr: newTailBuffer(8 << 10)}
	cmd := exec.Command(o.argv[0], o.argv[1:]...)
	cmd.Env = append(os.Environ(), o.env...)
	cmd.Dir = o.dir
	cmd.Stdin = o.stdin
	cmd.Stdout = o.stdout
	cmd.Stderr = p.stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	// Descendants may hold stdout or stderr open after a kill; do not
	// wait for them for long.
	cmd.WaitDelay = 2 * time.Second
	p.cmd = cmd

	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
		procs.Lock()
		err := cmd.Start()
		if err == nil {
			p.pid = cmd.Process.Pid
			procs.m[p] = struct{}{}
		}
		procs.Unlock()
		started <- err
		if err != nil {
			return
		}
		p.err = cmd.Wait()
		procs.Lock()
		delete(procs.m, p)
		close(p.done)
		procs.Unlock()
	}()
	if err := <-started; err != nil {
		return nil, fmt.Errorf("start %s: %w", o.argv[0], err)
	}
	go func() {
		select {
		case <-ctx.Done():
			p.kill()
		case <-p.done:
		}
	}()
	return p, nil
}

// wait waits for the process to end, or kills it when ctx ends first.
func (p *proc) wait(ctx context.Context) error {
	select {
	case <-p.done:
	case <-ctx.Done():
		p.kill()
		<-p.done
		return fmt.Errorf("%s: %w (killed)", p.cmd.Args[0], ctx.Err())
	}
	procs.Lock()
	killed := p.killed
	procs.Unlock()
	if p.err == nil && killed {
		// Killed (its start's context ended), though it exited 0: its
		// descendants go first, and a shell whose children died may
		// finish before the signal reaches it. It did not do its work.
		return fmt.Errorf("%s: killed", p.cmd.Args[0])
	}
	return p.err
}

// exited reports whether the process has been reaped.
func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// kill sends SIGKILL to the process's descendants, its group and itself.
func (p *proc) kill() {
	procs.Lock()
	defer procs.Unlock()
	if p.pid == 0 {
		return
	}
	select {
	case <-p.done:
		return // reaped: the pid may belong to someone else now
	default:
	}
	p.killed = true
	for _, d := range descendants(p.pid) {
		syscall.Kill(d, syscall.SIGKILL)
	}
	syscall.Kill(-p.pid, syscall.SIGKILL)
	p.cmd.Process.Kill() // by pidfd: never hits a recycled pid
}

// killAll kills every registered process tree (on a signal, at exit).
func killAll() {
	procs.Lock()
	ps := make([]*proc, 0, len(procs.m))
	for p := range procs.m {
		ps = append(ps, p)
	}
	procs.Unlock()
	for _, p := range ps {
		p.kill()
	}
	for _, p := range ps {
		select {
		case <-p.done:
		case <-time.After(5 * time.Second):
		}
	}
}

// errorText is what a failed process said: its error and the last lines
// of its stderr, on one line.
func (p *proc) errorText(err error) string {
	msg := err.Error()
	if tail := lastLines(p.stderr.String(), 3); tail != "" {
		msg += ": " + tail
	}
	return msg
}

// lastLines returns the last n non-empty lines of s joined by " | ",
// skipping pasta's syslog noise.
func lastLines(s string, n int) string {
	var keep []string
	for _, l := range strings.Split(s, "\n") {
		l = strings.TrimSpace(l)
		if l == "" || isChatter(l) {
			continue
		}
		keep = append(keep, l)
	}
	if len(keep) > n {
		keep = keep[len(keep)-n:]
	}
	return strings.Join(keep, " | ")
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func newTailBuffer(max int) *tailBuffer { return &tailBuffer{max: max} }

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if len(t.b) > t.max {
		t.b = append(t.b[:0], t.b[len(t.b)-t.max:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.b)
}

// /proc readers.

// procStat is the part of /proc/PID/stat the harness uses.
type procStat struct {
	comm  string
	ppid  int
	ticks uint64 // utime + stime, in clock ticks
}

// userHZ is the unit of utime and stime in /proc/PID/stat: USER_HZ, 100 on
// every Linux architecture the harness runs on.
const userHZ = 100

func readStat(pid int) (procStat, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return procStat{}, err
	}
	return parseStat(b)
}

// parseStat parses /proc/PID/stat: "pid (comm) state ppid ... utime stime
// ...", where comm may contain spaces and parentheses.
func parseStat(b []byte) (procStat, error) {
	open, end := bytes.IndexByte(b, '('), bytes.LastIndexByte(b, ')')
	if open < 0 || end < open {
		return procStat{}, fmt.Errorf("malformed /proc stat %q", b)
	}
	f := strings.Fields(string(b[end+1:]))
	// f[0] is field 3 (state); utime and stime are fields 14 and 15.
	if len(f) < 13 {
		return procStat{}, fmt.Errorf("short /proc stat %q", b)
	}
	ppid, err1 := strconv.Atoi(f[1])
	ut, err2 := strconv.ParseUint(f[11], 10, 64)
	st, err3 := strconv.ParseUint(f[12], 10, 64)
	if err := errors.Join(err1, err2, err3); err != nil {
		return procStat{}, fmt.Errorf("malformed /proc stat: %w", err)
	}
	return procStat{comm: string(b[open+1 : end]), ppid: ppid, ticks: ut + st}, nil
}

// cpuSeconds is the user+system CPU time pid has used.
func cpuSeconds(pid int) (float64, error) {
	s, err := readStat(pid)
	if err != nil {
		return 0, err
	}
	return float64(s.ticks) / userHZ, nil
}

// memory reads VmHWM (peak resident set) and VmRSS of pid, in KiB.
func memory(pid int) (hwm, rss int64, err error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, 0, err
	}
	return parseStatus(string(b))
}

func parseStatus(s string) (hwm, rss int64, err error) {
	found := 0
	for _, line := range strings.Split(s, "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok || (k != "VmHWM" && k != "VmRSS") {
			continue
		}
		n, perr := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		if perr != nil {
			return 0, 0, fmt.Errorf("malformed %s line %q", k, line)
		}
		if k == "VmHWM" {
			hwm = n
		} else {
			rss = n
		}
		found++
	}
	if found != 2 {
		return 0, 0, errors.New("no VmHWM/VmRSS in /proc status (a kernel thread, or a zombie)")
	}
	return hwm, rss, nil
}

// allStats reads the stat of every process we may look at.
func allStats() map[int]procStat {
	ents, _ := os.ReadDir("/proc")
	m := make(map[int]procStat, len(ents))
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if s, err := readStat(pid); err == nil {
			m[pid] = s
		}
	}
	return m
}

// descendants lists pid's descendants, children first.
func descendants(pid int) []int {
	kids := map[int][]int{}
	for p, s := range allStats() {
		kids[s.ppid] = append(kids[s.ppid], p)
	}
	var out []int
	queue := []int{pid}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		for _, c := range kids[p] {
			out = append(out, c)
			queue = append(queue, c)
		}
	}
	return out
}

// childNamed returns the child of pid whose command name is comm.
func childNamed(pid int, comm string) (int, bool) {
	for p, s := range allStats() {
		if s.ppid == pid && s.comm == comm {
			return p, true
		}
	}
	return 0, false
}

// The harness is a child subreaper (see main): a process that outlives
// the wrapper that started it (it escaped every death signal) is
// re-parented to the harness instead of init, where sweepOrphans finds it.

// sweepOrphans kills and reaps the harness's children that no registered
// process accounts for, with their descendants. It returns how many.
func sweepOrphans() int {
	me := os.Getpid()
	// Under the lock no process is being started, so every child of
	// ours that /proc shows is either registered or an orphan.
	procs.Lock()
	var orphans []int
	for pid, s := range allStats() {
		if s.ppid != me {
			continue
		}
		known := false
		for p := range procs.m {
			known = known || p.pid == pid
		}
		if !known {
			orphans = append(orphans, pid)
		}
	}
	procs.Unlock()
	for _, pid := range orphans {
		for _, d := range descendants(pid) {
			syscall.Kill(d, syscall.SIGKILL)
		}
		syscall.Kill(pid, syscall.SIGKILL)
		var ws syscall.WaitStatus
		syscall.Wait4(pid, &ws, 0, nil)
	}
	return len(orphans)
}

// isChatter tells lines that explain no failure: pasta's complaints about
// syslog, RootlessKit's warnings.
func isChatter(l string) bool {
	return strings.HasPrefix(l, "Failed to send ") && strings.HasSuffix(l, "to syslog") ||
		strings.Contains(l, "level=warning") || strings.Contains(l, "level=info")
}

// cpuNanos is the CPU time all of pid's threads have used, in
// nanoseconds, from the scheduler's own accounting (schedstat): precise
// enough to divide among a few thousand round trips, where the
// clock-tick counts of stat are not.
func cpuNanos(pid int) (int64, error) {
	dir := "/proc/" + strconv.Itoa(pid) + "/task"
	tasks, err := os.ReadDir(dir)
	if err != nil {
		return 0, err
	}
	var total int64
	for _, t := range tasks {
		b, err := os.ReadFile(dir + "/" + t.Name() + "/schedstat")
		if err != nil {
			continue // the thread ended meanwhile
		}
		f := strings.Fields(string(b))
		if len(f) == 0 {
			return 0, fmt.Errorf("malformed schedstat %q", b)
		}
		ns, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("malformed schedstat %q: %w", b, err)
		}
		total += ns
	}
	return total, nil
}
