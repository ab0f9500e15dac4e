// Command gonetns runs a command as fake root in new user, mount and
// network namespaces, started by an unprivileged user, and is itself that
// namespace's network: a userspace TCP/IP stack that NATs to host sockets.
//
//	gonetns [flags] COMMAND [ARGS...]
//	gonetns ctl [--socket PATH] list-ports|add-ports|remove-ports|info
//
// Under the names rootlesskit, rootlessctl and rootlesskit-docker-proxy
// (argv[0]; a symlink is enough) it speaks those programs' command lines
// (dispatch.go).
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"strings"
	"syscall"

	"github.com/gonetns/gonetns/sandbox"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = ""

// baseVersion is gonetns's semantic version when the build sets none.
const baseVersion = "0.2.0"

// Exit statuses of gonetns itself, as container runtimes use them; any
// other status is the command's.
const (
	exitSetup = 125 // gonetns could not set up the sandbox
	exitUsage = 2   // bad flags
	// exitRootlessKit is both of them invoked as rootlesskit, whose every
	// failure of its own is 1.
	exitRootlessKit = 1
)

func main() {
	// No heap profiling: gonetns has no way to ask for a heap profile
	// (runtime/pprof is linked for --cpuprofile, which keeps it on), and
	// the runtime's record of sampled allocations never shrinks: each call
	// stack sampled for the first time takes a record and touches a page
	// of a 1.4 MB hash table, one source of the 4 KiB steps in which the
	// network process's memory rose at a soak's quiet points
	// (docs/design.md, "Memory after traffic").
	runtime.MemProfileRate = 0
	// In the re-executed child, this runs the child and exits.
	sandbox.Init(sandbox.ChildLogger(func(debug bool) *slog.Logger {
		return newLogger(os.Stderr, debug, "gonetns(child): ")
	}))
	os.Exit(dispatch(os.Args))
}

// runLauncher is gonetns (or rootlesskit): parse the flags, run the
// sandbox, return the command's exit status.
func runLauncher(args []string, who personality, name string) int {
	tuneRuntime()
	usageCode, setupCode := exitUsage, exitSetup
	if who == asRootlessKit {
		usageCode, setupCode = exitRootlessKit, exitRootlessKit
	}
	// A closed stderr (gonetns --debug ... 2>&1 | head) must not kill the
	// sandbox: with SIGPIPE caught, writes to it just fail. Caught, not
	// ignored: the command, after exec, gets the default disposition.
	signal.Notify(make(chan os.Signal, 1), syscall.SIGPIPE)
	ignoreStraySignals()
	// What parsing logs (ignored flags, at debug) waits for the logger,
	// whose level --debug sets.
	var pending []slog.Record
	collect := slog.New(&recordCollector{records: &pending})
	o, err := parseFlags(args, who, name, os.Stdout, collect)
	if errors.Is(err, errHelpShown) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\nRun '%s --help' for the flags.\n", name, err, name)
		return usageCode
	}
	if o.version {
		fmt.Println(versionString(who))
		return 0
	}
	if o.printSemver != "" {
		n, err := semverPart(semver(who), o.printSemver)
		if err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", name, err)
			return usageCode
		}
		fmt.Println(n)
		return 0
	}
	if o.cfg.RunsEventLoop() && os.Getenv("GOMAXPROCS") == "" {
		// The event loop's thread holds a P while it sleeps in
		// epoll_wait between the frames of traffic that flows
		// (sandbox.Config.DisableEventLoop): one more for the rest.
		runtime.GOMAXPROCS(runtime.GOMAXPROCS(0) + 1)
	}
	log := newLogger(os.Stderr, o.cfg.Debug, name+": ")
	for _, r := range pending {
		if log.Enabled(context.Background(), r.Level) {
			log.Handler().Handle(context.Background(), r)
		}
	}
	if o.cpuProfile != "" {
		stop, err := startCPUProfile(o.cpuProfile)
		if err != nil {
			log.Error(err.Error())
			return setupCode
		}
		defer stop()
	}
	cfg := o.cfg
	cfg.Logger = log
	cfg.ForwardSignals = true
	// gonetns has no other children: it can take the sandbox's back if
	// the child is killed first.
	cfg.Subreaper = true
	cfg.Version = semver(who)
	// The parent's own policy, not the sandbox package's: a program that
	// embeds a sandbox keeps its memory management to itself.
	memCtx, stopMem := context.WithCancel(context.Background())
	memDone := make(chan struct{})
	go func() {
		defer close(memDone)
		returnMemory(memCtx)
	}()
	if who == asRootlessKit {
		// RootlessKit's layout with --pidns: its own init is PID 1 and
		// relays signals to the command.
		cfg.InitProcess = true
	}
	end, err := runSandbox(cfg, o.args, log)
	stopMem()
	<-memDone
	if err != nil {
		log.Error(err.Error())
		if errors.Is(err, sandbox.ErrInvalidConfig) {
			return usageCode
		}
		return setupCode
	}
	if end.startErr != nil && who == asRootlessKit {
		// RootlessKit's status for a command it could not start is its
		// own failure's, 1 (gonetns's is a shell's: 127 not found, 126
		// not executable).
		log.Error(fmt.Sprintf("command %v exited: %v", o.args, end.startErr))
		return exitRootlessKit
	}
	if end.sig != 0 && who == asRootlessKit {
		// RootlessKit has no status for a signal: it says which, in Go's
		// words, and exits 255 (os.Exit of exec's -1).
		log.Error(fmt.Sprintf("command %v exited: signal: %v", o.args, end.sig))
		return exitRootlessKitSignal
	}
	return end.code
}

