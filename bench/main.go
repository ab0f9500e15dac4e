// Command gonetns-bench is the benchmark harness of gonetns: it runs the
// same measurements through gonetns, its peers (RootlessKit with
// slirp4netns, pasta, RootlessKit with gvisor-tap-vsock) and host loopback,
// interleaved, and prints a markdown table of medians and ratios; it also
// writes the table, every raw sample (JSON) and a throughput chart (SVG)
// to bench/results. See bench/README.md.
//
//	make bench                       # or: go build -o bin/gonetns-bench ./bench && bin/gonetns-bench
//	BENCH_QUICK=1 make bench         # CI's quick mode
//
// With GONETNS_BENCH_CLIENT=1 in its environment the same binary is the
// client the harness runs inside each namespace (client.go).
package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Exit statuses.
const (
	exitOK          = 0
	exitHarness     = 1 // a fault of the harness (or gonetns never ran)
	exitUsage       = 2
	exitInterrupted = 130
)

const usage = `gonetns-bench: compares gonetns with slirp4netns, pasta and RootlessKit.

Usage: gonetns-bench   (run from the repository root; make bench does)

Environment:
  BENCH_SECONDS  seconds per iperf3 run (default 10)
  BENCH_RUNS     repeats of every measurement (default 3)
  BENCH_MTUS     MTUs, e.g. "1500 65520" (default "1500 4000 16384 65520")
  BENCH_QUICK=1  CI's quick mode: 1 s, 1 run, MTU 65520 (the knobs above still override)
  BENCH_SYSTEMS  only these systems, e.g. "gonetns,pasta,host" (default: all)
  BENCH_MEASUREMENTS  only these measurements, e.g. "probe,udp_c2h" (default: all; names as in the JSON)
  BENCH_GONETNS  the gonetns binary (default bin/gonetns)
  BENCH_ROOTLESSKIT3  RootlessKit v3, for its gvisor-tap-vsock driver (default bin/tools/rootlesskit;
                 make bench-tools installs it there)
  BENCH_OUT      results directory (default bench/results)
`

func main() { os.Exit(run()) }

func run() int {
	if os.Getenv(clientEnv) == "1" {
		return runClient(os.Args[1:])
	}
	if len(os.Args) > 1 {
		if a := os.Args[1]; a == "-h" || a == "--help" || a == "help" {
			fmt.Print(usage)
			return exitOK
		}
		fmt.Fprintf(os.Stderr, "gonetns-bench: takes no arguments (got %q); it is configured by BENCH_* variables.\n\n%s", os.Args[1:], usage)
		return exitUsage
	}
	cfg, err := loadConfig(os.Getenv)
	if err != nil {
		fmt.Fprintf(os.Stderr, "gonetns-bench: %v\n", err)
		return exitUsage
	}
	// Orphans of the systems we start are re-parented to us, not init,
	// so that sweepOrphans can end them.
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		fmt.Fprintf(os.Stderr, "gonetns-bench: warning: cannot become a child subreaper: %v\n", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer stop()
	go func() {
		// After the first signal the run winds down and writes what it
		// has; a second one kills the harness (its children follow).
		<-ctx.Done()
		stop()
	}()

	if err := checkWritable(cfg.outDir); err != nil {
		fmt.Fprintf(os.Stderr, "gonetns-bench: %v\n", err)
		return exitHarness
	}
	b, err := newBench(cfg, os.Stderr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "gonetns-bench: %v\n", err)
		return exitHarness
	}
	defer b.cleanup()
	res := b.run(ctx)

	code := exitOK
	var md bytes.Buffer
	writeMarkdown(&md, res)
	js, err := marshalResults(res)
	if err != nil {
		b.logf("encode JSON: %v", err)
		code = exitHarness
	}
	paths, err := writeResults(cfg.outDir, res.started, res.machine.Host, map[string][]byte{
		".md": md.Bytes(), ".json": js, ".svg": renderSVG(res),
	})
	os.Stdout.Write(md.Bytes())
	if err != nil {
		b.logf("writing the results failed: %v", err)
		code = exitHarness
	} else {
		for _, p := range paths {
			b.logf("wrote %s", p)
		}
	}
	for _, f := range res.faults {
		b.logf("harness error: %s", f)
		code = exitHarness
	}
	if res.interrupted {
		return exitInterrupted
	}
	return code
}

