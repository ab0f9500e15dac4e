// Package sandbox runs a command as fake root (uid 0) in new user, mount
// and network namespaces, started by an unprivileged user, with gonetns's
// own userspace network: what the gonetns command does, for Go programs
// that want a sandbox without shipping a second binary (CI runners, test
// harnesses).
//
// The sandbox's child process is this program itself, re-executed: call
// Init first thing in main.
//
//	func main() {
//		sandbox.Init()
//		code, err := sandbox.Run(context.Background(), sandbox.Config{}, []string{"id", "-u"})
//		...
//	}
//
// Run prints 0: the command is root inside. Config mirrors gonetns's flags
// (see gonetns --help): the network (NetBuiltin by default: the sandbox
// is 10.0.2.100, the host's loopback is 10.0.2.2, DNS 10.0.2.3), published
// ports, copy-up, extra namespaces, the state directory. Start returns a
// running Sandbox that publishes ports at run time (AddPort) and serves
// RootlessKit's REST API on StateDir()/api.sock; Wait returns the
// command's exit status.
//
// What the host needs is what gonetns needs: unprivileged user namespaces,
// newuidmap/newgidmap with /etc/subuid and /etc/subgid entries for full id
// maps (else only the caller's id is mapped, with a warning); NetBuiltin
// uses /dev/net/tun when it can be opened, else the packet link (Link).
package sandbox

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync"
	"syscall"

	"github.com/gonetns/gonetns/port"
	"github.com/gonetns/gonetns/userns"
)

// Sandbox is a running sandbox: its namespaces, network and command.
type Sandbox struct {
	cfg   Config
	sd    *userns.StateDir
	nw    *network
	child *userns.Child

	waitOnce sync.Once
	code     int
	waitErr  error
}

// ErrNoPortDriver is returned by the port methods with PortsNone.
var ErrNoPortDriver = errors.New("sandbox: no port driver (PortDriver is none)")

// Start sets up the sandbox and starts args[0] with args in it. It
// returns once the command runs: the network is up and the ports of
// cfg.Publish are published. Cancelling ctx kills the command (and the
// sandbox). Call Wait, or Close, to release everything.
func Start(ctx context.Context, cfg Config, args []string) (*Sandbox, error) {
	if len(args) == 0 {
		return nil, fmt.Errorf("%w: no command given", ErrInvalidConfig)
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	log := cfg.Logger
	sd, err := userns.OpenStateDir(cfg.StateDir)
	if err != nil {
		return nil, err
	}
	for _, d := range sd.Swept {
		log.Debug("removed the state directory of a gonetns that was killed", "path", d)
	}
	log.Debug("state directory", "path", sd.Path)
	s := &Sandbox{cfg: cfg, sd: sd}
	fail := func(err error) (*Sandbox, error) {
		if s.nw != nil {
			s.nw.Close()
		}
		sd.Close()
		return nil, err
	}
	if s.nw, err = newNetwork(cfg, sd); err != nil {
		return fail(err)
	}
	uopts := userns.Options{
		Args: args,
		Env: append([]string{
			"GONETNS_STATE_DIR=" + sd.Path,
			"ROOTLESSKIT_STATE_DIR=" + sd.Path,
			"ROOTLESSKIT_PARENT_EUID=" + strconv.Itoa(os.Geteuid()),
			"ROOTLESSKIT_PARENT_EGID=" + strconv.Itoa(os.Getegid()),
		}, cfg.Env...),
		NewNet:          cfg.Net != NetHost && !cfg.DetachNetNS,
		PIDNS:           cfg.PIDNS,
		InitProcess:     cfg.InitProcess,
		UTSNS:           cfg.UTSNS,
		IPCNS:           cfg.IPCNS,
		CgroupNS:        cfg.CgroupNS,
		Reaper:          cfg.Reaper,
		LeaveOrphans:    cfg.LeaveOrphans,
		Subreaper:       cfg.Subreaper,
		EvacuateCgroup2: cfg.EvacuateCgroup2,
		Propagation:     cfg.Propagation,
		CopyUp:          cfg.CopyUp,
		SubIDSource:     cfg.SubIDSource,
		StateDir:        sd,
		Stdin:           cfg.Stdin,
		Stdout:          cfg.Stdout,
		Stderr:          cfg.Stderr,
		ForwardSignals:  cfg.ForwardSignals,
		Debug:           cfg.Debug,
		Logger:          log,
	}
	s.nw.prepareChild(&uopts)
	child, err := userns.Start(uopts)
	if err != nil {
		return fail(err)
	}
	info, files := child.NetworkInfo()
	if err := s.nw.start(child.PID(), info, files); err != nil {
		child.Kill()
		child.Wait()
		return fail(err)
	}
	if err := child.Begin(ctx); err != nil {
		return fail(err)
	}
	s.child = child
	if cfg.ConfineNetworkProcess {
		s.nw.confine()
	}
	return s, nil
}

// Run starts the sandbox, waits for the command and returns its exit
// status (128+N if signal N ended it; 127 if it was not found, 126 if it
// could not be executed). An error means the sandbox could not be set up.
func Run(ctx context.Context, cfg Config, args []string) (int, error) {
	s, err := Start(ctx, cfg, args)
	if err != nil {
		return 0, err
	}
	return s.Wait()
}

// StateDir is the sandbox's state directory: lock, child_pid, api.sock,
// and netns with DetachNetNS. It is removed when the sandbox ends.
func (s *Sandbox) StateDir() string { return s.sd.Path }

// ChildPID is the host pid of the gonetns child, whose namespaces the
// command runs in (nsenter -t PID -U -m -n --preserve-credentials).
func (s *Sandbox) ChildPID() int { return s.child.PID() }

// AddPort publishes a port at run time, as POST /v1/ports does.
func (s *Sandbox) AddPort(ctx context.Context, spec port.Spec) (port.Status, error) {
	pd := s.nw.portDriver()
	if pd == nil {
		return port.Status{}, ErrNoPortDriver
	}
	return pd.AddPort(ctx, spec)
}

// RemovePort stops publishing port id.
func (s *Sandbox) RemovePort(id int) error {
	pd := s.nw.portDriver()
	if pd == nil {
		return ErrNoPortDriver
	}
	return pd.RemovePort(id)
}

// Ports lists the published ports (with PortsImplicit, the implicit ones
// too, marked so).
func (s *Sandbox) Ports() []port.Status {
	pd := s.nw.portDriver()
	if pd == nil {
		return nil
	}
	return pd.ListPorts()
}

// Signal sends sig to the command.
func (s *Sandbox) Signal(sig syscall.Signal) { s.child.Signal(sig) }

// Wait waits for the command to exit, then tears the sandbox down (network,
// ports, API, state directory) and returns the command's exit status.
// It may be called more than once.
func (s *Sandbox) Wait() (int, error) {
	s.waitOnce.Do(func() {
		s.code, s.waitErr = s.child.Wait()
		s.nw.Close()
		s.sd.Close()
	})
	return s.code, s.waitErr
}

// ExitSignal is the signal that ended the command, once Wait has
// returned (Wait's status is then 128 plus its number); 0 if the command
// exited by itself.
func (s *Sandbox) ExitSignal() syscall.Signal { return s.child.CommandSignal() }

// StartError is why the command could not be started (not found, not
// executable: Wait's status is then 127 or 126), once Wait has returned;
// nil if it started.
func (s *Sandbox) StartError() error { return s.child.StartError() }

// Close kills the command if it still runs and releases everything, as
// Wait does.
func (s *Sandbox) Close() error {
	s.child.Kill()
	_, err := s.Wait()
	return err
}
