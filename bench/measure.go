package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"time"
)

// Measurement kinds, the keys of samples.
const (
	kindC2H     = "tcp_c2h"  // iperf3 in the sandbox sends to the host
	kindH2C     = "tcp_h2c"  // iperf3 -R: the host sends to the sandbox
	kindUDP     = "udp_c2h"  // iperf3 -u -b 0: the sandbox floods the host with UDP
	kindProbe   = "probe"    // request/response, new connections, UDP
	kindStartup = "startup"  // wall time of `SYSTEM true`
	kindPortIn  = "port_h2c" // published port: the host's iperf3 sends in
	kindPortOut = "port_c2h" // published port, -R: the sandbox sends out
)

// allKinds are the measurements in the order a run makes them.
var allKinds = []string{kindC2H, kindH2C, kindUDP, kindProbe, kindStartup, kindPortIn, kindPortOut}

// sample is the outcome of one measurement run: the figures, the raw data
// they come from, or the error that stopped it.
type sample struct {
	Run     int                `json:"run"`
	System  string             `json:"system"`
	MTU     int                `json:"mtu,omitempty"`
	Kind    string             `json:"measurement"`
	Values  map[string]float64 `json:"values,omitempty"`
	Raw     any                `json:"raw,omitempty"`
	Error   string             `json:"error,omitempty"`
	Started time.Time          `json:"started"`
	Wall    float64            `json:"wall_seconds"`
}

// netUsage is what the process that moves the packets used during a
// throughput run.
type netUsage struct {
	pid        int
	cpu0, cpu1 float64 // utime+stime, seconds
	rssIdleKB  int64   // VmRSS before the run
	hwmKB      int64   // VmHWM after it
}

func (b *bench) netBefore(sys *system, pid int) (*netUsage, error) {
	if sys.netProc == nil {
		return nil, nil
	}
	np, err := sys.netProc(pid)
	if err != nil {
		return nil, err
	}
	u := &netUsage{pid: np}
	if u.cpu0, err = cpuSeconds(np); err != nil {
		return nil, fmt.Errorf("%s: %w", sys.netName, err)
	}
	if _, u.rssIdleKB, err = memory(np); err != nil {
		return nil, fmt.Errorf("%s: %w", sys.netName, err)
	}
	return u, nil
}

func (u *netUsage) after() error {
	if u == nil {
		return nil
	}
	var err error
	if u.cpu1, err = cpuSeconds(u.pid); err != nil {
		return err
	}
	u.hwmKB, _, err = memory(u.pid)
	return err
}

// throughputValues turns an iperf3 run and the network process's usage
// into the sample's figures.
func throughputValues(r iperfRun, u *netUsage) map[string]float64 {
	v := map[string]float64{
		"gbps":        r.BitsPerSec / 1e9,
		"bytes":       r.Bytes,
		"seconds":     r.Seconds,
		"retransmits": r.Retransmits,
	}
	if u != nil {
		cpu := u.cpu1 - u.cpu0
		v["cpu_s"] = cpu
		v["cpu_s_per_gb"] = cpu / (r.Bytes / 1e9)
		v["rss_idle_mb"] = float64(u.rssIdleKB) / 1024
		v["rss_peak_mb"] = float64(u.hwmKB) / 1024
	}
	return v
}

// udpValues are the figures of a UDP flood: what arrived (goodput), what
// was offered, and the share lost on the way.
func udpValues(r iperfRun, u *netUsage) map[string]float64 {
	v := throughputValues(r, u)
	delete(v, "retransmits")
	v["mbps"] = r.BitsPerSec / 1e6
	if r.Seconds > 0 {
		v["sent_mbps"] = r.SentBytes * 8 / r.Seconds / 1e6
	}
	v["lost_percent"] = r.LostPercent
	return v
}

