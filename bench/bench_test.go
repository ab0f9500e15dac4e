package main

import (
	"bytes"
	"context"
	"encoding/xml"
	"errors"
	"io"
	"math"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestMain lets the test binary play the client, as the harness's binary
// does, so the session tests run the real protocol.
func TestMain(m *testing.M) {
	if os.Getenv(clientEnv) == "1" {
		os.Exit(runClient(os.Args[1:]))
	}
	// As the harness is: orphans come to us, for sweepOrphans.
	unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
	os.Exit(m.Run())
}

func TestSummarize(t *testing.T) {
	for _, tc := range []struct {
		in   []float64
		want summary
	}{
		{nil, summary{}},
		{[]float64{3}, summary{1, 3, 3, 3}},
		{[]float64{5, 1, 3}, summary{3, 3, 1, 5}},
		{[]float64{4, 1, 3, 2}, summary{4, 2.5, 1, 4}},
	} {
		if got := summarize(tc.in); got != tc.want {
			t.Errorf("summarize(%v) = %+v, want %+v", tc.in, got, tc.want)
		}
	}
	if !math.IsNaN(median(nil)) {
		t.Error("median of nothing is not NaN")
	}
}

func TestPercentile(t *testing.T) {
	var d []time.Duration
	for i := 1; i <= 100; i++ {
		d = append(d, time.Duration(i))
	}
	for p, want := range map[float64]time.Duration{50: 50, 99: 99, 100: 100, 1: 1, 0.1: 1} {
		if got := percentile(d, p); got != want {
			t.Errorf("p%v = %v, want %v", p, got, want)
		}
	}
	if percentile(nil, 50) != 0 {
		t.Error("percentile of nothing")
	}
}

func TestParseStat(t *testing.T) {
	s, err := parseStat([]byte("4242 (my (odd) prog) S 17 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 1 0 1234 0 0"))
	if err != nil {
		t.Fatal(err)
	}
	if s.comm != "my (odd) prog" || s.ppid != 17 || s.ticks != 325 {
		t.Errorf("got %+v", s)
	}
	if _, err := parseStat([]byte("garbage")); err == nil {
		t.Error("garbage parsed")
	}
	// Our own stat parses.
	if _, err := readStat(os.Getpid()); err != nil {
		t.Error(err)
	}
}

func TestParseStatus(t *testing.T) {
	hwm, rss, err := parseStatus("Name:\tx\nVmPeak:\t 100 kB\nVmHWM:\t   2048 kB\nVmRSS:\t    1024 kB\n")
	if err != nil || hwm != 2048 || rss != 1024 {
		t.Errorf("got %d %d %v", hwm, rss, err)
	}
	if _, _, err := parseStatus("Name:\tkthreadd\n"); err == nil {
		t.Error("status without memory lines parsed")
	}
}

const iperfJSON = `{"start":{},"intervals":[{"sum":{"bits_per_second":9.5e9}},{"sum":{"bits_per_second":1e7}}],
"end":{"sum_sent":{"bytes":1250000000,"retransmits":3},"sum_received":{"seconds":2.0,"bytes":1200000000,"bits_per_second":4.8e9}}}`

func TestParseIperf(t *testing.T) {
	r, err := parseIperf([]byte(iperfJSON))
	if err != nil {
		t.Fatal(err)
	}
	if r.Bytes != 1.2e9 || r.BitsPerSec != 4.8e9 || r.Retransmits != 3 || !slices.Equal(r.IntervalsG, []float64{9.5, 0.01}) {
		t.Errorf("got %+v", r)
	}
	for _, bad := range []string{`{"error":"unable to connect to server: Connection refused"}`, `{"end":{}}`, `not json`} {
		if _, err := parseIperf([]byte(bad)); err == nil {
			t.Errorf("%s parsed", bad)
		}
	}
	v := throughputValues(r, &netUsage{cpu0: 1, cpu1: 2.2, rssIdleKB: 1024, hwmKB: 4096})
	if v["gbps"] != 4.8 || math.Abs(v["cpu_s_per_gb"]-1) > 1e-9 || v["rss_peak_mb"] != 4 || v["rss_idle_mb"] != 1 {
		t.Errorf("values %v", v)
	}
}

// iperfUDPJSON is the shape of iperf3 3.12's -u --json end section.
const iperfUDPJSON = `{"intervals":[{"sum":{"bits_per_second":9e8}}],"end":{
 "sum_sent":{"bytes":1.4e8,"retransmits":0},
 "sum_received":{"seconds":1,"bytes":1.05e8,"bits_per_second":8.4e8,"lost_packets":25000,"packets":100000,"lost_percent":25}}}`

func TestParseIperfUDP(t *testing.T) {
	r, err := parseIperf([]byte(iperfUDPJSON))
	if err != nil {
		t.Fatal(err)
	}
	v := udpValues(r, nil)
	if v["mbps"] != 840 || v["sent_mbps"] != 1120 || v["lost_percent"] != 25 || r.Packets != 100000 {
		t.Errorf("values %v, run %+v", v, r)
	}
}

func TestDefaultGateway(t *testing.T) {
	route := "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n" +
		"eth0\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n" +
		"eth0\t00000000\t0102000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
	got, err := defaultGateway(route)
	if err != nil || got != netip.MustParseAddr("10.0.2.1") {
		t.Errorf("got %v, %v", got, err)
	}
	if _, err := defaultGateway("Iface\tDestination\n"); err == nil {
		t.Error("no route, no error")
	}
}

func TestResolveTargetRefusesOtherAddresses(t *testing.T) {
	for _, ok := range []string{"127.0.0.1", "10.0.2.2"} {
		if _, err := resolveTarget(ok); err != nil {
			t.Errorf("%s: %v", ok, err)
		}
	}
	for _, bad := range []string{"192.0.2.1", "8.8.8.8", "::1", "x"} {
		if _, err := resolveTarget(bad); err == nil {
			t.Errorf("%s accepted", bad)
		}
	}
}

func TestListensIn(t *testing.T) {
	table := "  sl  local_address rem_address   st tx_queue rx_queue\n" +
		"   0: 0100007F:1451 00000000:0000 0A 00000000:00000000\n" +
		"   1: 00000000:0016 00000000:0000 0A 00000000:00000000\n" +
		"   2: 0100007F:9C40 0100007F:1451 01 00000000:00000000\n"
	lo := netip.MustParseAddr("127.0.0.1")
	for _, tc := range []struct {
		port int
		addr netip.Addr
		want bool
	}{
		{5201, lo, true}, {5201, netip.Addr{}, true}, {22, netip.Addr{}, true}, {22, lo, false}, {40000, netip.Addr{}, false},
	} {
		if got := listensIn(table, tc.port, tc.addr); got != tc.want {
			t.Errorf("port %d addr %v: %v, want %v", tc.port, tc.addr, got, tc.want)
		}
	}
}

func TestParseRootlessKitNets(t *testing.T) {
	help := "   --net value   network driver [host, slirp4netns, vpnkit, lxc-user-nic(experimental)] (default: \"host\")\n"
	if got := parseRootlessKitNets(help); !slices.Equal(got, []string{"host", "slirp4netns", "vpnkit", "lxc-user-nic"}) {
		t.Errorf("got %q", got)
	}
}

func TestLoadConfig(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "gonetns")
	os.WriteFile(bin, []byte("#!/bin/sh\n"), 0o755)
	env := func(kv ...string) func(string) string {
		m := map[string]string{"BENCH_GONETNS": bin}
		for i := 0; i < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return func(k string) string { return m[k] }
	}
	c, err := loadConfig(env())
	if err != nil || c.seconds != 10 || c.runs != 3 || !slices.Equal(c.mtus, []int{1500, 4000, 16384, 65520}) {
		t.Errorf("defaults: %+v %v", c, err)
	}
	c, err = loadConfig(env("BENCH_QUICK", "1"))
	if err != nil || c.seconds != 1 || c.runs != 1 || !slices.Equal(c.mtus, []int{65520}) || !c.quick {
		t.Errorf("quick: %+v %v", c, err)
	}
	c, err = loadConfig(env("BENCH_QUICK", "1", "BENCH_SECONDS", "3", "BENCH_MTUS", "1500,65520", "BENCH_SYSTEMS", "gonetns,host",
		"BENCH_MEASUREMENTS", "probe udp_c2h", "BENCH_ROOTLESSKIT3", "/opt/rk3/rootlesskit"))
	if err != nil || c.seconds != 3 || !slices.Equal(c.mtus, []int{1500, 65520}) || !c.wants("host") || c.wants("pasta") ||
		!c.measures(kindProbe) || !c.measures(kindUDP) || c.measures(kindC2H) || c.rootlesskit3 != "/opt/rk3/rootlesskit" {
		t.Errorf("overrides: %+v %v", c, err)
	}
	for _, bad := range [][]string{
		{"BENCH_SECONDS", "0"}, {"BENCH_RUNS", "x"}, {"BENCH_MTUS", "100"}, {"BENCH_MTUS", " "},
		{"BENCH_SYSTEMS", "vpnkit"}, {"BENCH_QUICK", "yes"}, {"BENCH_GONETNS", "/nonexistent"}, {"BENCH_MEASUREMENTS", "tcp_rr"},
	} {
		if _, err := loadConfig(env(bad...)); err == nil {
			t.Errorf("%v accepted", bad)
		}
	}
}

