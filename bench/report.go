package main

import (
	"fmt"
	"math"
	"slices"
	"time"
)

// metric is one row of a table: a value of the samples of one kind.
type metric struct {
	kind   string
	key    string
	label  string
	unit   string
	higher bool // higher is better
}

// mtuMetrics are the rows of the table of each MTU.
var mtuMetrics = []metric{
	{kindC2H, "gbps", "TCP throughput sandbox → host", "Gbit/s", true},
	{kindH2C, "gbps", "TCP throughput host → sandbox (-R)", "Gbit/s", true},
	{kindProbe, "rr_p50_us", "TCP request/response p50 (1 B each way)", "µs", false},
	{kindProbe, "rr_p99_us", "TCP request/response p99", "µs", false},
	{kindProbe, "conn_per_s", "new TCP connections (connect, 1 B echo, close)", "conn/s", true},
	{kindProbe, "udp_p50_us", "UDP round trip p50", "µs", false},
	{kindProbe, "rr_cpu_us", "CPU of the network process per TCP round trip (1 B each way)", "µs", false},
	{kindProbe, "conn_cpu_us", "CPU of the network process per new TCP connection", "µs", false},
	{kindUDP, "mbps", "UDP goodput sandbox → host under a flood (iperf3 -u -b 0 -l 1400)", "Mbit/s", true},
	{kindUDP, "lost_percent", "UDP datagrams lost under that flood", "%", false},
	{kindStartup, "startup_ms", "start-up of `true` (wall time)", "ms", false},
	{kindC2H, "rss_peak_mb", "peak RSS of the network process, sandbox → host run", "MiB", false},
	{kindH2C, "rss_peak_mb", "peak RSS of the network process, host → sandbox run", "MiB", false},
	{kindC2H, "rss_idle_mb", "RSS of the network process when idle (before the run)", "MiB", false},
	{kindC2H, "cpu_s_per_gb", "CPU of the network process per GB, sandbox → host", "s/GB", false},
	{kindH2C, "cpu_s_per_gb", "CPU of the network process per GB, host → sandbox", "s/GB", false},
}

// portMetrics are the rows of the published-port table.
var portMetrics = []metric{
	{kindPortIn, "gbps", "TCP throughput host → sandbox via the published port", "Gbit/s", true},
	{kindPortOut, "gbps", "TCP throughput sandbox → host via the published port (-R)", "Gbit/s", true},
	{kindPortIn, "rss_peak_mb", "peak RSS of the forwarding process, host → sandbox run", "MiB", false},
	{kindPortIn, "cpu_s_per_gb", "CPU of the forwarding process per GB, host → sandbox", "s/GB", false},
	{kindPortOut, "cpu_s_per_gb", "CPU of the forwarding process per GB, sandbox → host", "s/GB", false},
}

// refKind maps a published-port measurement to the host-loopback one
// that is its ceiling (the client on the host sends, or receives with -R).
func refKind(kind string) string {
	switch kind {
	case kindPortIn:
		return kindC2H
	case kindPortOut:
		return kindH2C
	}
	return kind
}

// results is everything one harness run produced.
type results struct {
	cfg         config
	machine     machine
	systems     []*system
	samples     []sample
	faults      []string
	started     time.Time
	finished    time.Time
	interrupted bool
}

// cell is a figure over the runs of one system.
type cell struct {
	summary
	runs   int // samples scheduled
	failed int // of which failed
}

func (c cell) ok() bool { return c.N > 0 }

// cell aggregates the samples of system sys, MTU mtu and kind for key.
func (r *results) cell(sys string, mtu int, kind, key string) cell {
	var c cell
	var xs []float64
	for _, s := range r.samples {
		if s.System != sys || s.MTU != mtu || s.Kind != kind {
			continue
		}
		if s.Error != "" {
			c.runs++
			c.failed++
			continue
		}
		// A run without the value: the figure does not apply (the
		// reference has no network process).
		if v, ok := s.Values[key]; ok {
			c.runs++
			xs = append(xs, v)
		}
	}
	c.summary = summarize(xs)
	return c
}

// ratio is gonetns's median over the peer's; NaN when either is missing.
func ratio(g, p cell) float64 {
	if !g.ok() || !p.ok() || p.Median == 0 {
		return math.NaN()
	}
	return g.Median / p.Median
}

// system returns the system called name.
func (r *results) system(name string) *system {
	for _, s := range r.systems {
		if s.name == name {
			return s
		}
	}
	return nil
}

// ran reports whether sys has any sample (it was scheduled).
func (r *results) ran(name string) bool {
	return slices.ContainsFunc(r.samples, func(s sample) bool { return s.System == name })
}

// columns are the systems of a table that ran: the subject first, then
// the peers; the reference apart.
func (r *results) columns(port bool) (subject *system, peers []*system) {
	for _, s := range r.systems {
		if s.port != port || s.ref || !r.ran(s.name) {
			continue
		}
		if subject == nil && (s.name == "gonetns" || s.name == "gonetns-port") {
			subject = s
			continue
		}
		peers = append(peers, s)
	}
	return subject, peers
}

// portMTU is the MTU the published-port systems ran at.
func (r *results) portMTU() int { return slices.Max(r.cfg.mtus) }

// formatValue prints x with about three significant digits.
func formatValue(x float64) string {
	ax := math.Abs(x)
	switch {
	case ax >= 100:
		return fmt.Sprintf("%.0f", x)
	case ax >= 10:
		return fmt.Sprintf("%.1f", x)
	case ax >= 1:
		return fmt.Sprintf("%.2f", x)
	case ax == 0:
		return "0"
	default:
		return fmt.Sprintf("%.3f", x)
	}
}

// formatCell prints "median (min–max)", marking failed runs; "–" when
// nothing was scheduled.
func formatCell(c cell) string {
	if c.runs == 0 {
		return "–"
	}
	if !c.ok() {
		return "failed"
	}
	s := formatValue(c.Median)
	if c.N > 1 && c.Min != c.Max {
		s += " (" + formatValue(c.Min) + "–" + formatValue(c.Max) + ")"
	}
	if c.failed > 0 {
		s += fmt.Sprintf(" [%d/%d runs failed]", c.failed, c.runs)
	}
	return s
}

func formatRatio(x float64) string {
	if math.IsNaN(x) || math.IsInf(x, 0) {
		return "–"
	}
	return fmt.Sprintf("%.2f×", x)
}
