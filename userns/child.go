package userns

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/wire"
)

// ChildHooks are the parts of the child's work that belong to other
// packages; cmd/gonetns wires them.
type ChildHooks struct {
	// Network runs inside the new namespaces, after the mounts and before
	// the command, with Options.Network as JSON. The files it returns
	// (e.g. the TAP device) and the info are sent to the parent.
	Network func(cfg json.RawMessage, log *slog.Logger) (info any, files []*os.File, err error)
	// Started runs on the child's main thread once the command has
	// started; what it does to that thread (setns) stays with it, and
	// the thread runs nothing but the child's main goroutine from then
	// on (init locks it; the runtime starts new threads from its
	// template thread, which is where the child began).
	Started func(log *slog.Logger)
	// Serve runs while the command runs, with Options.ExtraFiles; it must
	// return when ctx is done.
	Serve func(ctx context.Context, extra []*os.File, log *slog.Logger)
	// NewLogger makes the child's logger; nil means slog's text handler
	// on stderr.
	NewLogger func(debug bool) *slog.Logger
}

// In the child's stages the main goroutine calls prctl(PR_SET_PDEATHSIG)
// and execve(2). Both act on the calling thread, and only the thread group
// leader's parent-death signal counts when the parent dies and survives
// the exec; a goroutine that wandered to another thread (the runtime starts
// threads, e.g. for signal.Notify) would set it where it does nothing, and
// an exec from there leaves the new program without one. So the main
// goroutine stays on the main thread from the start.
func init() {
	if IsChild() {
		runtime.LockOSThread()
	}
}

// RunChild is the whole life of the child process; it returns the exit
// status for os.Exit.
func RunChild(hooks ChildHooks) int {
	// A closed stderr (gonetns --debug ... 2>&1 | head) must not kill the
	// child: with SIGPIPE caught, writes to it just fail. Caught, not
	// ignored: the command, after exec, gets the default disposition.
	signal.Notify(make(chan os.Signal, 1), syscall.SIGPIPE)
	switch os.Getenv(envStage) {
	case stageFirst:
		return firstStage()
	case stageSecond:
		return secondStage(hooks)
	case stageInit:
		return initStage()
	case stageJoin:
		return joinStage(hooks)
	}
	fmt.Fprintln(os.Stderr, "gonetns: RunChild called outside a gonetns child")
	return 125
}

// firstStage waits until the parent has written the id maps, then
// re-executes the binary: capabilities in a user namespace are computed at
// execve(2), and at the first execve the process's uid was still unmapped,
// so it holds none yet.
func firstStage() int {
	f := os.NewFile(ctlFD, "control")
	ctl, err := wire.FileConn(f)
	if err != nil {
		fmt.Fprintf(os.Stderr, "gonetns child: %v\n", err)
		return 125
	}
	var m message
	if _, err := ctl.Recv(&m); err != nil || m.Type != msgProceed {
		// The parent failed or died before mapping the ids.
		return 125
	}
	ctl.Close() // a duplicate; descriptor 3 itself survives the exec
	os.Setenv(envStage, stageSecond)
	err = unix.Exec("/proc/self/exe", os.Args, os.Environ())
	// f must stay reachable up to the exec: its finalizer would close
	// descriptor 3, and the next stage would find its control socket gone
	// or another descriptor in its place (seen 1 run in 40 with a long
	// command line, whose copies made a collection likely).
	runtime.KeepAlive(f)
	fmt.Fprintf(os.Stderr, "gonetns child: re-execute: %v\n", err)
	return 125
}

// initStage is PID 1 of the new PID namespace (--pidns): it mounts a procfs
// that shows the namespace's processes and becomes the command, so that
// the command's $$ is 1.
// The command's exit statuses when it does not run, the shell's (and
// Docker's): found but not executable, not found.
const (
	exitCannotExec = 126
	exitNotFound   = 127
)

func initStage() int {
	path := os.Getenv(envInitPath)
	os.Unsetenv(envInitPath)
	os.Unsetenv(envStage)
	supervise := os.Getenv(envInitSupervise) != ""
	os.Unsetenv(envInitSupervise)
	if err := unix.Mount("proc", "/proc", "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		fmt.Fprintf(os.Stderr, "gonetns: warning: cannot mount /proc for the new PID namespace (%v); it shows the host's processes\n", err)
	}
	if supervise {
		return superviseCommand(path)
	}
	err := unix.Exec(path, os.Args, os.Environ())
	fmt.Fprintf(os.Stderr, "gonetns: exec %s: %v\n", path, err)
	return exitCannotExec
}