// throughput runs iperf3 in the sandbox against a one-off iperf3 server
// on the host's 127.0.0.1: TCP (reverse: the host sends) or, with udp, a
// UDP flood from the sandbox (as fast as the client can send, 1400-byte
// datagrams).
func (b *bench) throughput(ctx context.Context, sys *system, mtu int, reverse, udp bool, s *sample) error {
	if b.tools.iperf3 == "" {
		return errors.New("iperf3 is not installed: " + aptIperf3)
	}
	echo, err := startEchoServers()
	if err != nil {
		return &harnessError{err}
	}
	defer echo.Close()
	srv, err := startIperfServer(ctx, b.tools.iperf3)
	if err != nil {
		return err
	}
	defer srv.stop()
	spec := clientSpec{
		Task: taskIperf, Target: sys.target, Token: newToken(), EchoPort: echo.tcpPort(),
		IperfPort: srv.port, Iperf3: b.tools.iperf3, Seconds: b.cfg.seconds, Reverse: reverse, UDPFlood: udp,
	}
	sess, err := b.startSession(ctx, sys, mtu, 0, spec)
	if err != nil {
		return err
	}
	defer sess.finish(10 * time.Second)
	if _, err := sess.next(ctx, "ready", 60*time.Second); err != nil {
		return err
	}
	usage, err := b.netBefore(sys, sess.p.pid)
	if err != nil {
		return err
	}
	sess.send("go")
	ev, err := sess.next(ctx, "result", time.Duration(b.cfg.seconds+60)*time.Second)
	if err != nil {
		return err
	}
	if err := usage.after(); err != nil {
		return fmt.Errorf("%s after the run: %w", sys.netName, err)
	}
	if ev.Iperf == nil {
		return fmt.Errorf("iperf3 printed no JSON (%s): %s", ev.IperfErr, ev.IperfText)
	}
	run, err := parseIperf(ev.Iperf)
	if err != nil {
		if ev.IperfErr != "" {
			err = fmt.Errorf("%w (%s)", err, ev.IperfErr)
		}
		return err
	}
	if udp {
		s.Values = udpValues(run, usage)
	} else {
		s.Values = throughputValues(run, usage)
	}
	s.Raw = run
	return nil
}

// portThroughput runs an iperf3 server in the sandbox and the client on
// the host, through the port sys publishes on 127.0.0.1 (reverse: the
// sandbox sends).
func (b *bench) portThroughput(ctx context.Context, sys *system, mtu int, reverse bool, s *sample) error {
	if b.tools.iperf3 == "" {
		return errors.New("iperf3 is not installed: " + aptIperf3)
	}
	hostPort, err := freePort()
	if err != nil {
		return &harnessError{err}
	}
	spec := clientSpec{Task: taskServe, Iperf3: b.tools.iperf3, ServePort: childPort}
	sess, err := b.startSession(ctx, sys, mtu, hostPort, spec)
	if err != nil {
		return err
	}
	defer sess.finish(10 * time.Second)
	if _, err := sess.next(ctx, "ready", 60*time.Second); err != nil {
		return err
	}
	if err := waitListening(ctx, sess.p, hostPort, loopback); err != nil {
		return fmt.Errorf("published port 127.0.0.1:%d: %s", hostPort, sess.failure(err))
	}
	usage, err := b.netBefore(sys, sess.p.pid)
	if err != nil {
		return err
	}
	args := []string{b.tools.iperf3, "-c", loopback.String(), "-p", strconv.Itoa(hostPort),
		"-t", strconv.Itoa(b.cfg.seconds), "--json", "--connect-timeout", "10000"}
	if reverse {
		args = append(args, "-R")
	}
	var out bytes.Buffer
	runCtx, cancel := context.WithTimeout(ctx, time.Duration(b.cfg.seconds+60)*time.Second)
	defer cancel()
	cl, err := startProc(runCtx, procOptions{argv: args, stdout: &out})
	if err != nil {
		return err
	}
	werr := cl.wait(runCtx)
	if err := usage.after(); err != nil {
		return fmt.Errorf("%s after the run: %w", sys.netName, err)
	}
	run, err := parseIperf(out.Bytes())
	if err != nil {
		if werr != nil {
			err = fmt.Errorf("%w (%s)", err, cl.errorText(werr))
		}
		return err
	}
	s.Values = throughputValues(run, usage)
	s.Raw = run
	return nil
}

