package userns

import (
	"bufio"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// initFateFD is the init process's descriptor for its reports to the
// gonetns child (Options.InitProcess): a line once it catches signals, a
// line with the command's wait status when the command has ended.
const initFateFD = 3

// initName is the init process's argv[0]; the command's argv follows.
const initName = "gonetns-init"

// superviseCommand is PID 1 of the new PID namespace when the command is
// not (Options.InitProcess, as RootlessKit's child is PID 1 and its
// command a child of it): it starts the command, relays every signal it
// gets to it, reaps whatever is orphaned inside, and exits when the
// command does, after writing the command's wait status to initFateFD.
// PID 1 only receives the signals it has a handler for, so a command
// that is PID 1 itself would never see, say, a SIGUSR1 relayed to it
// without a handler of its own; here it does.
func superviseCommand(path string) int {
	fate := os.NewFile(initFateFD, "fate")
	unix.CloseOnExec(initFateFD)
	sigs := make(chan os.Signal, 64)
	signal.Notify(sigs)
	fmt.Fprintln(fate, "ready")
	p, err := os.StartProcess(path, os.Args[1:], &os.ProcAttr{
		Env:   os.Environ(),
		Files: []*os.File{os.Stdin, os.Stdout, os.Stderr},
		Sys:   &syscall.SysProcAttr{Pdeathsig: unix.SIGKILL},
	})
	if err != nil {
		fmt.Fprintf(os.Stderr, "gonetns: exec %s: %v\n", path, err)
		return exitCannotExec
	}
	for {
		for {
			var ws unix.WaitStatus
			got, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
			if err == unix.EINTR {
				continue
			}
			if err != nil || got <= 0 {
				break
			}
			if got == p.Pid {
				fmt.Fprintf(fate, "%d\n", uint32(ws))
				fate.Close()
				return statusOf(ws)
			}
		}
		switch s := (<-sigs).(syscall.Signal); s {
		case unix.SIGCHLD:
		case unix.SIGURG:
			// Go's runtime preempts its own threads with it.
		default:
			p.Signal(s)
		}
	}
}

// readFate reads the init process's report of the command's wait status
// (after its ready line); false if it made none (it could not start the
// command).
func readFate(r *bufio.Reader) (unix.WaitStatus, bool) {
	line, err := r.ReadString('\n')
	if err != nil {
		return 0, false
	}
	n, err := strconv.ParseUint(strings.TrimSpace(line), 10, 32)
	if err != nil {
		return 0, false
	}
	return unix.WaitStatus(n), true
}
