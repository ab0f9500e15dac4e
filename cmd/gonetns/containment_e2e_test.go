package main

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gonetns/gonetns/internal/e2etest"
)

// Nothing of the sandbox outlives gonetns, whichever of its processes dies
// first: the command exiting, the gonetns child killed from inside (the
// sandbox sees it without --pidns, and is the same user) or from outside,
// gonetns itself killed. The command leaves three processes that try to
// get away: a plain background job, a double fork into a session of its
// own that ignores TERM and HUP, and a process that moves to a process
// group of its own. Invoked as rootlesskit, what the command leaves when it
// exits by itself lives on, as with RootlessKit (--kill-orphans=false);
// everything else ends as with gonetns.
func TestNothingOutlivesTheSandbox(t *testing.T) {
	r := e2etest.Unprivileged(t)
	personalities := []struct {
		name  string
		r     e2etest.Runner
		flags []string
	}{
		{"gonetns", r, []string{"--net=none"}},
		{"rootlesskit", r.As(t, "rootlesskit"), nil},
	}
	for _, p := range personalities {
		for _, pidns := range []bool{false, true} {
			for _, scenario := range []string{"command exits", "child killed from inside", "child killed from outside", "gonetns killed"} {
				if pidns && scenario == "child killed from inside" {
					// The child is outside the command's PID namespace:
					// nothing inside can name it.
					continue
				}
				name := fmt.Sprintf("%s/pidns=%v/%s", p.name, pidns, scenario)
				t.Run(name, func(t *testing.T) {
					flags := p.flags
					if pidns {
						flags = append(flags[:len(flags):len(flags)], "--pidns")
					}
					want := 0
					if p.name == "rootlesskit" && !pidns && scenario == "command exits" {
						want = 3
					}
					checkContainment(t, p.r, flags, scenario, want)
				})
			}
		}
	}
}

// escapees is what the command starts before it is told what to do: three
// sleeps whose argument marks them as this run's.
const escapees = `sleep %[1]d >/dev/null 2>&1 &
setsid sh -c 'trap "" TERM HUP; sleep %[2]d >/dev/null 2>&1 & exit' &
perl -e 'setpgrp(0, 0); exec "sleep", "%[3]d"' >/dev/null 2>&1 &
echo ready
read what
case $what in
exit) exit 0;;
kill-child) kill -9 $PPID;;
esac
exec sleep 120`

func checkContainment(t *testing.T, r e2etest.Runner, flags []string, scenario string, want int) {
	base := 810000 + int(time.Now().UnixNano()%100000)*10
	markers := []string{}
	for i := 1; i <= 3; i++ {
		markers = append(markers, "sleep "+strconv.Itoa(base+i))
	}
	defer func() {
		for _, m := range markers {
			for _, pid := range procsNamed(m) {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), quick)
	defer cancel()
	cmd := r.Command(ctx, append(flags, "sh", "-c", fmt.Sprintf(escapees, base+1, base+2, base+3))...)
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	if line, _ := bufio.NewReader(stdout).ReadString('\n'); line != "ready\n" {
		t.Fatalf("no ready line: %q", line)
	}
	for deadline := time.Now().Add(5 * time.Second); running(markers) < 3 && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
	}
	if n := running(markers); n != 3 {
		t.Fatalf("%d of the command's 3 processes are running", n)
	}
	switch scenario {
	case "command exits":
		fmt.Fprintln(stdin, "exit")
	case "child killed from inside":
		fmt.Fprintln(stdin, "kill-child")
	case "child killed from outside":
		kids := childPIDs(cmd.Process.Pid)
		if len(kids) != 1 {
			t.Fatalf("gonetns (%d) has children %v, want its child alone", cmd.Process.Pid, kids)
		}
		syscall.Kill(kids[0], syscall.SIGKILL)
	case "gonetns killed":
		cmd.Process.Kill()
	}
	cmd.Wait()
	// What gonetns and its child kill is dead before they exit; give the
	// kernel's own ending of a PID namespace a moment.
	for deadline := time.Now().Add(5 * time.Second); want == 0 && running(markers) > 0 && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
	}
	if n := running(markers); n != want {
		var left []string
		for _, m := range markers {
			if len(procsNamed(m)) > 0 {
				left = append(left, m)
			}
		}
		t.Errorf("%s: %d of the command's processes run after gonetns exited (%s), want %d", scenario, n, strings.Join(left, ", "), want)
	}
}

func running(cmdlines []string) int {
	n := 0
	for _, c := range cmdlines {
		n += len(procsNamed(c))
	}
	return n
}

// procsNamed lists the live processes whose command line is cmdline.
func procsNamed(cmdline string) []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || strings.ReplaceAll(strings.TrimRight(string(b), "\x00"), "\x00", " ") != cmdline {
			continue
		}
		if st, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat")); err == nil {
			if i := strings.LastIndexByte(string(st), ')'); i > 0 && strings.HasPrefix(string(st[i+1:]), " Z") {
				continue
			}
		}
		pids = append(pids, pid)
	}
	return pids
}

// childPIDs lists the children of pid.
func childPIDs(pid int) []int {
	files, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	var kids []int
	for _, f := range files {
		b, _ := os.ReadFile(f)
		for _, w := range strings.Fields(string(b)) {
			if k, err := strconv.Atoi(w); err == nil {
				kids = append(kids, k)
			}
		}
	}
	return kids
}