// probe runs the per-connection measurements in the sandbox against echo
// servers on the host's 127.0.0.1.
func (b *bench) probe(ctx context.Context, sys *system, mtu int, s *sample) error {
	echo, err := startEchoServers()
	if err != nil {
		return &harnessError{err}
	}
	defer echo.Close()
	c := b.cfg
	spec := clientSpec{
		Task: taskProbe, Target: sys.target, Token: newToken(), EchoPort: echo.tcpPort(), UDPPort: echo.udpPort(),
		RRWarmup: c.rrWarmup, RRRounds: c.rrRounds, ConnForMS: int(c.connFor / time.Millisecond), ConnMax: c.connMax,
		UDPWarmup: c.udpWarmup, UDPRounds: c.udpRounds,
	}
	sess, err := b.startSession(ctx, sys, mtu, 0, spec)
	if err != nil {
		return err
	}
	defer sess.finish(10 * time.Second)
	if _, err := sess.next(ctx, "ready", 60*time.Second); err != nil {
		return err
	}
	// The network process's CPU time at each mark of the client: the
	// start of the measured round trips, of the connection loop, and its
	// end.
	netPid := 0
	if sys.netProc != nil {
		if netPid, err = sys.netProc(sess.p.pid); err != nil {
			return err
		}
	}
	cpuAt := map[string]int64{}
	sess.send("go")
	var ev clientEvent
	for {
		ev, err = sess.next(ctx, "", 5*time.Minute)
		if err != nil {
			return err
		}
		if ev.Event != "mark" {
			break
		}
		if netPid != 0 {
			if cpuAt[ev.Mark], err = cpuNanos(netPid); err != nil {
				return fmt.Errorf("%s: %w", sys.netName, err)
			}
		}
		sess.send("marked")
	}
	if ev.Event != "result" || ev.Probe == nil {
		return &harnessError{fmt.Errorf("%s: the client sent %q, want its probe figures", sys.name, ev.Event)}
	}
	p := ev.Probe
	s.Values = map[string]float64{
		"rr_p50_us":  p.RRP50us,
		"rr_p99_us":  p.RRP99us,
		"conn_per_s": p.ConnPerSec,
		"udp_p50_us": p.UDPP50us,
	}
	if len(cpuAt) == 3 && p.RRRounds > 0 && p.Conns > 0 {
		s.Values["rr_cpu_us"] = float64(cpuAt["conn"]-cpuAt["rr"]) / 1e3 / float64(p.RRRounds)
		s.Values["conn_cpu_us"] = float64(cpuAt["done"]-cpuAt["conn"]) / 1e3 / float64(p.Conns)
	}
	s.Raw = p
	return nil
}

// startup times `SYSTEM true` from fork to reaping, startupCount times.
func (b *bench) startup(ctx context.Context, sys *system, mtu int, s *sample) error {
	var ms []float64
	for range b.cfg.startupCount {
		if err := b.once(ctx, sys, mtu, 0, &ms); err != nil {
			return err
		}
	}
	s.Values = map[string]float64{"startup_ms": median(ms)}
	s.Raw = map[string]any{"startup_ms": ms}
	return nil
}

// once runs `SYSTEM true` once, appending its wall time in ms to ms.
func (b *bench) once(ctx context.Context, sys *system, mtu, hostPort int, ms *[]float64) error {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	start := time.Now()
	p, err := startProc(ctx, procOptions{argv: sys.argv(mtu, hostPort, []string{"true"}), dir: b.workDir})
	if err != nil {
		return err
	}
	if err := p.wait(ctx); err != nil {
		return errors.New(p.errorText(err))
	}
	if ms != nil {
		*ms = append(*ms, float64(time.Since(start))/float64(time.Millisecond))
	}
	return nil
}

