package main

import (
	"fmt"
	"io"
	"slices"
	"sort"
	"strings"
	"time"
)

// writeMarkdown writes the report: systems, a throughput summary, one
// table per MTU, the published ports, failures.
func writeMarkdown(w io.Writer, r *results) {
	m := r.machine
	fmt.Fprintf(w, "# gonetns benchmark: %s, %s UTC\n\n", m.Host, r.started.UTC().Format("2006-01-02 15:04"))
	mode := ""
	if r.cfg.quick {
		mode = " (quick mode)"
	}
	fmt.Fprintf(w, "%d run(s) of every measurement%s, iperf3 runs of %d s, MTUs %s; systems interleaved run by run. "+
		"Each figure is the median over the runs with (min–max) when there are several. "+
		"Ratios are gonetns ÷ peer: on a ↑ row above 1 means gonetns is ahead, on a ↓ row below 1 does. "+
		"How each figure is measured: bench/README.md.\n\n",
		r.cfg.runs, mode, r.cfg.seconds, joinInts(r.cfg.mtus, " "))
	fmt.Fprintf(w, "Machine: %s, %d CPUs, %d MiB, %s, kernel %s; run as %s (uid %d); load average %s at the start, %s at the end; %s.\n\n",
		orDash(m.CPU), m.NProc, m.MemTotalMB, orDash(m.OS), orDash(m.Kernel), orDash(m.User), m.UID,
		loadShort(m.LoadStart), loadShort(m.LoadEnd), "took "+r.finished.Sub(r.started).Round(time.Second).String())
	if r.interrupted {
		fmt.Fprintf(w, "**Interrupted: the figures below are partial.**\n\n")
	}

	writeSystems(w, r)
	writeSummary(w, r)
	for i, mtu := range r.cfg.mtus {
		fmt.Fprintf(w, "## MTU %d\n\n", mtu)
		metrics := mtuMetrics
		if i > 0 {
			// The flood runs with the first MTU only (schedule): its rows
			// would be empty here.
			metrics = slices.DeleteFunc(slices.Clone(mtuMetrics), func(m metric) bool { return m.kind == kindUDP })
		}
		writeTable(w, r, false, mtu, metrics)
		if i > 0 && r.cfg.measures(kindUDP) {
			fmt.Fprintf(w, "The UDP flood is measured at MTU %d only: its %d-byte datagrams fit every MTU.\n\n", r.cfg.mtus[0], udpFloodLen)
		}
	}
	fmt.Fprintf(w, "## Published ports (iperf3 server in the sandbox, client on the host; MTU %d)\n\n", r.portMTU())
	writeTable(w, r, true, r.portMTU(), portMetrics)
	writeFailures(w, r)
}