func TestScheduleInterleaves(t *testing.T) {
	sys := allSystems(tools{}, 1000)
	for _, s := range sys {
		s.available = s.name != "gvisor-tap-vsock"
	}
	cfg := config{runs: 2, mtus: []int{1500, 65520}}
	jobs := schedule(cfg, sys)
	var order []string
	for _, j := range jobs[:6] {
		order = append(order, j.sys.name)
	}
	if !slices.Equal(order, []string{"gonetns", "gonetns-packet", "gonetns-netstack", "slirp4netns", "pasta", "host"}) {
		t.Errorf("first jobs %v, want every system in turn", order)
	}
	// The next run starts each group one system further on.
	var run1, run2 []string
	for _, j := range jobs {
		if j.kind == kindC2H && j.mtu != 65520 {
			switch j.run {
			case 1:
				run1 = append(run1, j.sys.name)
			case 2:
				run2 = append(run2, j.sys.name)
			}
		}
	}
	if want := append(slices.Clone(run1[1:]), run1[0]); !slices.Equal(run2, want) {
		t.Errorf("run 2's first group %v, want run 1's %v from its second system on", run2, run1)
	}
	count := map[string]int{}
	for _, j := range jobs {
		count[j.sys.name+"/"+j.kind]++
		if j.sys.port && j.mtu != 65520 {
			t.Errorf("port job at MTU %d", j.mtu)
		}
		if j.sys.ref && j.mtu != 0 {
			t.Errorf("reference job at MTU %d", j.mtu)
		}
		if j.sys.name == "gvisor-tap-vsock" {
			t.Error("unavailable system scheduled")
		}
	}
	for key, want := range map[string]int{
		"gonetns/tcp_c2h": 4, "gonetns-packet/tcp_c2h": 4, "gonetns-netstack/tcp_c2h": 4, "gonetns/startup": 4, "host/tcp_c2h": 2, "host/startup": 0, "gonetns-port/port_h2c": 2,
		"gonetns/udp_c2h": 2, "host/udp_c2h": 2,
	} {
		if count[key] != want {
			t.Errorf("%s runs %d times, want %d", key, count[key], want)
		}
	}
	// Only the measurements asked for.
	cfg.kinds = map[string]bool{kindProbe: true}
	for _, j := range schedule(cfg, sys) {
		if j.kind != kindProbe {
			t.Errorf("%s %s scheduled with BENCH_MEASUREMENTS=probe", j.sys.name, j.kind)
		}
	}
}