func round3(x float64) float64 { return math.Round(x*1000) / 1000 }

// measure runs one job and returns its sample.
func (b *bench) measure(ctx context.Context, j job) sample {
	s := sample{Run: j.run, System: j.sys.name, MTU: j.mtu, Kind: j.kind, Started: time.Now().UTC()}
	var err error
	switch j.kind {
	case kindC2H, kindH2C, kindUDP:
		err = b.throughput(ctx, j.sys, j.mtu, j.kind == kindH2C, j.kind == kindUDP, &s)
	case kindPortIn, kindPortOut:
		err = b.portThroughput(ctx, j.sys, j.mtu, j.kind == kindPortOut, &s)
	case kindProbe:
		err = b.probe(ctx, j.sys, j.mtu, &s)
	case kindStartup:
		err = b.startup(ctx, j.sys, j.mtu, &s)
	default:
		err = &harnessError{fmt.Errorf("unknown measurement %q", j.kind)}
	}
	s.Wall = round3(time.Since(s.Started).Seconds())
	if err != nil {
		var he *harnessError
		if errors.As(err, &he) {
			b.fault(he)
		}
		s.Error = err.Error()
		s.Values = nil
	}
	for k, v := range s.Values {
		if math.IsNaN(v) || math.IsInf(v, 0) {
			delete(s.Values, k)
		}
	}
	return s
}

// kindsFor lists the measurements of a system, in the order they run.
func kindsFor(sys *system) []string {
	switch {
	case sys.port:
		return []string{kindPortIn, kindPortOut}
	case sys.ref:
		return []string{kindC2H, kindH2C, kindUDP, kindProbe}
	}
	return []string{kindC2H, kindH2C, kindUDP, kindProbe, kindStartup}
}

// job is one measurement run of one system.
type job struct {
	run  int
	mtu  int
	kind string
	sys  *system
}

// schedule interleaves the systems: for each run, each MTU and each
// measurement, every system in turn, each run starting one system further
// on (A B C, B C A, C A B), so that drift of the machine hits all of them
// alike. The reference (host loopback, no
// MTU) runs once per run, with the first MTU; so does the UDP flood, whose
// datagrams fit any MTU; the published-port systems run once per run, at
// the largest MTU.
func schedule(cfg config, systems []*system) []job {
	var jobs []job
	kinds := slices.DeleteFunc(slices.Clone(allKinds), func(k string) bool { return !cfg.measures(k) })
	portMTU := slices.Max(cfg.mtus)
	for run := 1; run <= cfg.runs; run++ {
		for i, mtu := range cfg.mtus {
			for _, k := range kinds {
				var group []job
				for _, sys := range systems {
					if !sys.available || !slices.Contains(kindsFor(sys), k) {
						continue
					}
					switch {
					case sys.port:
						continue
					case sys.ref && i != 0:
						continue
					case k == kindUDP && i != 0:
						continue // 1400-byte datagrams: the MTU changes nothing
					}
					m := mtu
					if sys.ref {
						m = 0
					}
					group = append(group, job{run: run, mtu: m, kind: k, sys: sys})
				}
				jobs = append(jobs, rotate(group, run-1)...)
			}
		}
		for _, k := range kinds {
			if k != kindPortIn && k != kindPortOut {
				continue
			}
			var group []job
			for _, sys := range systems {
				if sys.available && sys.port {
					group = append(group, job{run: run, mtu: portMTU, kind: k, sys: sys})
				}
			}
			jobs = append(jobs, rotate(group, run-1)...)
		}
	}
	return jobs
}

// rotate starts a group of jobs (every system, one measurement) n places
// further on each run: no system is always the first after another kind
// of measurement (the first probe after the UDP flood, say) or always the
// last, so that whatever the machine still does after one group, or
// drifts to within one, is spread over the systems rather than charged
// to the same one in every run.
func rotate(group []job, n int) []job {
	if len(group) == 0 {
		return group
	}
	n %= len(group)
	return slices.Concat(group[n:], group[:n])
}
