package main

// The client role: the harness's own binary, started inside a namespace
// (or, for the reference, on the host) with clientEnv set, runs one task
// and talks to the harness over stdin/stdout:
//
//	client -> harness   {"gonetns_bench":1,"event":"ready",...}    set up, hello answered
//	harness -> client   go                                           start measuring
//	client -> harness   {"gonetns_bench":1,"event":"result",...}   (or "error")
//	harness -> client   exit (or EOF)                                 leave
//
// Between ready and go, and between result and exit, the harness reads
// the CPU time and memory of the process that moves the packets.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// clientEnv selects the client role; its value must be "1".
const clientEnv = "GONETNS_BENCH_CLIENT"

// eventMarker starts every line the client writes for the harness.
const eventMarker = `{"gonetns_bench":`

// Tasks of the client.
const (
	taskProbe = "probe" // request/response latency, new connections, UDP round trips
	taskIperf = "iperf" // one iperf3 client run against the host
	taskServe = "serve" // an iperf3 server inside, for published ports
)

// clientSpec is the client's one argument, as JSON.
type clientSpec struct {
	Task      string `json:"task"`
	Target    string `json:"target,omitempty"` // an address, or "gateway"
	Token     string `json:"token,omitempty"`  // echoed by the host's echo server (hello)
	EchoPort  int    `json:"echo_port,omitempty"`
	UDPPort   int    `json:"udp_port,omitempty"`
	IperfPort int    `json:"iperf_port,omitempty"`
	Iperf3    string `json:"iperf3,omitempty"`
	Seconds   int    `json:"seconds,omitempty"`
	Reverse   bool   `json:"reverse,omitempty"`
	UDPFlood  bool   `json:"udp_flood,omitempty"` // iperf3 -u -b 0 -l udpFloodLen
	RRWarmup  int    `json:"rr_warmup,omitempty"`
	RRRounds  int    `json:"rr_rounds,omitempty"`
	ConnForMS int    `json:"conn_for_ms,omitempty"`
	ConnMax   int    `json:"conn_max,omitempty"`
	UDPWarmup int    `json:"udp_warmup,omitempty"`
	UDPRounds int    `json:"udp_rounds,omitempty"`
	ServePort int    `json:"serve_port,omitempty"`
}

// clientEvent is one line of the client's output.
type clientEvent struct {
	Marker int    `json:"gonetns_bench"`  // always 1
	Event  string `json:"event"`          // ready, mark, result, error
	Mark   string `json:"mark,omitempty"` // with mark: the phase that starts (rr, conn) or ends (done)
	Target string `json:"target,omitempty"`
	UID    int    `json:"uid"`
	Error  string `json:"error,omitempty"`

	Probe *probeResult `json:"probe,omitempty"`
	// Iperf is iperf3's --json output; IperfText is its output when that
	// is not JSON.
	Iperf     json.RawMessage `json:"iperf,omitempty"`
	IperfText string          `json:"iperf_text,omitempty"`
	IperfErr  string          `json:"iperf_err,omitempty"`
}

// probeResult holds the per-connection figures of one run.
type probeResult struct {
	RRRounds    int     `json:"rr_rounds"`
	RRP50us     float64 `json:"rr_p50_us"`
	RRP90us     float64 `json:"rr_p90_us"`
	RRP99us     float64 `json:"rr_p99_us"`
	RRMaxUs     float64 `json:"rr_max_us"`
	Conns       int     `json:"conns"`
	ConnErrors  int     `json:"conn_errors"`
	ConnSeconds float64 `json:"conn_seconds"`
	ConnPerSec  float64 `json:"conn_per_s"`
	UDPRounds   int     `json:"udp_rounds"`
	UDPLost     int     `json:"udp_lost"`
	UDPP50us    float64 `json:"udp_p50_us"`
	UDPP99us    float64 `json:"udp_p99_us"`
}