func secondStage(hooks ChildHooks) int {
	// The credential change of the exec cleared the parent-death signal.
	// SIGTERM, not SIGKILL: while setting up it ends this process all the
	// same, and once the command runs it is relayed to the command while
	// the end of the control channel tells this process that the parent is
	// gone: it then kills the command and what the command left running
	// (see run), which a SIGKILL here would leave behind.
	unix.Prctl(unix.PR_SET_PDEATHSIG, uintptr(unix.SIGTERM), 0, 0, 0)
	os.Unsetenv(envStage)

	ctl, m, err := recvConfig()
	if err != nil {
		fmt.Fprintf(os.Stderr, "gonetns child: %v\n", err)
		return 125
	}
	cfg := m.Config
	if cfg.ArgvFrom > 0 && cfg.ArgvFrom < len(os.Args) {
		cfg.Args = os.Args[cfg.ArgvFrom:]
	}
	if len(cfg.Args) == 0 {
		fmt.Fprintln(os.Stderr, "gonetns child: no command in the configuration")
		return 125
	}
	log := childLogger(hooks, cfg.Debug)
	extra := inheritedFiles(cfg.ExtraFiles)

	setupErr := func(err error) int {
		ctl.Send(message{Type: msgError, Error: err.Error()})
		return 125
	}
	if err := setupMounts(cfg, log); err != nil {
		return setupErr(err)
	}
	var info any
	var files []*os.File
	if hooks.Network != nil && len(cfg.Network) > 0 && string(cfg.Network) != "null" {
		info, files, err = hooks.Network(cfg.Network, log)
		if err != nil {
			return setupErr(err)
		}
	}
	infoJSON, err := json.Marshal(info)
	if err != nil {
		return setupErr(err)
	}
	if err := ctl.Send(message{Type: msgNetwork, Info: infoJSON}, files...); err != nil {
		return 125
	}
	wire.CloseFiles(files)

	// Wait for the parent to finish its side (netstack, ports, API).
	if _, err := ctl.Recv(&m); err != nil || m.Type != msgStart {
		return 125
	}
	// Orphans of the command become this process's children, whatever it
	// does to leave (double fork, setsid, another process group): reaped
	// here, and found again to be ended when the command exits or the
	// parent dies. Kept even with LeaveOrphans, which leaves them only
	// when the command exits by itself.
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		log.Warn("cannot become a subreaper; orphaned processes go to the host's init and may outlive gonetns", "err", err)
	}
	r := &runner{cfg: cfg, log: log, ctl: ctl}
	return r.run(hooks, extra)
}

// doneAckTimeout bounds the wait for the parent's answer to msgDone
// (which a living parent sends at once, in microseconds): past it, the
// parent is taken for gone.
const doneAckTimeout = 2 * time.Second

// runner starts the command and stays with it: reaping, relaying signals,
// serving the hooks.
type runner struct {
	cfg *childConfig
	log *slog.Logger
	ctl *wire.Conn
}