func TestWriteResultsNeverOverwrites(t *testing.T) {
	dir := t.TempDir()
	date := time.Date(2026, 1, 2, 23, 59, 0, 0, time.UTC)
	files := map[string][]byte{".md": []byte("md"), ".json": []byte("{}"), ".svg": []byte("<svg/>")}
	// A stray .svg of the first name is enough to move on to -2.
	os.WriteFile(filepath.Join(dir, "2026-01-02-h.svg"), []byte("theirs"), 0o644)
	paths, err := writeResults(dir, date, "h", files)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"2026-01-02-h-2.md", "2026-01-02-h-2.json", "2026-01-02-h-2.svg"}
	for i, p := range paths {
		if filepath.Base(p) != want[i] {
			t.Errorf("path %s, want %s", p, want[i])
		}
	}
	paths, _ = writeResults(dir, date, "h", files)
	if filepath.Base(paths[0]) != "2026-01-02-h-3.md" {
		t.Errorf("third write went to %s", paths[0])
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "2026-01-02-h.svg")); string(b) != "theirs" {
		t.Error("an existing file was overwritten")
	}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), ".tmp") {
			t.Errorf("temporary file %s left behind", e.Name())
		}
	}
}

// fakeResults is a run with every kind of cell: values, a range, a failed
// run, a system that failed every run, one that is not installed.
func fakeResults() *results {
	sys := allSystems(tools{}, 1000)
	for _, s := range sys {
		s.available = true
	}
	sys[3].available, sys[3].reason = false, "not available in rootlesskit 1.1.0"
	r := &results{
		cfg:     config{seconds: 10, runs: 2, mtus: []int{1500, 65520}},
		machine: machine{Host: "h", CPU: "cpu <&>", NProc: 2, Kernel: "6.1"},
		systems: sys,
		started: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC),
	}
	r.finished = r.started.Add(time.Minute)
	add := func(run int, name string, mtu int, kind string, v map[string]float64, errText string) {
		r.samples = append(r.samples, sample{Run: run, System: name, MTU: mtu, Kind: kind, Values: v, Error: errText})
	}
	for run := 1; run <= 2; run++ {
		f := float64(run)
		for _, mtu := range r.cfg.mtus {
			add(run, "gonetns", mtu, kindC2H, map[string]float64{"gbps": 8 + f, "cpu_s_per_gb": 1, "rss_peak_mb": 20}, "")
			add(run, "gonetns", mtu, kindH2C, map[string]float64{"gbps": 9}, "")
			add(run, "gonetns", mtu, kindProbe, map[string]float64{"rr_p50_us": 100, "conn_per_s": 1000}, "")
			add(run, "slirp4netns", mtu, kindC2H, map[string]float64{"gbps": 2 * f}, "")
			add(run, "pasta", mtu, kindC2H, nil, "hello: connection refused | with a pipe")
		}
		add(run, "host", 0, kindC2H, map[string]float64{"gbps": 15}, "")
		add(run, "gonetns-port", 65520, kindPortIn, map[string]float64{"gbps": 10}, "")
		if run == 1 {
			add(run, "rootlesskit-builtin", 65520, kindPortIn, map[string]float64{"gbps": 8}, "")
		} else {
			add(run, "rootlesskit-builtin", 65520, kindPortIn, nil, "timeout")
		}
	}
	return r
}

