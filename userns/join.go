package userns

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/wire"
)

// JoinOptions describe a network namespace made by someone else (a
// container engine, RootlessKit 1.x, unshare -rn), to be given gonetns's
// network the way slirp4netns gives it its own.
type JoinOptions struct {
	// NetNS is the network namespace's path: /proc/PID/ns/net, or a bind
	// mount of one (Podman's $XDG_RUNTIME_DIR/netns/..., ip netns).
	NetNS string
	// UserNS is a user namespace to enter first, for a network namespace
	// that belongs to one this process has no capabilities in (RootlessKit
	// 1.x and unshare -rn: the target's /proc/PID/ns/user). "" or this
	// process's own user namespace: none is entered (Podman runs
	// slirp4netns as root of its user namespace already). Entering it may
	// fail, as when it is not this user's: the helper then tries the
	// network namespace all the same, as slirp4netns does, and that
	// decides.
	UserNS string
	// Network is handed, JSON-encoded, to the helper's network hook
	// (ChildHooks.Network), which sets up the link there and returns its
	// descriptor.
	Network any
	// ExtraFiles go to the helper's serve hook (ChildHooks.Serve), which
	// runs in the namespaces until Close (published ports are dialled
	// there). With none the helper exits once the network hook has run.
	ExtraFiles []*os.File
	// Debug turns on the helper's debug log.
	Debug  bool
	Logger *slog.Logger
}

// Helper is this program running in a joined network namespace (and its
// user namespace): it set up the link there, and serves the ExtraFiles
// until Close.
type Helper struct {
	log     *slog.Logger
	ctl     *wire.Conn
	pid     int
	exited  chan struct{} // closed when the helper is reaped
	status  unix.WaitStatus
	netInfo json.RawMessage
	netFile []*os.File
	serving bool
}

// Join starts the helper in the namespaces of opts and waits until its
// network hook has run. With ExtraFiles, call Serve, then Close when done;
// without, the helper has exited already (Close only reaps it).
func Join(opts JoinOptions) (*Helper, error) {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	netJSON, err := json.Marshal(opts.Network)
	if err != nil {
		return nil, fmt.Errorf("encode network config: %w", err)
	}
	netFD, err := openNS(opts.NetNS)
	if err != nil {
		return nil, err
	}
	defer unix.Close(netFD)
	userFD := -1
	if opts.UserNS != "" {
		same, err := sameNS(opts.UserNS, "/proc/self/ns/user")
		if err != nil {
			return nil, err
		}
		if !same {
			if userFD, err = openNS(opts.UserNS); err != nil {
				return nil, err
			}
			defer unix.Close(userFD)
		}
	}
	parentEnd, childEnd, err := wire.Socketpair()
	if err != nil {
		return nil, err
	}
	ctl, err := wire.FileConn(parentEnd)
	parentEnd.Close()
	if err != nil {
		childEnd.Close()
		return nil, err
	}
	h := &Helper{log: opts.Logger, ctl: ctl, exited: make(chan struct{})}
	err = h.spawn(userFD, netFD, append([]*os.File{childEnd}, opts.ExtraFiles...))
	childEnd.Close()
	if err != nil {
		ctl.Close()
		return nil, err
	}
	h.log.Debug("namespace helper started", "pid", h.pid, "netns", opts.NetNS, "userns", opts.UserNS, "entered_userns", userFD >= 0)
	cfg := &childConfig{Network: netJSON, ExtraFiles: len(opts.ExtraFiles), Debug: opts.Debug}
	if err := h.handshake(cfg); err != nil {
		h.Close()
		return nil, err
	}
	return h, nil
}

// openNS opens a namespace file, in the words slirp4netns uses when it
// cannot.
func openNS(path string) (int, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, &os.PathError{Op: "open", Path: path, Err: err}
	}
	return fd, nil
}

// sameNS reports whether two namespace files are the same namespace.
func sameNS(a, b string) (bool, error) {
	var sa, sb unix.Stat_t
	if err := unix.Stat(a, &sa); err != nil {
		return false, &os.PathError{Op: "stat", Path: a, Err: err}
	}
	if err := unix.Stat(b, &sb); err != nil {
		return false, &os.PathError{Op: "stat", Path: b, Err: err}
	}
	return sa.Dev == sb.Dev && sa.Ino == sb.Ino, nil
}

// spawn forks the helper from a goroutine locked to its thread for the
// helper's whole life: the helper's parent-death signal fires when that
// thread ends.
func (h *Helper) spawn(userFD, netFD int, files []*os.File) error {
	r := &enterRequest{userFD: userFD, netFD: netFD}
	var high []int
	defer func() {
		for _, fd := range high {
			unix.Close(fd)
		}
	}()
	for _, f := range files {
		// Above every target, so that moving one to 3+i in the child
		// never overwrites another still to be moved.
		fd, err := dupAbove(f, 3+len(files))
		if err != nil {
			return err
		}
		high = append(high, fd)
		r.keep = append(r.keep, int32(fd))
	}
	exe := "/proc/self/exe"
	var err error
	if r.path, err = syscall.BytePtrFromString(exe); err != nil {
		return err
	}
	argv := []string{os.Args[0], "(network namespace helper)"}
	if r.argv, err = syscall.SlicePtrFromStrings(argv); err != nil {
		return err
	}
	env := append(os.Environ(), envStage+"="+stageJoin)
	if r.envp, err = syscall.SlicePtrFromStrings(env); err != nil {
		return err
	}
	started := make(chan error, 1)
	go func() {
		// Never unlocked: the thread ends with the goroutine, after the
		// helper has been reaped.
		runtime.LockOSThread()
		pid, err := enterExec(r)
		runtime.KeepAlive(files)
		if err != nil {
			started <- err
			close(h.exited)
			return
		}
		h.pid = pid
		started <- nil
		for {
			_, err := unix.Wait4(pid, &h.status, 0, nil)
			if err != unix.EINTR {
				break
			}
		}
		close(h.exited)
	}()
	return <-started
}