func (r *runner) run(hooks ChildHooks, extra []*os.File) int {
	env := append(os.Environ(), r.cfg.Env...)
	path, err := lookPath(r.cfg.Args[0], env)
	if err != nil {
		fmt.Fprintf(os.Stderr, "gonetns: %v\n", err)
		r.ctl.Send(message{Type: msgError, Error: err.Error()})
		if errors.Is(err, exec.ErrNotFound) {
			return exitNotFound
		}
		return exitCannotExec
	}

	// Signals sent to this process: those a terminal sends (INT, QUIT,
	// HUP) reached the command directly already; the others are relayed.
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, forwardedSignals...)
	sigchld := make(chan os.Signal, 1)
	signal.Notify(sigchld, unix.SIGCHLD)

	ctx, cancel := context.WithCancel(context.Background())
	type exit struct {
		status int
		signal syscall.Signal // that ended the command, or 0
		err    error
	}
	started := make(chan int, 1)
	done := make(chan exit, 1)
	go func() {
		// Locked and alive until the command is reaped, for Pdeathsig.
		runtime.LockOSThread()
		exe, procEnv, argv := path, env, r.cfg.Args
		files := []*os.File{os.Stdin, os.Stdout, os.Stderr}
		sys := &syscall.SysProcAttr{Pdeathsig: unix.SIGKILL}
		var fate *bufio.Reader // the init process's reports
		if r.cfg.PIDNS {
			// Through the init stage, which mounts /proc and execs path
			// or, with InitProcess, runs it as its child.
			exe = "/proc/self/exe"
			procEnv = append(env[:len(env):len(env)], envStage+"="+stageInit, envInitPath+"="+path)
			sys.Cloneflags = unix.CLONE_NEWPID
			if r.cfg.InitProcess {
				pr, pw, err := os.Pipe()
				if err != nil {
					started <- 0
					done <- exit{status: exitCannotExec, err: fmt.Errorf("init's report pipe: %w", err)}
					return
				}
				defer pr.Close()
				fate = bufio.NewReader(pr)
				files = append(files, pw) // descriptor 3: initFateFD
				procEnv = append(procEnv, envInitSupervise+"=1")
				// Named as what it is in ps, not as the command.
				argv = append([]string{initName}, argv...)
			}
		}
		p, err := os.StartProcess(exe, argv, &os.ProcAttr{
			Env:   procEnv,
			Files: files,
			Sys:   sys,
		})
		if fate != nil {
			files[3].Close()
		}
		if err != nil {
			started <- 0
			done <- exit{status: exitCannotExec, err: fmt.Errorf("start %s: %w", path, err)}
			return
		}
		if fate != nil {
			// Signals relayed before the init process catches them would
			// be lost (PID 1 gets none it has no handler for): the
			// command counts as started once it does.
			fate.ReadString('\n')
		}
		started <- p.Pid
		ws := reap(p.Pid, sigchld)
		e := exit{status: statusOf(ws)}
		if ws.Signaled() {
			e.signal = ws.Signal()
		}
		if fate != nil {
			// The command's own end, as the init process saw it.
			if cws, ok := readFate(fate); ok {
				e = exit{status: statusOf(cws)}
				if cws.Signaled() {
					e.signal = cws.Signal()
				}
			}
		}
		done <- e
	}()
	pid := <-started
	if pid != 0 {
		r.ctl.Send(message{Type: msgStarted, PID: pid})
		r.log.Debug("command started", "pid", pid, "path", path)
		if hooks.Started != nil {
			hooks.Started(r.log)
		}
	}

	// Messages from the parent: relayed signals; end of stream means the
	// parent is gone, and so must everything here be.
	parentGone := make(chan struct{})
	gone := parentGone
	acked := make(chan struct{})
	var ackOnce sync.Once
	go func() {
		defer close(parentGone)
		for {
			var m message
			files, err := r.ctl.Recv(&m)
			wire.CloseFiles(files)
			if err != nil {
				return
			}
			switch {
			case m.Type == msgSignal && pid != 0:
				unix.Kill(pid, syscall.Signal(m.Signal))
			case m.Type == msgDoneAck:
				ackOnce.Do(func() { close(acked) })
			}
		}
	}()
	serveDone := make(chan struct{})
	go func() {
		defer close(serveDone)
		if hooks.Serve != nil {
			hooks.Serve(ctx, extra, r.log)
		}
	}()

	var result exit
	parentLeft := false