// runClient is the client role's main. Its exit status is 0 when it
// reported (a result or an error), 1 when it could not even do that.
func runClient(args []string) int {
	// Die with whoever started us (the namespace's init, pasta, ...); the
	// harness holds our stdin, so its death also ends us by EOF.
	unix.Prctl(unix.PR_SET_PDEATHSIG, uintptr(unix.SIGKILL), 0, 0, 0)
	if os.Getppid() == 1 {
		return 1
	}
	if len(args) != 1 {
		fmt.Fprintf(os.Stderr, "gonetns-bench client: want one argument (the task as JSON), got %d\n", len(args))
		return 1
	}
	var spec clientSpec
	if err := json.Unmarshal([]byte(args[0]), &spec); err != nil {
		fmt.Fprintf(os.Stderr, "gonetns-bench client: bad task %q: %v\n", args[0], err)
		return 1
	}
	c := &client{spec: spec, out: bufio.NewWriter(os.Stdout), cmds: readCommands(os.Stdin)}
	if err := c.run(); err != nil {
		c.emit(clientEvent{Event: "error", Error: err.Error()})
	}
	return 0
}

type client struct {
	spec clientSpec
	out  *bufio.Writer
	cmds <-chan string // lines from the harness; closed at EOF
}

// readCommands delivers the lines of r; the channel closes at EOF.
func readCommands(r io.Reader) <-chan string {
	ch := make(chan string, 4)
	go func() {
		defer close(ch)
		s := bufio.NewScanner(r)
		for s.Scan() {
			ch <- strings.TrimSpace(s.Text())
		}
	}()
	return ch
}

func (c *client) emit(e clientEvent) {
	e.Marker = 1
	e.UID = os.Getuid()
	b, err := json.Marshal(e)
	if err != nil {
		b, _ = json.Marshal(clientEvent{Marker: 1, Event: "error", Error: "encode event: " + err.Error()})
	}
	c.out.Write(b)
	c.out.WriteByte('\n')
	c.out.Flush()
}

// await waits for the harness's command want; EOF counts as exit.
func (c *client) await(want string) error {
	for cmd := range c.cmds {
		if cmd == want {
			return nil
		}
		if cmd == "exit" {
			return errors.New("told to exit")
		}
	}
	if want == "exit" {
		return nil
	}
	return errors.New("the harness went away")
}

func (c *client) run() error {
	s := c.spec
	if s.Task == taskServe {
		return c.serve()
	}
	target, err := resolveTarget(s.Target)
	if err != nil {
		return err
	}
	// The hello proves that the target reaches our echo server on the
	// host's loopback before anything heavier is sent there.
	if err := hello(target, s.EchoPort, s.Token); err != nil {
		return err
	}
	c.emit(clientEvent{Event: "ready", Target: target.String()})
	if err := c.await("go"); err != nil {
		return err
	}
	switch s.Task {
	case taskProbe:
		res, err := probe(target, s, c.mark)
		if err != nil {
			return err
		}
		c.emit(clientEvent{Event: "result", Probe: res})
	case taskIperf:
		c.emit(runIperfClient(target, s))
	default:
		return fmt.Errorf("unknown task %q", s.Task)
	}
	c.await("exit")
	return nil
}

// mark tells the harness that a phase of the probe starts (or, "done",
// ends) and waits until it has read the network process's CPU time.
func (c *client) mark(phase string) error {
	c.emit(clientEvent{Event: "mark", Mark: phase})
	return c.await("marked")
}

// resolveTarget turns the spec's target into an address: "gateway" is
// the default route's gateway (read from /proc/net/route, as `ip route`
// would show it); only loopback and the namespace's gateway are allowed.
func resolveTarget(t string) (netip.Addr, error) {
	if t == targetGateway {
		b, err := os.ReadFile("/proc/net/route")
		if err != nil {
			return netip.Addr{}, err
		}
		return defaultGateway(string(b))
	}
	a, err := netip.ParseAddr(t)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("target %q: %w", t, err)
	}
	if a != netip.MustParseAddr(targetHost) && a != netip.MustParseAddr(targetSlirp) {
		return netip.Addr{}, fmt.Errorf("target %v is neither loopback nor the sandbox's gateway", a)
	}
	return a, nil
}

// defaultGateway parses /proc/net/route, whose addresses are hex numbers
// in the host's byte order.
func defaultGateway(route string) (netip.Addr, error) {
	for _, line := range strings.Split(route, "\n")[1:] {
		f := strings.Fields(line)
		if len(f) < 8 || f[1] != "00000000" || f[7] != "00000000" {
			continue
		}
		v, err := strconv.ParseUint(f[2], 16, 32)
		if err != nil || v == 0 {
			continue
		}
		var b [4]byte
		binary.NativeEndian.PutUint32(b[:], uint32(v))
		return netip.AddrFrom4(b), nil
	}
	return netip.Addr{}, errors.New("no default route with a gateway in /proc/net/route")
}

