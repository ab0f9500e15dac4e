package userns

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"os/user"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/wire"
)

// Options describe the namespaces and the command of one run.
type Options struct {
	// Args is the command and its arguments, run as uid 0 inside.
	Args []string
	// Env is added to the command's environment (after os.Environ()).
	Env []string
	// NewNet creates a network namespace for the child and the command
	// (every --net but host, unless the network namespace is detached:
	// then the network hook creates one of its own and the command stays
	// in the host's).
	NewNet bool
	// PIDNS runs the command as PID 1 of a new PID namespace, with the
	// child as its parent outside it; UTSNS, IPCNS and CgroupNS create
	// those namespaces.
	PIDNS, UTSNS, IPCNS, CgroupNS bool
	// InitProcess, with PIDNS, makes PID 1 of the new PID namespace an
	// init of gonetns's that runs the command as its child, relays every
	// signal to it and reaps the orphans, as RootlessKit's child does;
	// without it the command is PID 1 itself.
	InitProcess bool
	// Reaper is RootlessKit's --reaper ("true", "false", "auto"), checked
	// and otherwise without effect: the child is always the subreaper of
	// the command's tree, which keeps that tree where it can be ended.
	Reaper string
	// LeaveOrphans lets processes the command started and left behind run
	// on after it exits by itself. By default the child ends them
	// (SIGKILL) when the command exits, as a PID namespace does: the
	// sandbox's network goes with gonetns, and nothing should outlive it
	// unnoticed. When this process or the child is killed, everything is
	// ended in any case.
	LeaveOrphans bool
	// Subreaper makes this process the child subreaper of the sandbox's
	// processes (PR_SET_CHILD_SUBREAPER; for the process's whole life):
	// if the child is killed before them (from inside the sandbox, where
	// it is visible without PIDNS), they come here instead of to the
	// host's init, and Wait ends them. Every process re-parented here once
	// the child is gone is taken as the sandbox's: set it in a program
	// whose only children are its sandbox's, as the gonetns command.
	Subreaper bool
	// EvacuateCgroup2 names a cgroup v2 subgroup into which the processes
	// of gonetns's own cgroup are moved before the command runs, with the
	// group's controllers enabled for its subgroups (RootlessKit's
	// --evacuate-cgroup2; needs PIDNS and CgroupNS).
	EvacuateCgroup2 string
	// Propagation of the mounts inside: "rprivate" or "rslave"; ""
	// means DefaultPropagation.
	Propagation string
	// CopyUp lists directories replaced inside by writable tmpfs copies
	// (tmpfs+symlink mode); see ValidateCopyUp.
	CopyUp []string
	// SubIDSource is where subordinate ids are looked up.
	SubIDSource SubIDSource
	// StateDir is open and locked; the caller closes it after Wait.
	StateDir *StateDir
	// ResolvConf and Hosts, when set, become /etc/resolv.conf and
	// /etc/hosts inside: written into the copied-up /etc when /etc is in
	// CopyUp, bind-mounted from the state directory otherwise.
	ResolvConf, Hosts []byte
	// StateOnlyEtcFiles writes ResolvConf and Hosts to the state directory
	// without installing them inside: with a detached network namespace
	// the command stays on the host's network, whose resolvers are the
	// ones it can reach (RootlessKit does the same).
	StateOnlyEtcFiles bool
	// Network is handed, JSON-encoded, to the child's network hook.
	Network any
	// ExtraFiles are given to the child; ChildHooks.Serve receives them.
	ExtraFiles []*os.File
	// Stdin, Stdout and Stderr of the command; nil means the process's
	// own.
	Stdin          io.Reader
	Stdout, Stderr io.Writer
	// ForwardSignals relays the signals this process gets (HUP, INT, QUIT,
	// TERM, USR1, USR2) to the command, as a command-line launcher does.
	ForwardSignals bool
	// Debug turns on the child's debug log.
	Debug  bool
	Logger *slog.Logger
}