func writeSystems(w io.Writer, r *results) {
	fmt.Fprintf(w, "## Systems\n\n| system | version | network process measured | status |\n| --- | --- | --- | --- |\n")
	for _, s := range r.systems {
		if !r.cfg.wants(s.name) {
			continue
		}
		status := "ran"
		switch {
		case !s.available && s.install != "":
			status = s.reason + "; install it: `" + s.install + "`"
		case !s.available:
			status = s.reason
		case !r.ran(s.name):
			status = "not run (interrupted)"
		}
		np := s.netName
		if s.ref {
			np = "none (no namespace)"
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s |\n", s.label, escape(orDash(s.version)), np, escape(status))
	}
	fmt.Fprintln(w)
}

// writeSummary is the throughput of every system by MTU, as in the chart.
func writeSummary(w io.Writer, r *results) {
	fmt.Fprintf(w, "## Throughput summary (Gbit/s, median; sandbox → host / host → sandbox)\n\n| system |")
	for _, mtu := range r.cfg.mtus {
		fmt.Fprintf(w, " MTU %d |", mtu)
	}
	fmt.Fprintf(w, "\n| --- |%s\n", strings.Repeat(" ---: |", len(r.cfg.mtus)))
	subject, peers := r.columns(false)
	var rows []*system
	if subject != nil {
		rows = append(rows, subject)
	}
	rows = append(rows, peers...)
	for _, s := range rows {
		fmt.Fprintf(w, "| %s |", s.label)
		for _, mtu := range r.cfg.mtus {
			c2h, h2c := r.cell(s.name, mtu, kindC2H, "gbps"), r.cell(s.name, mtu, kindH2C, "gbps")
			fmt.Fprintf(w, " %s / %s |", short(c2h), short(h2c))
		}
		fmt.Fprintln(w)
	}
	if ref := r.system("host"); ref != nil && r.ran("host") {
		c2h, h2c := r.cell("host", 0, kindC2H, "gbps"), r.cell("host", 0, kindH2C, "gbps")
		fmt.Fprintf(w, "| %s | %s / %s (any MTU) |%s\n", ref.label, short(c2h), short(h2c), strings.Repeat(" |", len(r.cfg.mtus)-1))
	}
	fmt.Fprintln(w)
}

func short(c cell) string {
	switch {
	case c.runs == 0:
		return "–"
	case !c.ok():
		return "failed"
	}
	return formatValue(c.Median)
}

// writeTable writes one table: a row per metric, a column per system with
// the ratio gonetns ÷ that system after each peer, the reference last.
func writeTable(w io.Writer, r *results, port bool, mtu int, metrics []metric) {
	subject, peers := r.columns(port)
	if subject == nil && len(peers) == 0 {
		fmt.Fprintf(w, "No system ran.\n\n")
		return
	}
	ref := r.system("host")
	hasRef := ref != nil && r.ran("host")
	fmt.Fprintf(w, "| figure | better |")
	sep := "| --- | --- |"
	if subject != nil {
		fmt.Fprintf(w, " %s |", subject.label)
		sep += " ---: |"
	}
	for _, p := range peers {
		fmt.Fprintf(w, " %s |", p.label)
		sep += " ---: |"
		if subject != nil {
			fmt.Fprintf(w, " gonetns ÷ %s |", p.label)
			sep += " ---: |"
		}
	}
	if hasRef {
		fmt.Fprintf(w, " %s |", ref.label)
		sep += " ---: |"
	}
	fmt.Fprintf(w, "\n%s\n", sep)
	for _, m := range metrics {
		better := "↓ lower"
		if m.higher {
			better = "↑ higher"
		}
		fmt.Fprintf(w, "| %s, %s | %s |", m.label, m.unit, better)
		var g cell
		if subject != nil {
			g = r.cell(subject.name, mtu, m.kind, m.key)
			fmt.Fprintf(w, " %s |", formatCell(g))
		}
		for _, p := range peers {
			c := r.cell(p.name, mtu, m.kind, m.key)
			fmt.Fprintf(w, " %s |", formatCell(c))
			if subject != nil {
				fmt.Fprintf(w, " %s |", formatRatio(ratio(g, c)))
			}
		}
		if hasRef {
			c := r.cell("host", 0, refKind(m.kind), m.key)
			fmt.Fprintf(w, " %s |", formatCell(c))
		}
		fmt.Fprintln(w)
	}
	fmt.Fprintln(w)
}

// writeFailures lists the errors of failed runs, identical ones once with
// a count, and the harness's own faults.
func writeFailures(w io.Writer, r *results) {
	type key struct{ sys, kind, err string }
	count := map[key][]string{}
	var order []key
	for _, s := range r.samples {
		if s.Error == "" {
			continue
		}
		k := key{s.System, s.Kind, s.Error}
		if _, ok := count[k]; !ok {
			order = append(order, k)
		}
		where := fmt.Sprintf("run %d", s.Run)
		if s.MTU != 0 {
			where += fmt.Sprintf(" MTU %d", s.MTU)
		}
		count[k] = append(count[k], where)
	}
	if len(order) == 0 && len(r.faults) == 0 {
		return
	}
	fmt.Fprintf(w, "## Failures\n\n")
	for _, k := range order {
		label := k.sys
		if s := r.system(k.sys); s != nil {
			label = s.label
		}
		fmt.Fprintf(w, "- %s, %s (%s): %s\n", label, k.kind, strings.Join(count[k], ", "), escape(k.err))
	}
	faults := append([]string(nil), r.faults...)
	sort.Strings(faults)
	for _, f := range faults {
		fmt.Fprintf(w, "- harness error: %s\n", escape(f))
	}
	fmt.Fprintln(w)
}

// escape keeps a message inside one markdown table cell or list item.
func escape(s string) string {
	s = strings.ReplaceAll(s, "\n", " ")
	return strings.ReplaceAll(s, "|", "\\|")
}

func orDash(s string) string {
	if s == "" {
		return "–"
	}
	return s
}

// loadShort is the 1/5/15-minute part of /proc/loadavg.
func loadShort(s string) string {
	f := strings.Fields(s)
	if len(f) < 3 {
		return orDash(s)
	}
	return strings.Join(f[:3], " ")
}

func joinInts(xs []int, sep string) string {
	var ss []string
	for _, x := range xs {
		ss = append(ss, fmt.Sprint(x))
	}
	return strings.Join(ss, sep)
}