func hello(target netip.Addr, port int, token string) error {
	addr := netip.AddrPortFrom(target, uint16(port)).String()
	conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return fmt.Errorf("hello: %w", err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(conn, token); err != nil {
		return fmt.Errorf("hello: %w", err)
	}
	got := make([]byte, len(token))
	if _, err := io.ReadFull(conn, got); err != nil {
		return fmt.Errorf("hello to %s: %w", addr, err)
	}
	if string(got) != token {
		return fmt.Errorf("hello to %s: answered %q, not our echo server", addr, got)
	}
	return nil
}

// probe measures the per-connection figures: request/response latency on
// one connection, new connections per second, UDP round trips.
// mark brackets the measured round trips and the connection loop so that
// the harness can read the network process's CPU time around each.
func probe(target netip.Addr, s clientSpec, mark func(phase string) error) (*probeResult, error) {
	res := &probeResult{}
	echo := netip.AddrPortFrom(target, uint16(s.EchoPort)).String()
	if err := requestResponse(echo, s, res, mark); err != nil {
		return nil, fmt.Errorf("request/response: %w", err)
	}
	if err := mark("conn"); err != nil {
		return nil, err
	}
	if err := newConnections(echo, s, res); err != nil {
		return nil, fmt.Errorf("new connections: %w", err)
	}
	if err := mark("done"); err != nil {
		return nil, err
	}
	udp := netip.AddrPortFrom(target, uint16(s.UDPPort)).String()
	if err := udpRoundTrips(udp, s, res); err != nil {
		return nil, fmt.Errorf("UDP round trips: %w", err)
	}
	return res, nil
}

// requestResponse sends 1 byte and reads 1 byte back, RRWarmup times
// unmeasured and RRRounds times measured, on one connection.
func requestResponse(addr string, s clientSpec, res *probeResult, mark func(string) error) error {
	conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(2 * time.Minute))
	b := []byte{'x'}
	rtts := make([]time.Duration, 0, s.RRRounds)
	for i := range s.RRWarmup + s.RRRounds {
		if i == s.RRWarmup {
			if err := mark("rr"); err != nil {
				return err
			}
		}
		start := time.Now()
		if _, err := conn.Write(b); err != nil {
			return err
		}
		if _, err := io.ReadFull(conn, b); err != nil {
			return err
		}
		if i >= s.RRWarmup {
			rtts = append(rtts, time.Since(start))
		}
	}
	slices.Sort(rtts)
	res.RRRounds = len(rtts)
	res.RRP50us = micros(percentile(rtts, 50))
	res.RRP90us = micros(percentile(rtts, 90))
	res.RRP99us = micros(percentile(rtts, 99))
	res.RRMaxUs = micros(percentile(rtts, 100))
	return nil
}

// newConnections opens connections one after another (connect, 1 byte
// each way, close) for ConnForMS or ConnMax connections.
func newConnections(addr string, s clientSpec, res *probeResult) error {
	start := time.Now()
	deadline := start.Add(time.Duration(s.ConnForMS) * time.Millisecond)
	b := []byte{'c'}
	failed := 0
	for res.Conns < s.ConnMax && time.Now().Before(deadline) {
		err := func() error {
			conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
			if err != nil {
				return err
			}
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := conn.Write(b); err != nil {
				return err
			}
			_, err = io.ReadFull(conn, b)
			return err
		}()
		if err != nil {
			res.ConnErrors++
			if failed++; failed >= 10 {
				return fmt.Errorf("10 failures in a row after %d connections, last: %w", res.Conns, err)
			}
			continue
		}
		failed = 0
		res.Conns++
	}
	res.ConnSeconds = time.Since(start).Seconds()
	res.ConnPerSec = float64(res.Conns) / res.ConnSeconds
	return nil
}