// Child is a running gonetns child: the namespaces, their setup, and later
// the command inside.
type Child struct {
	opts    Options
	log     *slog.Logger
	ctl     *wire.Conn
	cmd     *exec.Cmd
	exited  chan struct{} // closed when the child process is reaped
	state   *os.ProcessState
	waitErr error
	sigs    chan os.Signal
	Maps    MapResult
	netInfo json.RawMessage
	netFile []*os.File
	waited  chan struct{} // closed when supervise has returned; nil before Begin
	// cmdSignal is the signal that ended the command (msgExited).
	cmdSignal atomic.Int32
	// startErr is why the command could not be started (msgError once
	// set up), or nil.
	startErr atomic.Pointer[string]
	// commandDone is set when the child reports that the command exited
	// by itself (not because the child or this process was killed).
	commandDone atomic.Bool
	ended       atomic.Bool // endAdopted ran
}

// forwardedSignals are relayed to the command.
var forwardedSignals = []os.Signal{unix.SIGHUP, unix.SIGINT, unix.SIGQUIT, unix.SIGTERM, unix.SIGUSR1, unix.SIGUSR2}

// Start re-executes gonetns as the child in new namespaces, installs the
// id maps, and waits until the child has set up its mounts and run the
// network hook. The command is not started yet: call Run.
func Start(opts Options) (*Child, error) {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	netJSON, err := prepare(opts)
	if err != nil {
		return nil, err
	}
	if opts.Subreaper {
		// Before the child exists: whatever moment it dies at, its
		// processes come here.
		if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
			opts.Logger.Warn("cannot become a subreaper: if the gonetns child is killed, what the command started goes to the host's init", "err", err)
		}
	}
	parentEnd, childEnd, err := wire.Socketpair()
	if err != nil {
		return nil, err
	}
	defer childEnd.Close()
	ctl, err := wire.FileConn(parentEnd)
	parentEnd.Close()
	if err != nil {
		return nil, err
	}
	c := &Child{
		opts:   opts,
		log:    opts.Logger,
		ctl:    ctl,
		cmd:    childCommand(opts, childEnd),
		exited: make(chan struct{}),
		sigs:   make(chan os.Signal, 16),
	}
	// The subordinate ids need no pid: look them up (maybe running
	// getsubids) before the child exists.
	m := idMapper{uid: os.Getuid(), gid: os.Getgid(), user: currentUser(), src: opts.SubIDSource, log: opts.Logger}
	if m.src == "" {
		m.src = SubIDAuto
	}
	plan := m.plan()

	// Catch the signals now: a Ctrl-C during setup must still tear the
	// child down and clean the state directory, not kill only the parent.
	if opts.ForwardSignals {
		signal.Notify(c.sigs, forwardedSignals...)
	}
	if err := c.spawn(); err != nil {
		signal.Stop(c.sigs)
		ctl.Close()
		return nil, fmt.Errorf("create namespaces: %w%s", err, Diagnose(err))
	}
	// The child has its copy: ours must go now, or a child that dies
	// before answering would leave our Recv below waiting forever
	// instead of seeing end of stream.
	childEnd.Close()
	if err := c.setUp(&m, plan, netJSON); err != nil {
		c.Kill()
		<-c.exited
		signal.Stop(c.sigs)
		ctl.Close()
		return nil, err
	}
	return c, nil
}

// prepare checks what can be checked before anything is created, writes
// the state directory's resolv.conf and hosts, and encodes the network
// hook's configuration.
func prepare(opts Options) (netJSON json.RawMessage, err error) {
	if len(opts.Args) == 0 {
		return nil, errors.New("no command given")
	}
	if _, err = ParseReaper(opts.Reaper); err != nil {
		return nil, err
	}
	if err := ValidateCopyUp(opts.CopyUp); err != nil {
		return nil, err
	}
	if opts.ResolvConf != nil {
		if err := opts.StateDir.WriteFile(ResolvConf, opts.ResolvConf, 0o644); err != nil {
			return nil, err
		}
	}
	if opts.Hosts != nil {
		if err := opts.StateDir.WriteFile(HostsFile, opts.Hosts, 0o644); err != nil {
			return nil, err
		}
	}
	if netJSON, err = json.Marshal(opts.Network); err != nil {
		return nil, fmt.Errorf("encode network config: %w", err)
	}
	return netJSON, nil
}