// exitRootlessKitSignal is rootlesskit's status when the command was
// ended by a signal.
const exitRootlessKitSignal = 255

// commandEnd is how the command ended: its exit status, the signal that
// ended it (or 0), and why it could not be started (or nil).
type commandEnd struct {
	code     int
	sig      syscall.Signal
	startErr error
}

// runSandbox runs the sandbox and returns how the command ended. The
// end-to-end tests' probe (probe_e2e.go, built only with the e2ehooks
// tag) runs between the start and the wait.
func runSandbox(cfg sandbox.Config, args []string, log *slog.Logger) (commandEnd, error) {
	s, err := sandbox.Start(context.Background(), cfg, args)
	if err != nil {
		return commandEnd{}, err
	}
	afterStart(s, log)
	code, err := s.Wait()
	return commandEnd{code, s.ExitSignal(), s.StartError()}, err
}

// recordCollector keeps records for a logger made later.
type recordCollector struct{ records *[]slog.Record }

func (c *recordCollector) Enabled(context.Context, slog.Level) bool { return true }
func (c *recordCollector) Handle(_ context.Context, r slog.Record) error {
	*c.records = append(*c.records, r.Clone())
	return nil
}
func (c *recordCollector) WithAttrs([]slog.Attr) slog.Handler { return c }
func (c *recordCollector) WithGroup(string) slog.Handler      { return c }

// tuneRuntime sizes the Go scheduler (and the collector: gcPercent) for
// a process that is mostly a packet pipeline: one P on machines of up to
// four CPUs, a quarter of them above. Measured on 2 cores
// (bench/results): with one P, throughput is higher in both directions
// and new connections per second double, because a second P mostly adds
// cross-CPU wake-ups and competes with the sandbox's own programs and the
// kernel, while blocking system calls still hand the P to another thread.
// Re-measured for small traffic (medians of 5 interleaved runs, MTU
// 1500): one P against two, 1-byte TCP round trip 83 against 126 µs, new
// connections 1397 against 1318 per second; UDP round trips were within
// the noise of the loaded machine (124 against 69 µs, ranges 72-175 and
// 53-205). GOMAXPROCS in the environment overrides it.
func tuneRuntime() {
	if os.Getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(max(1, runtime.NumCPU()/4))
	}
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(gcPercent)
	}
}

// gcPercent is the collector's GOGC for the network process: a collection
// when the heap has grown by a quarter of what it held live, not doubled.
// Its live heap is small (0.7 MiB of objects at rest, the netstack's
// included) and traffic leaves little garbage (a new connection's state;
// frames and queued bytes are pooled or outside the heap), so collections
// stay cheap, and what the heap reaches under traffic is lower and the
// same from one burst to the next. At 100, each new high of the heap left
// the runtime's bookkeeping for it (span sets, span structs, the
// collector's work buffers) resident for good: in 8-minute soaks
// (scripts/soak.sh), 9 pages of it added at the quiet points after the
// first minute against 4 at 25, and peaks under traffic of 9.1 and 8.3
// MiB in and after the first minute against 6.0 and 7.9 (docs/design.md,
// "Memory after traffic"). Small traffic costs no more (4 interleaved
// pairs, MTU 65520: new connections 2,764-3,258 per second at 100 against
// 2,883-3,421, 1-byte round trips p50 78-85 against 81-90 µs); 10,000 new
// connections take 14 collections against 6. GOGC in the environment
// overrides it.
const gcPercent = 25

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

// rootlessKitVersion is the RootlessKit release whose command line and
// API gonetns implements; invoked as rootlesskit, gonetns reports it, so
// that scripts testing RootlessKit's version find the features they look
// for.
const rootlessKitVersion = "3.0.1"

// gonetnsVersion is gonetns's own version: -X main.version when the build
// sets it, else baseVersion with the commit the binary was built from.
func gonetnsVersion() string {
	if version != "" {
		return version
	}
	v := baseVersion
	if bi, ok := debug.ReadBuildInfo(); ok {
		// A tagged release (go install ...@v1.2.3); not the pseudo-version
		// "v0.0.0-DATE-COMMIT" Go gives a build in a git checkout.
		if mv := bi.Main.Version; mv != "" && mv != "(devel)" && !strings.HasPrefix(mv, "v0.0.0-") {
			return strings.TrimPrefix(mv, "v")
		}
		var rev, dirty string
		for _, s := range bi.Settings {
			switch {
			case s.Key == "vcs.revision" && len(s.Value) >= 12:
				rev = s.Value[:12]
			case s.Key == "vcs.modified" && s.Value == "true":
				dirty = ".dirty"
			}
		}
		if rev != "" {
			return v + "+" + rev + dirty
		}
	}
	return v + "+devel"
}

// semver is the version --print-semver reads and /v1/info reports: as
// rootlesskit, RootlessKit's with gonetns's in the build metadata (clients
// compare the version RootlessKit reports).
func semver(who personality) string {
	if who == asRootlessKit {
		v, _, _ := strings.Cut(gonetnsVersion(), "+")
		return rootlessKitVersion + "+gonetns." + v
	}
	return gonetnsVersion()
}

func versionString(who personality) string {
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
	own := fmt.Sprintf("gonetns version %s (%s, gvisor %s)", gonetnsVersion(), goV, gv)
	if who == asRootlessKit {
		return fmt.Sprintf("rootlesskit version %s (%s)", rootlessKitVersion, own)
	}
	return own
}