// dupAbove duplicates f's descriptor to one at or above min.
func dupAbove(f *os.File, min int) (int, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return -1, err
	}
	var fd int
	var derr error
	if err := rc.Control(func(s uintptr) { fd, derr = unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, min) }); err != nil {
		return -1, err
	}
	return fd, derr
}

// handshake gives the helper its configuration and waits for the network
// hook's answer.
func (h *Helper) handshake(cfg *childConfig) error {
	if err := h.ctl.Send(message{Type: msgConfig, Config: cfg}); err != nil {
		return h.died(err)
	}
	var reply message
	files, err := h.ctl.Recv(&reply)
	if err != nil {
		return h.died(err)
	}
	switch reply.Type {
	case msgNetwork:
		h.netInfo, h.netFile = reply.Info, files
		return nil
	case msgError:
		wire.CloseFiles(files)
		return errors.New(reply.Error)
	default:
		wire.CloseFiles(files)
		return fmt.Errorf("the namespace helper sent %q during set-up", reply.Type)
	}
}

// died turns a control channel failure into the helper's own story.
func (h *Helper) died(err error) error {
	select {
	case <-h.exited:
	case <-time.After(time.Second):
		return fmt.Errorf("the namespace helper stopped answering: %w", err)
	}
	return fmt.Errorf("the namespace helper exited during set-up (%s)", describeStatus(h.status))
}

func describeStatus(ws unix.WaitStatus) string {
	if ws.Signaled() {
		return "killed by " + ws.Signal().String()
	}
	return "exit status " + strconv.Itoa(ws.ExitStatus())
}

// PID is the helper's pid.
func (h *Helper) PID() int { return h.pid }

// NetworkInfo is what the helper's network hook returned: its info and
// files (the link's descriptor), which the caller now owns.
func (h *Helper) NetworkInfo() (json.RawMessage, []*os.File) { return h.netInfo, h.netFile }

// Serve lets the helper run its serve hook with the ExtraFiles, until
// Close.
func (h *Helper) Serve() error {
	if err := h.ctl.Send(message{Type: msgStart}); err != nil {
		return h.died(err)
	}
	h.serving = true
	return nil
}

// Exited is closed when the helper has exited.
func (h *Helper) Exited() <-chan struct{} { return h.exited }

// helperGrace is how long Close waits for the helper to end its serve
// hook before killing it.
const helperGrace = 2 * time.Second

// Close ends the helper (its serve hook returns when the control channel
// closes) and reaps it. Idempotent.
func (h *Helper) Close() error {
	h.ctl.Close()
	select {
	case <-h.exited:
	case <-time.After(helperGrace):
		unix.Kill(h.pid, unix.SIGKILL)
		<-h.exited
	}
	return nil
}

// joinStage is the helper's side of Join: it runs in the joined
// namespaces, with the control socket at descriptor 3 and the extra files
// after it.
func joinStage(hooks ChildHooks) int {
	os.Unsetenv(envStage)
	ctl, m, err := recvConfig()
	if err != nil {
		if !errors.Is(err, errNoConfig) { // a parent gone is no news
			fmt.Fprintf(os.Stderr, "gonetns namespace helper: %v\n", err)
		}
		return 1
	}
	cfg := m.Config
	log := childLogger(hooks, cfg.Debug)
	extra := inheritedFiles(cfg.ExtraFiles)
	info, files, err := hooks.Network(cfg.Network, log)
	if err != nil {
		ctl.Send(message{Type: msgError, Error: err.Error()})
		return 1
	}
	infoJSON, err := json.Marshal(info)
	if err != nil {
		wire.CloseFiles(files)
		ctl.Send(message{Type: msgError, Error: err.Error()})
		return 1
	}
	err = ctl.Send(message{Type: msgNetwork, Info: infoJSON}, files...)
	wire.CloseFiles(files)
	if err != nil || len(extra) == 0 {
		return 0
	}
	if _, err := ctl.Recv(&m); err != nil || m.Type != msgStart {
		return 0
	}
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		defer cancel()
		for {
			files, err := ctl.Recv(&m)
			wire.CloseFiles(files)
			if err != nil {
				return
			}
		}
	}()
	if hooks.Serve != nil {
		hooks.Serve(ctx, extra, log)
	}
	return 0
}

// childLogger is the logger of a child or helper: the hooks' own, or
// slog's text handler on stderr.
func childLogger(hooks ChildHooks, debug bool) *slog.Logger {
	if hooks.NewLogger != nil {
		return hooks.NewLogger(debug)
	}
	level := slog.LevelInfo
	if debug {
		level = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
}

// inheritedFiles are the n extra files after the control socket.
func inheritedFiles(n int) []*os.File {
	var extra []*os.File
	for i := 0; i < n; i++ {
		f := os.NewFile(uintptr(ctlFD+1+i), "extra-"+strconv.Itoa(i))
		unix.CloseOnExec(int(f.Fd()))
		extra = append(extra, f)
	}
	return extra
}