// childCommand is the re-exec of this program as the child, in the new
// namespaces opts asks for, with the control channel's end as descriptor
// 3 and opts.ExtraFiles after it.
func childCommand(opts Options, childEnd *os.File) *exec.Cmd {
	exe, err := os.Executable()
	if err != nil {
		exe = "/proc/self/exe"
	}
	cmd := exec.Command("/proc/self/exe")
	cmd.Args = append([]string{exe}, os.Args[1:]...)
	cmd.Env = append(os.Environ(), envStage+"="+stageFirst)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	if opts.Stdin != nil {
		cmd.Stdin = opts.Stdin
	}
	if opts.Stdout != nil {
		cmd.Stdout = opts.Stdout
	}
	if opts.Stderr != nil {
		cmd.Stderr = opts.Stderr
	}
	// With a writer that is not a file, a goroutine copies from a pipe
	// until every holder of its write end is gone: a process the command
	// left running (LeaveOrphans) would hold Wait forever. What it writes
	// after the child is gone is cut off after this delay.
	cmd.WaitDelay = 2 * time.Second
	cmd.ExtraFiles = append([]*os.File{childEnd}, opts.ExtraFiles...)
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags: cloneFlags(opts),
		Pdeathsig:  unix.SIGKILL,
	}
	return cmd
}

// cloneFlags are the namespaces the child is created in: always user and
// mount, the others as opts asks.
func cloneFlags(opts Options) uintptr {
	flags := unix.CLONE_NEWUSER | unix.CLONE_NEWNS
	if opts.NewNet {
		flags |= unix.CLONE_NEWNET
	}
	if opts.UTSNS {
		flags |= unix.CLONE_NEWUTS
	}
	if opts.IPCNS {
		flags |= unix.CLONE_NEWIPC
	}
	if opts.CgroupNS {
		flags |= unix.CLONE_NEWCGROUP
	}
	return uintptr(flags)
}

// setUp takes the spawned child through its set-up: the id maps, the
// cgroup evacuation, the configuration, and its answer once the mounts
// and the network hook are done.
func (c *Child) setUp(m *idMapper, plan mapPlan, netJSON json.RawMessage) error {
	opts := c.opts
	maps, err := m.mapIDs(c.cmd.Process.Pid, plan)
	if err != nil {
		return fmt.Errorf("set up the id maps: %w", err)
	}
	c.Maps = maps
	for _, w := range maps.Warnings {
		c.log.Warn(w)
	}
	if opts.EvacuateCgroup2 != "" {
		// Before the command runs, so it starts in a group whose parent
		// it may manage (through its cgroup namespace, rooted there).
		if err := evacuateCgroup2(opts.EvacuateCgroup2, c.log); err != nil {
			return err
		}
	}
	c.log.Debug("id maps written", "pid", c.cmd.Process.Pid, "uid_map", maps.UIDMap, "gid_map", maps.GIDMap)

	cfg := &childConfig{
		ArgvFrom:    argvFrom(opts.Args),
		Env:         opts.Env,
		StateDir:    opts.StateDir.Path,
		NewNet:      opts.NewNet,
		PIDNS:       opts.PIDNS,
		InitProcess: opts.InitProcess && opts.PIDNS,
		KillOrphans: !opts.LeaveOrphans && !opts.PIDNS,
		Cgroup2:     opts.EvacuateCgroup2 != "" && opts.CgroupNS,
		Propagation: opts.Propagation,
		CopyUp:      opts.CopyUp,
		DNSFiles:    opts.ResolvConf != nil && !opts.StateOnlyEtcFiles,
		Network:     netJSON,
		ExtraFiles:  len(opts.ExtraFiles),
		Debug:       opts.Debug,
	}
	if cfg.ArgvFrom == 0 {
		cfg.Args = opts.Args
	}
	if err := c.ctl.Send(message{Type: msgProceed}); err != nil {
		return c.childDied(err)
	}
	if err := c.ctl.Send(message{Type: msgConfig, Config: cfg}); err != nil {
		return c.childDied(err)
	}
	var reply message
	files, err := c.ctl.Recv(&reply)
	if err != nil {
		return c.childDied(err)
	}
	switch reply.Type {
	case msgNetwork:
		c.netInfo, c.netFile = reply.Info, files
		return nil
	case msgError:
		wire.CloseFiles(files)
		return fmt.Errorf("set up the namespaces: %s%s", reply.Error, Diagnose(errors.New(reply.Error)))
	default:
		wire.CloseFiles(files)
		return fmt.Errorf("child sent %q during setup", reply.Type)
	}
}