// udpRoundTrips sends numbered 8-byte datagrams one at a time and waits
// up to 1 s for each echo; a lost one is counted, stale echoes skipped.
func udpRoundTrips(addr string, s clientSpec, res *probeResult) error {
	conn, err := net.Dial("udp", addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	out := make([]byte, 8)
	in := make([]byte, 64)
	rtts := make([]time.Duration, 0, s.UDPRounds)
	lost := 0
	for i := range s.UDPWarmup + s.UDPRounds {
		binary.BigEndian.PutUint64(out, uint64(i))
		start := time.Now()
		if _, err := conn.Write(out); err != nil {
			return err
		}
		conn.SetReadDeadline(start.Add(time.Second))
		for {
			n, err := conn.Read(in)
			if err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					lost++
					break
				}
				return err
			}
			if n == 8 && bytes.Equal(in[:8], out) {
				if i >= s.UDPWarmup {
					rtts = append(rtts, time.Since(start))
				}
				break
			}
		}
		if lost > 20 {
			return fmt.Errorf("%d datagrams lost after %d round trips", lost, len(rtts))
		}
	}
	if len(rtts) == 0 {
		return errors.New("no datagram came back")
	}
	slices.Sort(rtts)
	res.UDPRounds = len(rtts)
	res.UDPLost = lost
	res.UDPP50us = micros(percentile(rtts, 50))
	res.UDPP99us = micros(percentile(rtts, 99))
	return nil
}

// udpFloodLen is the datagram size of the UDP flood: it fits a 1500-byte
// MTU, so every system carries the same datagrams whatever its MTU.
const udpFloodLen = 1400

// runIperfClient runs iperf3 against the host and returns its JSON.
func runIperfClient(target netip.Addr, s clientSpec) clientEvent {
	args := []string{"-c", target.String(), "-p", strconv.Itoa(s.IperfPort), "-t", strconv.Itoa(s.Seconds),
		"--json", "--connect-timeout", "10000"}
	if s.Reverse {
		args = append(args, "-R")
	}
	if s.UDPFlood {
		// No rate limit: the sender offers what it can, and what the
		// network delivers of it is the figure.
		args = append(args, "-u", "-b", "0", "-l", strconv.Itoa(udpFloodLen))
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(s.Seconds+30)*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, s.Iperf3, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	ev := clientEvent{Event: "result"}
	if out := bytes.TrimSpace(stdout.Bytes()); json.Valid(out) {
		ev.Iperf = out
	} else {
		ev.IperfText = lastLines(stdout.String(), 5)
	}
	if err != nil {
		ev.IperfErr = strings.TrimSpace(err.Error() + " " + lastLines(stderr.String(), 3))
	}
	return ev
}

// serve runs an iperf3 server inside until told to exit.
func (c *client) serve() error {
	s := c.spec
	cmd := exec.Command(s.Iperf3, "-s", "-p", strconv.Itoa(s.ServePort))
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stderr := newTailBuffer(4 << 10)
	cmd.Stdout, cmd.Stderr = io.Discard, stderr
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start iperf3 server: %w", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		cmd.Process.Kill()
		<-exited
	}()
	deadline := time.Now().Add(10 * time.Second)
	for !listening(s.ServePort, netip.Addr{}) {
		select {
		case err := <-exited:
			exited <- err
			return fmt.Errorf("iperf3 server exited: %v %s", err, lastLines(stderr.String(), 3))
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return errors.New("iperf3 server not listening after 10 s")
		}
	}
	c.emit(clientEvent{Event: "ready"})
	c.await("exit")
	return nil
}

// listening reports whether a TCP socket of this network namespace
// listens on port, on addr (any address when addr is the zero value).
func listening(port int, addr netip.Addr) bool {
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		b, err := os.ReadFile(f)
		if err == nil && listensIn(string(b), port, addr) {
			return true
		}
	}
	return false
}

// listensIn parses /proc/net/tcp or tcp6: "sl local_address rem_address
// st ...", addresses as hex in the host's byte order, LISTEN is 0A.
func listensIn(table string, port int, addr netip.Addr) bool {
	for _, line := range strings.Split(table, "\n") {
		f := strings.Fields(line)
		if len(f) < 4 || f[3] != "0A" {
			continue
		}
		host, p, ok := strings.Cut(f[1], ":")
		if !ok {
			continue
		}
		if v, err := strconv.ParseUint(p, 16, 16); err != nil || int(v) != port {
			continue
		}
		if !addr.IsValid() {
			return true
		}
		raw, err := hex.DecodeString(host)
		if err != nil || len(raw) != 4 || !addr.Is4() {
			continue
		}
		var b [4]byte
		binary.NativeEndian.PutUint32(b[:], binary.BigEndian.Uint32(raw))
		if netip.AddrFrom4(b) == addr {
			return true
		}
	}
	return false
}

// newToken is a random hello token.
func newToken() string {
	b := make([]byte, 12)
	rand.Read(b)
	return "gonetns-bench:" + hex.EncodeToString(b)
}
