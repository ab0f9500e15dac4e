package main

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Defaults of the knobs, and what BENCH_QUICK=1 changes them to (CI's
// quick mode: 1 s runs, 1 repeat, one MTU).
const (
	defaultSeconds = 10
	defaultRuns    = 3
	defaultMTUs    = "1500 4000 16384 65520"

	quickSeconds = 1
	quickRuns    = 1
	quickMTUs    = "65520"
)

// config is what one harness run does, read once from the environment.
type config struct {
	seconds int   // per iperf3 run (BENCH_SECONDS)
	runs    int   // repeats of every measurement (BENCH_RUNS)
	mtus    []int // BENCH_MTUS
	quick   bool  // BENCH_QUICK=1
	// only, when set, restricts the systems run (BENCH_SYSTEMS, names
	// as in systems.go); for development.
	only map[string]bool
	// kinds, when set, restricts the measurements (BENCH_MEASUREMENTS,
	// e.g. "probe,udp_c2h": the rows being worked on, side by side).
	kinds map[string]bool

	gonetns string // the gonetns binary (BENCH_GONETNS, default bin/gonetns)
	// rootlesskit3 is RootlessKit v3 (BENCH_ROOTLESSKIT3, default
	// bin/tools/rootlesskit, where make bench-tools installs it); missing
	// means its system is reported as not installed.
	rootlesskit3 string
	outDir       string // where results go (BENCH_OUT, default bench/results)

	// Sizes of the per-connection measurements.
	rrWarmup     int           // request/response round trips not counted
	rrRounds     int           // request/response round trips measured
	connFor      time.Duration // new-connection loop duration
	connMax      int           // ... or this many connections, whichever first
	udpWarmup    int
	udpRounds    int
	startupCount int // start-ups of `true` per run, median taken
}

// loadConfig reads the BENCH_* variables through getenv.
func loadConfig(getenv func(string) string) (config, error) {
	c := config{
		seconds:      defaultSeconds,
		runs:         defaultRuns,
		rrWarmup:     200,
		rrRounds:     2000,
		connFor:      2 * time.Second,
		connMax:      20000,
		udpWarmup:    50,
		udpRounds:    1000,
		startupCount: 10,
	}
	mtus := defaultMTUs
	if v := getenv("BENCH_QUICK"); v != "" && v != "0" {
		if v != "1" {
			return c, fmt.Errorf("BENCH_QUICK=%q: use 1 (or leave it unset)", v)
		}
		c.quick = true
		c.seconds, c.runs, mtus = quickSeconds, quickRuns, quickMTUs
		c.connFor = time.Second
		c.startupCount = 5
	}
	var err error
	if c.seconds, err = intKnob(getenv, "BENCH_SECONDS", c.seconds, 1, 3600); err != nil {
		return c, err
	}
	if c.runs, err = intKnob(getenv, "BENCH_RUNS", c.runs, 1, 100); err != nil {
		return c, err
	}
	if v := getenv("BENCH_MTUS"); v != "" {
		mtus = v
	}
	if c.mtus, err = parseMTUs(mtus); err != nil {
		return c, err
	}
	if v := strings.TrimSpace(getenv("BENCH_SYSTEMS")); v != "" {
		c.only = map[string]bool{}
		for _, s := range strings.FieldsFunc(v, func(r rune) bool { return r == ',' || r == ' ' }) {
			if !knownSystem(s) {
				return c, fmt.Errorf("BENCH_SYSTEMS: unknown system %q (known: %s)", s, strings.Join(systemNames(), ", "))
			}
			c.only[s] = true
		}
	}
	if v := strings.TrimSpace(getenv("BENCH_MEASUREMENTS")); v != "" {
		c.kinds = map[string]bool{}
		for _, k := range strings.FieldsFunc(v, func(r rune) bool { return r == ',' || r == ' ' }) {
			if !slices.Contains(allKinds, k) {
				return c, fmt.Errorf("BENCH_MEASUREMENTS: unknown measurement %q (known: %s)", k, strings.Join(allKinds, ", "))
			}
			c.kinds[k] = true
		}
	}
	c.gonetns = getenv("BENCH_GONETNS")
	if c.gonetns == "" {
		c.gonetns = filepath.Join("bin", "gonetns")
	}
	if c.gonetns, err = filepath.Abs(c.gonetns); err != nil {
		return c, err
	}
	if st, err := os.Stat(c.gonetns); err != nil || st.IsDir() || st.Mode()&0o111 == 0 {
		return c, fmt.Errorf("gonetns binary %s is missing or not executable: run make build first, or set BENCH_GONETNS", c.gonetns)
	}
	c.rootlesskit3 = getenv("BENCH_ROOTLESSKIT3")
	if c.rootlesskit3 == "" {
		c.rootlesskit3 = filepath.Join("bin", "tools", "rootlesskit")
	}
	if c.rootlesskit3, err = filepath.Abs(c.rootlesskit3); err != nil {
		return c, err
	}
	c.outDir = getenv("BENCH_OUT")
	if c.outDir == "" {
		c.outDir = filepath.Join("bench", "results")
	}
	return c, nil
}

func intKnob(getenv func(string) string, name string, def, lo, hi int) (int, error) {
	v := strings.TrimSpace(getenv(name))
	if v == "" {
		return def, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < lo || n > hi {
		return 0, fmt.Errorf("%s=%q: want a whole number from %d to %d", name, v, lo, hi)
	}
	return n, nil
}

// parseMTUs parses "1500 4000 16384 65520" (commas also accepted).
func parseMTUs(s string) ([]int, error) {
	var out []int
	seen := map[int]bool{}
	for _, f := range strings.FieldsFunc(s, func(r rune) bool { return r == ' ' || r == ',' || r == '\t' }) {
		n, err := strconv.Atoi(f)
		if err != nil || n < 1280 || n > 65520 {
			return nil, fmt.Errorf("BENCH_MTUS: %q is not an MTU from 1280 to 65520", f)
		}
		if !seen[n] {
			seen[n] = true
			out = append(out, n)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("BENCH_MTUS=%q: no MTU given", s)
	}
	return out, nil
}

// wants reports whether system name takes part in this run.
func (c *config) wants(name string) bool { return c.only == nil || c.only[name] }

// measures reports whether measurement kind takes part in this run.
func (c *config) measures(kind string) bool { return c.kinds == nil || c.kinds[kind] }