// argvFrom returns where args starts in os.Args (which the child gets as
// its own argv), or 0 when args is not its tail.
func argvFrom(args []string) int {
	i := len(os.Args) - len(args)
	if i < 1 || !slices.Equal(os.Args[i:], args) {
		return 0
	}
	return i
}

// spawn starts the child from a goroutine locked to its OS thread that
// lives until the child is reaped: Pdeathsig fires when the thread that
// forked the child exits, and Go may otherwise retire that thread at any
// time.
func (c *Child) spawn() error {
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// Never unlocked: when this goroutine ends, its thread ends with
		// it, which is fine only after the child is gone.
		if err := c.cmd.Start(); err != nil {
			started <- err
			close(c.exited)
			return
		}
		started <- nil
		c.waitErr = c.cmd.Wait()
		c.state = c.cmd.ProcessState
		close(c.exited)
	}()
	return <-started
}

// childDied turns a control channel failure into the child's own story:
// when the child exited, its status says more than "broken pipe".
func (c *Child) childDied(err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET) {
		<-c.exited
		return fmt.Errorf("the gonetns child exited during setup (%v); run with --debug for details", c.state)
	}
	return err
}

// PID is the child's pid on the host.
func (c *Child) PID() int { return c.cmd.Process.Pid }

// NetworkInfo is what the child's network hook returned, JSON-encoded, and
// the files it sent (the caller owns them).
func (c *Child) NetworkInfo() (json.RawMessage, []*os.File) { return c.netInfo, c.netFile }

// Wait kills nothing: it waits for the child to exit (after Begin, or
// after Kill when setup failed) and returns its exit status, 128+N when a
// signal N ended it.
func (c *Child) Wait() (int, error) {
	<-c.exited
	if c.waited != nil {
		<-c.waited
	} else {
		signal.Stop(c.sigs)
		c.ctl.Close()
	}
	c.endAdopted()
	return exitStatus(c.state, c.waitErr)
}

// endAdopted ends what the command started and this process adopted as
// the subreaper (Options.Subreaper): everything, unless the command
// exited by itself with LeaveOrphans (RootlessKit's behaviour). The child
// ends the tree itself when the command exits or this process dies; what
// comes here is what it could not end because it was killed first.
func (c *Child) endAdopted() {
	if !c.opts.Subreaper || c.ended.Swap(true) {
		return
	}
	if c.opts.LeaveOrphans && c.commandDone.Load() {
		return
	}
	if n, left := endChildren(); n > 0 || len(left) > 0 {
		c.log.Debug("ended processes of the sandbox that outlived the gonetns child", "count", n, "child_status", c.state.String())
		if len(left) > 0 {
			c.log.Warn("processes of the sandbox would not end", "pids", fmt.Sprint(left))
		}
	}
}

