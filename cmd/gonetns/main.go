// Command gonetns runs a command as fake root in new user, mount and
// network namespaces, started by an unprivileged user, and is itself that
// namespace's network: a userspace TCP/IP stack that NATs to host sockets.
//
//	gonetns [flags] COMMAND [ARGS...]
//	gonetns ctl [--socket PATH] list-ports|add-ports|remove-ports|info
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"strconv"
	"syscall"

	"github.com/gonetns/gonetns/tap"
	"github.com/gonetns/gonetns/userns"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = ""

// Exit statuses of gonetns itself, as container runtimes use them; any
// other status is the command's.
const (
	exitSetup       = 125 // gonetns could not set up the sandbox
	exitUsage       = 2   // bad flags
	exitNotExec     = 126
	exitNotFoundCmd = 127
)

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	setProcs()
	// A closed stderr (gonetns --debug ... 2>&1 | head) must not kill the
	// sandbox: with SIGPIPE caught, writes to it just fail. Caught, not
	// ignored: the command, after exec, gets the default disposition.
	signal.Notify(make(chan os.Signal, 1), syscall.SIGPIPE)
	if userns.IsChild() {
		return userns.RunChild(childHooks())
	}
	if len(args) > 0 && args[0] == "ctl" {
		return runCtl(args[1:], os.Stdout, os.Stderr)
	}
	o, err := parseFlags(args, os.Stdout)
	if errors.Is(err, errHelpShown) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "gonetns: %v\nRun 'gonetns --help' for the flags.\n", err)
		return exitUsage
	}
	if o.version {
		fmt.Println(versionString())
		return 0
	}
	log := newLogger(os.Stderr, o.debug, "gonetns: ")
	if o.cpuProfile != "" {
		stop, err := startCPUProfile(o.cpuProfile)
		if err != nil {
			log.Error(err.Error())
			return exitSetup
		}
		defer stop()
	}
	code, err := runSandbox(o, log)
	if err != nil {
		log.Error(err.Error())
		return exitSetup
	}
	return code
}

// runSandbox sets up the namespaces and the network, runs the command and
// returns its exit status.
func runSandbox(o *options, log *slog.Logger) (int, error) {
	sd, err := userns.OpenStateDir(o.stateDir)
	if err != nil {
		return 0, err
	}
	defer sd.Close()
	log.Debug("state directory", "path", sd.Path)

	nw, err := newNetwork(o, sd, log)
	if err != nil {
		return 0, err
	}
	defer nw.Close()

	uopts := userns.Options{
		Args: o.args,
		Env: []string{
			"GONETNS_STATE_DIR=" + sd.Path,
			"ROOTLESSKIT_STATE_DIR=" + sd.Path,
			"ROOTLESSKIT_PARENT_EUID=" + strconv.Itoa(os.Geteuid()),
			"ROOTLESSKIT_PARENT_EGID=" + strconv.Itoa(os.Getegid()),
		},
		NewNet:      o.net != "host",
		PIDNS:       o.pidns,
		UTSNS:       o.utsns,
		IPCNS:       o.ipcns,
		CgroupNS:    o.cgroupns,
		Reaper:      o.reaper,
		Propagation: o.propagation,
		CopyUp:      o.copyUp,
		SubIDSource: o.subidSource,
		StateDir:    sd,
		Debug:       o.debug,
		Logger:      log,
	}
	nw.prepareChild(&uopts)

	child, err := userns.Start(uopts)
	if err != nil {
		return 0, err
	}
	info, files := child.NetworkInfo()
	if err := nw.start(child, info, files); err != nil {
		child.Kill()
		child.Wait()
		return 0, err
	}
	return child.Run(context.Background())
}

// netConfig is what the child's network hook receives.
type netConfig struct {
	Mode    string         `json:"mode"` // "none" or "builtin"
	Link    tap.LinkConfig `json:"link"`
	VNetHdr bool           `json:"vnetHdr"`
}

// tapInfo is what the child's network hook returns for --net=builtin.
type tapInfo struct {
	Name    string `json:"name"`
	VNetHdr bool   `json:"vnetHdr"`
	Offload bool   `json:"offload"`
}

// childHooks wire the child's side: the TAP and the namespace's
// addresses, and the published ports' dialer.
func childHooks() userns.ChildHooks {
	return userns.ChildHooks{
		NewLogger: func(debug bool) *slog.Logger { return newLogger(os.Stderr, debug, "gonetns(child): ") },
		Network: func(raw json.RawMessage, log *slog.Logger) (any, []*os.File, error) {
			var c netConfig
			if err := json.Unmarshal(raw, &c); err != nil {
				return nil, nil, fmt.Errorf("network config: %w", err)
			}
			switch c.Mode {
			case "none":
				return nil, nil, tap.LoopbackUp()
			case "builtin":
				dev, err := tap.Open(tap.Options{Name: c.Link.Name, VNetHdr: c.VNetHdr})
				if err != nil {
					return nil, nil, err
				}
				if err := tap.Configure(c.Link); err != nil {
					dev.File.Close()
					return nil, nil, err
				}
				log.Debug("TAP ready", "name", dev.Name, "vnet_hdr", dev.VNetHdr, "offload", dev.Offload)
				return tapInfo{Name: dev.Name, VNetHdr: dev.VNetHdr, Offload: dev.Offload}, []*os.File{dev.File}, nil
			}
			return nil, nil, fmt.Errorf("unknown network mode %q", c.Mode)
		},
		Serve: serveChild,
	}
}

// setProcs sizes the Go scheduler for a process that is mostly a packet
// pipeline: one P on machines of up to four CPUs, a quarter of them above.
// Measured on 2 cores (bench/results): with one P, throughput is higher in
// both directions and new connections per second double, because a second
// P mostly adds cross-CPU wake-ups and competes with the sandbox's own
// programs and the kernel, while blocking system calls still hand the P
// to another thread. GOMAXPROCS in the environment overrides it.
func setProcs() {
	if os.Getenv("GOMAXPROCS") != "" {
		return
	}
	runtime.GOMAXPROCS(max(1, runtime.NumCPU()/4))
}

// startCPUProfile profiles the parent until stop is called.
func startCPUProfile(path string) (stop func(), err error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("--cpuprofile: %w", err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, fmt.Errorf("--cpuprofile: %w", err)
	}
	return func() {
		pprof.StopCPUProfile()
		f.Close()
	}, nil
}

func versionString() string {
	v := version
	if v == "" {
		v = "devel"
		if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			v = bi.Main.Version
		}
	}
	gv := "unknown"
	goV := "unknown"
	if bi, ok := debug.ReadBuildInfo(); ok {
		goV = bi.GoVersion
		for _, d := range bi.Deps {
			if d.Path == "gvisor.dev/gvisor" {
				gv = d.Version
			}
		}
	}
	return fmt.Sprintf("gonetns version %s (%s, gvisor %s)", v, goV, gv)
}