func TestMarkdown(t *testing.T) {
	var b bytes.Buffer
	writeMarkdown(&b, fakeResults())
	md := b.String()
	for _, want := range []string{
		"| TCP throughput sandbox → host, Gbit/s | ↑ higher | 9.50 (9.00–10.0) | 3.00 (2.00–4.00) | 3.17× | failed | – | 15.0 |",
		"| 8.00 [1/2 runs failed] | 1.25× |",
		"not available in rootlesskit 1.1.0",
		"## MTU 1500", "## MTU 65520", "## Published ports",
		"hello: connection refused \\| with a pipe",
		"| gonetns | 9.50 / 9.00 | 9.50 / 9.00 |",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q:\n%s", want, md)
		}
	}
	if strings.Contains(md, "gvisor-tap-vsock |  |") {
		t.Error("an unavailable system got a column")
	}
}

func TestSVGIsWellFormed(t *testing.T) {
	svg := renderSVG(fakeResults())
	d := xml.NewDecoder(bytes.NewReader(svg))
	texts := 0
	for {
		tok, err := d.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("SVG is not well-formed XML: %v\n%s", err, svg)
		}
		if se, ok := tok.(xml.StartElement); ok && se.Name.Local == "text" {
			texts++
		}
	}
	for _, want := range []string{"Gbit/s", "MTU 1500", "MTU 65520", "host loopback 15.0 Gbit/s", "cpu &lt;&amp;&gt;", "rootlesskit + slirp4netns", ">failed<"} {
		if !bytes.Contains(svg, []byte(want)) {
			t.Errorf("SVG lacks %q", want)
		}
	}
	if texts < 20 {
		t.Errorf("only %d text elements", texts)
	}
}