// bench is one run of the harness.
type bench struct {
	cfg     config
	tools   tools
	machine machine
	systems []*system
	workDir string // a directory every user can read, holding the client
	client  string // our binary, copied into workDir
	log     io.Writer

	mu     sync.Mutex
	faults []string
}

func newBench(cfg config, log io.Writer) (*bench, error) {
	b := &bench{cfg: cfg, log: log}
	b.tools = findTools(cfg.gonetns, cfg.rootlesskit3)
	var v versions
	b.machine, v = gatherMachine(b.tools)
	b.systems = allSystems(b.tools, os.Geteuid())
	probeSystems(b.systems, b.tools, v)
	kept := b.systems[:0]
	for _, s := range b.systems {
		if cfg.wants(s.name) && (!s.optIn || cfg.only[s.name]) {
			kept = append(kept, s)
		}
	}
	b.systems = kept

	// The client runs inside namespaces as whatever user the system
	// maps us to (pasta as root: nobody), so it lives in a directory
	// anyone can read, not in the build tree.
	removeStaleWorkDirs()
	dir, err := os.MkdirTemp("", fmt.Sprintf("gonetns-bench-%d-", os.Getpid()))
	if err != nil {
		return nil, err
	}
	b.workDir = dir
	if err := os.Chmod(dir, 0o755); err != nil {
		b.cleanup()
		return nil, err
	}
	b.client = filepath.Join(dir, "gonetns-bench")
	if err := copyExecutable(b.client); err != nil {
		b.cleanup()
		return nil, fmt.Errorf("copy the harness for use inside namespaces: %w", err)
	}
	return b, nil
}

func copyExecutable(dst string) error {
	src, err := os.Executable()
	if err != nil {
		return err
	}
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

func (b *bench) cleanup() {
	killAll()
	sweepOrphans()
	if b.workDir != "" {
		os.RemoveAll(b.workDir)
	}
}

func (b *bench) logf(format string, args ...any) {
	fmt.Fprintf(b.log, "gonetns-bench: %s\n", fmt.Sprintf(format, args...))
}

func (b *bench) fault(err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.faults = append(b.faults, err.Error())
}

// run checks which systems start, then runs the schedule.
func (b *bench) run(ctx context.Context) *results {
	res := &results{cfg: b.cfg, machine: b.machine, systems: b.systems, started: time.Now()}
	b.logf("%s: %d CPUs, kernel %s, load %s", b.machine.Host, b.machine.NProc, b.machine.Kernel, loadShort(b.machine.LoadStart))
	b.preflight(ctx)
	jobs := schedule(b.cfg, b.systems)
	b.logf("%d measurement runs (%d run(s) × %d MTU(s), iperf3 %d s each)", len(jobs), b.cfg.runs, len(b.cfg.mtus), b.cfg.seconds)
	for i, j := range jobs {
		if ctx.Err() != nil {
			res.interrupted = true
			break
		}
		s := b.measure(ctx, j)
		if ctx.Err() != nil {
			res.interrupted = true
			break
		}
		res.samples = append(res.samples, s)
		b.logf("[%d/%d] run %d %s %s %s: %s (%.1f s)", i+1, len(jobs), j.run, mtuLabel(j.mtu), j.kind, j.sys.name, describe(s), s.Wall)
		if n := sweepOrphans(); n > 0 {
			b.logf("killed %d process(es) left behind by %s", n, j.sys.name)
		}
	}
	if res.interrupted {
		b.logf("interrupted: the running measurement was killed; writing what was measured")
	}
	if !res.interrupted && !b.gonetnsRan(res) {
		b.fault(errors.New("gonetns produced no figure at all: it does not run here (see Failures)"))
	}
	res.faults = b.faults
	res.finished = time.Now()
	res.machine.LoadEnd = readTrim("/proc/loadavg")
	return res
}

func (b *bench) gonetnsRan(res *results) bool {
	if !b.cfg.wants("gonetns") && !b.cfg.wants("gonetns-port") {
		return true
	}
	for _, s := range res.samples {
		if (s.System == "gonetns" || s.System == "gonetns-port") && s.Error == "" {
			return true
		}
	}
	return false
}

// preflight starts every system once with `true`; a system that fails is
// reported with the reason and left out, instead of failing every run.
func (b *bench) preflight(ctx context.Context) {
	for _, s := range b.systems {
		if !s.available || s.ref || !slices.ContainsFunc(kindsFor(s), b.cfg.measures) {
			continue
		}
		mtu, port := b.cfg.mtus[0], 0
		if s.port {
			mtu = slices.Max(b.cfg.mtus)
			p, err := freePort()
			if err != nil {
				b.fault(err)
				continue
			}
			port = p
		}
		// Up to three tries: RootlessKit 1.1's builtin port driver loses a
		// race with a command that exits at once ("read unix
		// .bp.sock: connection reset by peer") now and then.
		var err error
		for try := 0; try < 3; try++ {
			if err = b.once(ctx, s, mtu, port, nil); err == nil || ctx.Err() != nil {
				break
			}
			sweepOrphans()
		}
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			s.available = false
			s.reason = "fails to start: " + err.Error() + hintFor(err)
			b.logf("%s: %s", s.name, s.reason)
			if s.name == "gonetns" || s.name == "gonetns-port" {
				b.fault(fmt.Errorf("%s fails to start: %w", s.name, err))
			}
		}
		sweepOrphans()
	}
}