// CommandSignal is the signal that ended the command, once Wait has
// returned; 0 if it exited by itself.
func (c *Child) CommandSignal() syscall.Signal { return syscall.Signal(c.cmdSignal.Load()) }

// StartError is why the command could not be started (not found, not
// executable), once Wait has returned; nil if it started.
func (c *Child) StartError() error {
	if e := c.startErr.Load(); e != nil {
		return errors.New(*e)
	}
	return nil
}

// Kill ends the child (and, through Pdeathsig and the PID namespace, what
// runs inside) at once.
func (c *Child) Kill() {
	select {
	case <-c.exited:
	default:
		c.cmd.Process.Signal(unix.SIGKILL)
	}
}

// Begin writes child_pid and tells the child to run the command; from now
// on the command runs, and Wait waits for it. Signals are relayed (with
// Options.ForwardSignals) until it exits. Cancelling ctx kills the child.
func (c *Child) Begin(ctx context.Context) error {
	if err := c.opts.StateDir.writeChildPID(c.PID()); err != nil {
		c.Kill()
		c.ctl.Close()
		<-c.exited
		signal.Stop(c.sigs)
		return err
	}
	if err := c.ctl.Send(message{Type: msgStart}); err != nil {
		c.log.Debug("start message not delivered", "err", err)
	}
	c.waited = make(chan struct{})
	go c.supervise(ctx)
	return nil
}

// Run is Begin and Wait: it returns the command's exit status (128+N when
// a signal N ended it).
func (c *Child) Run(ctx context.Context) (int, error) {
	if err := c.Begin(ctx); err != nil {
		return 0, err
	}
	return c.Wait()
}

// supervise relays signals and messages until the child exits.
func (c *Child) supervise(ctx context.Context) {
	defer close(c.waited)
	defer signal.Stop(c.sigs)
	// The child reports "started", or an error and exits; it exits in any
	// case when the command ends. Only its exit status matters here.
	drained := make(chan struct{})
	go func() {
		defer close(drained)
		c.drainControl()
	}()
	defer func() {
		// The child is gone: what it sent last (msgExited) is read up to
		// the end of the stream, which its exit makes; the bound is for a
		// descriptor of it that outlived it somewhere.
		select {
		case <-drained:
		case <-time.After(time.Second):
		}
		c.ctl.Close()
		<-drained
	}()
	for {
		select {
		case <-c.exited:
			return
		case <-ctx.Done():
			c.Kill()
			<-c.exited
			return
		case s := <-c.sigs:
			sig := s.(syscall.Signal)
			if fromTerminal(sig) {
				// The terminal sent it to the whole foreground process
				// group, the command included: relaying it would deliver
				// it twice.
				c.log.Debug("signal from the terminal, not relayed", "signal", sig)
				continue
			}
			c.log.Debug("relaying signal", "signal", sig)
			c.Signal(sig)
		}
	}
}

// Signal delivers sig to the command (through the child, which knows its
// pid in the namespace), or to the child itself if that fails.
func (c *Child) Signal(sig syscall.Signal) {
	if err := c.ctl.Send(message{Type: msgSignal, Signal: int(sig)}); err != nil {
		c.cmd.Process.Signal(sig)
	}
}

func (c *Child) drainControl() {
	for {
		var m message
		files, err := c.ctl.Recv(&m)
		wire.CloseFiles(files)
		if err != nil {
			return
		}
		switch m.Type {
		case msgStarted:
			c.log.Debug("command started", "pid_in_namespace", m.PID)
		case msgExited:
			c.cmdSignal.Store(int32(m.Signal))
		case msgDone:
			c.commandDone.Store(true)
			c.ctl.Send(message{Type: msgDoneAck})
		case msgError:
			c.log.Debug("child reported", "error", m.Error)
			c.startErr.Store(&m.Error)
		}
	}
}