func TestJSONHasSamplesAndSummary(t *testing.T) {
	b, err := marshalResults(fakeResults())
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"samples"`, `"summary"`, `"measurement": "tcp_c2h"`, `"median": 9.5`, `"failed": 2`} {
		if !bytes.Contains(b, []byte(want)) {
			t.Errorf("JSON lacks %s", want)
		}
	}
}

// A killed process takes its whole tree along, even children that left
// its process group; what is left over is swept.
func TestKillTakesTheTree(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	p, err := startProc(ctx, procOptions{argv: []string{"sh", "-c", "setsid sleep 60 & sleep 60 & wait"}})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	kids := descendants(p.pid)
	if len(kids) < 2 {
		t.Fatalf("descendants of the shell: %v, want two sleeps", kids)
	}
	if err := p.wait(context.Background()); err == nil {
		t.Error("killed process reported success")
	}
	sweepOrphans() // the killed sleeps were re-parented to us: reap them
	for _, k := range kids {
		if s, err := readStat(k); err == nil {
			t.Errorf("pid %d (%s, parent %d) survived the kill", k, s.comm, s.ppid)
		}
	}
}

// The client protocol, against the host itself (the reference system):
// hello, ready, go, result, exit.
func TestClientOnHost(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	b := &bench{
		cfg: config{seconds: 1, rrWarmup: 10, rrRounds: 100, connFor: 100 * time.Millisecond, connMax: 50,
			udpWarmup: 5, udpRounds: 50, startupCount: 2},
		client:  exe,
		workDir: t.TempDir(),
		log:     io.Discard,
	}
	b.tools = findTools("", "")
	var host *system
	for _, s := range allSystems(b.tools, os.Geteuid()) {
		if s.ref {
			host = s
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s := b.measure(ctx, job{run: 1, kind: kindProbe, sys: host})
	if s.Error != "" {
		t.Fatalf("probe: %s", s.Error)
	}
	for _, k := range []string{"rr_p50_us", "rr_p99_us", "conn_per_s", "udp_p50_us"} {
		if s.Values[k] <= 0 {
			t.Errorf("%s = %v", k, s.Values[k])
		}
	}
	if b.tools.iperf3 == "" {
		t.Fatalf("iperf3 is not installed (%s); scripts/test-setup.sh installs it", aptIperf3)
	}
	s = b.measure(ctx, job{run: 1, kind: kindH2C, sys: host})
	if s.Error != "" || s.Values["gbps"] <= 0 || s.Values["bytes"] <= 0 {
		t.Errorf("iperf3 on the host: %+v", s)
	}
	if len(b.faults) != 0 {
		t.Errorf("harness faults: %v", b.faults)
	}
}

// A line of ours that does not parse is the harness's fault; a client
// that reports an error is the system's.
func TestSessionFaults(t *testing.T) {
	sys := &system{name: "fake", argv: func(_, _ int, cmd []string) []string { return cmd }}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, tc := range []struct {
		script  string
		harness bool
	}{
		{`echo 'noise'; echo '{"gonetns_bench":1,"event":"ready"'`, true},
		{`echo '{"gonetns_bench":1,"event":"error","error":"hello: refused"}'`, false},
		{`echo 'just noise'; exit 3`, false},
	} {
		b := &bench{client: "sh", workDir: t.TempDir(), log: io.Discard}
		sys.argv = func(_, _ int, _ []string) []string { return []string{"sh", "-c", tc.script} }
		sess, err := b.startSession(ctx, sys, 1500, 0, clientSpec{})
		if err != nil {
			t.Fatal(err)
		}
		_, err = sess.next(ctx, "ready", 10*time.Second)
		sess.finish(time.Second)
		var he *harnessError
		if err == nil || errors.As(err, &he) != tc.harness {
			t.Errorf("%s: error %v, harness fault %v, want %v", tc.script, err, errors.As(err, &he), tc.harness)
		}
	}
}

func TestRootlessKit3FromItsOwnTools(t *testing.T) {
	// The system's rootlesskit (1.1 here) never stands in for v3.
	tl := tools{rootlesskit: "/usr/bin/rootlesskit", slirp4netns: "/usr/bin/slirp4netns"}
	sys := allSystems(tl, 1000)
	probeSystems(sys, tl, versions{rootlesskit: "1.1.0"})
	for _, s := range sys {
		if s.name != "gvisor-tap-vsock" {
			continue
		}
		if s.available || !strings.Contains(s.install, "go install "+rootlessKit3Module) {
			t.Errorf("without v3: available %v, install %q", s.available, s.install)
		}
		if a := s.argv(1500, 0, []string{"true"}); a[0] != "" {
			t.Errorf("argv %q runs the system's rootlesskit", a)
		}
	}
	tl.rootlesskit3 = "/tools/rootlesskit"
	sys = allSystems(tl, 1000)
	for _, s := range sys {
		if s.name == "gvisor-tap-vsock" {
			if a := s.argv(1500, 0, []string{"true"}); !slices.Equal(a, []string{"/tools/rootlesskit", "--net=gvisor-tap-vsock", "--mtu=1500", "true"}) {
				t.Errorf("argv %q", a)
			}
		}
	}
}