// hintFor adds what to do about a known start-up failure.
func hintFor(err error) string {
	if isRoot() && strings.Contains(err.Error(), "No subuid ranges") {
		return " (RootlessKit needs subordinate ids for the invoking user, root included: run make bench as an unprivileged user with /etc/subuid entries, or add root:100000:65536 to /etc/subuid and /etc/subgid)"
	}
	return ""
}

func mtuLabel(mtu int) string {
	if mtu == 0 {
		return "loopback"
	}
	return fmt.Sprintf("MTU %d", mtu)
}

// describe is a one-line account of a sample, for the progress log.
func describe(s sample) string {
	if s.Error != "" {
		return "FAILED: " + s.Error
	}
	v := s.Values
	switch s.Kind {
	case kindC2H, kindH2C, kindPortIn, kindPortOut:
		out := fmt.Sprintf("%s Gbit/s", formatValue(v["gbps"]))
		if _, ok := v["cpu_s"]; ok {
			out += fmt.Sprintf(", %s CPU s/GB, peak RSS %s MiB", formatValue(v["cpu_s_per_gb"]), formatValue(v["rss_peak_mb"]))
		}
		return out
	case kindUDP:
		return fmt.Sprintf("UDP flood: %s Mbit/s received of %s sent (%s%% lost)", formatValue(v["mbps"]), formatValue(v["sent_mbps"]), formatValue(v["lost_percent"]))
	case kindProbe:
		return fmt.Sprintf("request/response p50 %s µs p99 %s µs, %s conn/s, UDP p50 %s µs",
			formatValue(v["rr_p50_us"]), formatValue(v["rr_p99_us"]), formatValue(v["conn_per_s"]), formatValue(v["udp_p50_us"]))
	case kindStartup:
		return fmt.Sprintf("start-up %s ms", formatValue(v["startup_ms"]))
	}
	return ""
}

// removeStaleWorkDirs removes the work directories of our earlier runs
// that were killed before they could (named gonetns-bench-PID-*, PID no
// longer running, owned by us).
func removeStaleWorkDirs() {
	tmp := os.TempDir()
	ents, _ := os.ReadDir(tmp)
	for _, e := range ents {
		rest, ok := strings.CutPrefix(e.Name(), "gonetns-bench-")
		if !ok || !e.IsDir() {
			continue
		}
		pidText, _, ok := strings.Cut(rest, "-")
		pid, err := strconv.Atoi(pidText)
		if !ok || err != nil {
			continue
		}
		if _, err := os.Stat("/proc/" + pidText); err == nil || pid == os.Getpid() {
			continue // still running
		}
		p := filepath.Join(tmp, e.Name())
		if st, err := os.Lstat(p); err == nil {
			if sys, ok := st.Sys().(*syscall.Stat_t); ok && int(sys.Uid) == os.Getuid() {
				os.RemoveAll(p)
			}
		}
	}
}