loop:
	for {
		select {
		case result = <-done:
			break loop
		case s := <-sigs:
			sig := s.(syscall.Signal)
			switch sig {
			case unix.SIGINT, unix.SIGQUIT, unix.SIGHUP:
				r.log.Debug("terminal signal not relayed", "signal", sig)
			default:
				if pid != 0 {
					unix.Kill(pid, sig)
				}
			}
		case <-parentGone:
			if pid != 0 {
				unix.Kill(pid, unix.SIGKILL)
			}
			parentGone, parentLeft = nil, true
		}
	}
	if result.signal != 0 {
		// For a parent that reports it as RootlessKit does (a signal is
		// not an exit status there).
		r.ctl.Send(message{Type: msgExited, Signal: int(result.signal)})
	}
	// Without the parent there is no network and no one to supervise:
	// nothing is left behind then, LeaveOrphans or not. Whether the
	// parent lives is its to say: the parent-death signal (SIGTERM,
	// relayed to the command like any other) comes when the parent's
	// thread that started this process ends, before its descriptors
	// close, so a dying parent can end the command before the control
	// channel does. A living parent answers msgDone at once.
	leave := !r.cfg.KillOrphans && !parentLeft
	if leave {
		r.ctl.Send(message{Type: msgDone})
		select {
		case <-acked:
		case <-gone:
			leave = false
		case <-time.After(doneAckTimeout):
			r.log.Warn("the parent did not answer; ending what the command left behind")
			leave = false
		}
	}
	if !leave {
		n, left := endChildren()
		if n > 0 {
			r.log.Debug("ended processes the command left behind", "count", n)
		}
		if len(left) > 0 {
			r.log.Warn("processes the command left behind would not end", "pids", fmt.Sprint(left))
		}
	}
	cancel()
	<-serveDone
	if result.err != nil {
		fmt.Fprintf(os.Stderr, "gonetns: %v\n", result.err)
	}
	return result.status
}

// reap waits for every child (this process may be PID 1 or a subreaper)
// until pid exits, and returns pid's wait status.
func reap(pid int, sigchld <-chan os.Signal) unix.WaitStatus {
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
			if got == pid {
				return ws
			}
		}
		<-sigchld
	}
}

// statusOf is the exit status for a wait status: 128+N if signal N ended
// the process.
func statusOf(ws unix.WaitStatus) int {
	if ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return ws.ExitStatus()
}

// defaultPath is the PATH of a command whose environment has none (as
// execvp's default, with the sbin directories of a root shell), and where
// the id mapping helpers are looked for when $PATH lacks them.
const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// notFound is a command that does not exist: exit status 127.
type notFound struct{ msg string }

func (e notFound) Error() string        { return e.msg }
func (e notFound) Is(target error) bool { return target == exec.ErrNotFound }

// lookPath resolves the command with the PATH the command will see.
func lookPath(name string, env []string) (string, error) {
	if strings.Contains(name, "/") {
		return name, checkExecutable(name)
	}
	path := defaultPath
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			path = v
		}
	}
	var firstErr error
	for _, dir := range filepath.SplitList(path) {
		if dir == "" {
			dir = "."
		}
		p := filepath.Join(dir, name)
		err := checkExecutable(p)
		if err == nil {
			return p, nil
		}
		if firstErr == nil && !errors.Is(err, exec.ErrNotFound) {
			firstErr = err
		}
	}
	if firstErr != nil {
		return "", firstErr
	}
	return "", fmt.Errorf("%s: command not found: %w", name, exec.ErrNotFound)
}

func checkExecutable(p string) error {
	st, err := os.Stat(p)
	switch {
	case errors.Is(err, os.ErrNotExist):
		// A path, not a name looked up in $PATH: as a shell says it
		// (it said "executable file not found in $PATH" for ./nosuch).
		return notFound{p + ": no such file or directory"}
	case err != nil:
		return err
	case st.IsDir():
		return fmt.Errorf("%s: is a directory", p)
	}
	if err := unix.Access(p, unix.X_OK); err != nil {
		return fmt.Errorf("%s: not executable: %w", p, err)
	}
	return nil
}

// errNoConfig: the parent sent no configuration (it may be gone).
var errNoConfig = errors.New("no configuration from the parent")

// recvConfig opens the control socket a re-executed stage finds at ctlFD
// and reads its configuration, the parent's first message. (The parent may
// have gone between the fork and the parent-death signal: then the read
// ends at once.)
func recvConfig() (*wire.Conn, message, error) {
	ctlFile := os.NewFile(ctlFD, "control")
	ctl, err := wire.FileConn(ctlFile)
	ctlFile.Close()
	if err != nil {
		return nil, message{}, err
	}
	var m message
	if _, err := ctl.Recv(&m); err != nil || m.Type != msgConfig || m.Config == nil {
		ctl.Close()
		return nil, message{}, fmt.Errorf("%w (%v)", errNoConfig, err)
	}
	return ctl, m, nil
}