// fromTerminal reports whether sig is one a terminal sends (INT, QUIT, HUP)
// while gonetns's process group is the terminal's foreground group.
func fromTerminal(sig syscall.Signal) bool {
	switch sig {
	case unix.SIGINT, unix.SIGQUIT, unix.SIGHUP:
	default:
		return false
	}
	fg, err := unix.IoctlGetInt(0, unix.TIOCGPGRP)
	return err == nil && fg == unix.Getpgrp()
}

func exitStatus(st *os.ProcessState, waitErr error) (int, error) {
	if st == nil {
		return 0, fmt.Errorf("wait for the child: %w", waitErr)
	}
	if ws, ok := st.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return 128 + int(ws.Signal()), nil
	}
	return st.ExitCode(), nil
}

// ParseReaper parses --reaper: auto (or "") and false are false.
func ParseReaper(s string) (bool, error) {
	switch s {
	case "", "auto":
		return false, nil
	case "true":
		return true, nil
	case "false":
		return false, nil
	}
	return false, fmt.Errorf("invalid --reaper=%s: use auto, true or false", s)
}

// DefaultPropagation is the mount propagation inside when none is asked
// for, RootlessKit's.
const DefaultPropagation = "rprivate"

// propagations are the mount propagations --propagation accepts, with
// their mount flag.
var propagations = map[string]uintptr{"rprivate": unix.MS_PRIVATE, "rslave": unix.MS_SLAVE}

// ParsePropagation parses --propagation ("" is DefaultPropagation) into
// the mount flag that sets it (recursively, with MS_REC).
func ParsePropagation(s string) (uintptr, error) {
	if s == "" {
		s = DefaultPropagation
	}
	flag, ok := propagations[s]
	if !ok {
		return 0, fmt.Errorf("invalid --propagation=%s: use rprivate or rslave", s)
	}
	return flag, nil
}

// ValidateCopyUp checks --copy-up directories before anything is created.
func ValidateCopyUp(dirs []string) error {
	seen := map[string]bool{}
	for _, d := range dirs {
		if !filepath.IsAbs(d) {
			return fmt.Errorf("--copy-up=%s: the path must be absolute, e.g. --copy-up=/etc", d)
		}
		clean := filepath.Clean(d)
		switch clean {
		case "/":
			return errors.New("--copy-up=/ is not possible: copy up the directories you need to write, e.g. --copy-up=/etc")
		case "/tmp":
			return errors.New("--copy-up=/tmp is refused (as RootlessKit does): /tmp is already writable, and gonetns's state may live there")
		}
		for _, k := range []string{"/proc", "/sys", "/dev"} {
			if clean == k || strings.HasPrefix(clean, k+"/") {
				// It failed in the child with "move the original into
				// place: no such file or directory".
				return fmt.Errorf("--copy-up=%s: %s is a kernel filesystem, not files that can be copied", d, k)
			}
		}
		st, err := os.Stat(clean)
		if err != nil {
			return fmt.Errorf("--copy-up=%s: %w", d, err)
		}
		if !st.IsDir() {
			return fmt.Errorf("--copy-up=%s: not a directory", d)
		}
		if unix.Access(clean, unix.R_OK|unix.X_OK) != nil {
			// It failed in the child with "permission denied" and a hint
			// about containers and user namespaces, which were fine.
			return fmt.Errorf("--copy-up=%s: you (uid %d) cannot read it, and what cannot be read cannot be copied: copy up a directory you can read", d, os.Getuid())
		}
		if seen[clean] {
			return fmt.Errorf("--copy-up=%s given twice", d)
		}
		seen[clean] = true
	}
	return nil
}

func currentUser() string {
	if u, err := user.Current(); err == nil {
		return u.Username
	}
	if s := os.Getenv("USER"); s != "" {
		return s
	}
	return strconv.Itoa(os.Getuid())
}

// IsChild reports whether this process is a re-executed gonetns child; main
// must then call RunChild before anything else.
func IsChild() bool {
	switch os.Getenv(envStage) {
	case stageFirst, stageSecond, stageInit, stageJoin:
		return true
	}
	return false
}
