// Command soak runs mixed TCP traffic through one gonetns sandbox for a
// long time and watches the network process: round trips, new
// connections, bulk transfers both ways (every byte checked with
// sha256), slow readers, resets and half-closes, all against servers on
// the host's 127.0.0.1 reached through the gateway. Every sample period
// it prints the gonetns parent's resident and private memory and open
// descriptors beside what the traffic did; at the end, whether private
// memory or descriptors grew beyond the first minute's peak (see
// usageSample for why private memory) and whether any transfer went wrong,
// and the level of private memory (lowest, median and peak sample) per
// 5-minute window.
// scripts/soak.sh builds and runs it as the test user.
//
//	soak -gonetns PATH [-duration 30m] [-sample 30s] [-- GONETNS FLAGS...]
//
// The same binary is the client inside the sandbox (SOAK_CLIENT=1).
package main

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// The servers' protocols, one listener each on 127.0.0.1.
const (
	srvEcho      = "echo"      // echoes until EOF
	srvSource    = "source"    // reads an 8-byte size and a seed, sends that many bytes of the seed's stream
	srvSink      = "sink"      // reads to EOF, answers with the sha256 of what it read
	srvReset     = "reset"     // reads a byte, then closes with a reset
	srvHalfClose = "halfclose" // reads to EOF, then answers with the count
)

var servers = []string{srvEcho, srvSource, srvSink, srvReset, srvHalfClose}

// status is what the client reports every sample period.
type status struct {
	RoundTrips int64  `json:"round_trips"`
	Conns      int64  `json:"conns"`
	Uploads    int64  `json:"uploads"`
	Downloads  int64  `json:"downloads"`
	SlowReads  int64  `json:"slow_reads"`
	Resets     int64  `json:"resets"`     // resets seen where one was expected
	HalfCloses int64  `json:"halfcloses"` // half-close exchanges that came back right
	Bytes      int64  `json:"bytes"`      // bulk bytes moved, both ways
	BadSums    int64  `json:"bad_sums"`   // transfers whose sha256 differed
	Errors     int64  `json:"errors"`     // anything else that failed
	LastError  string `json:"last_error,omitempty"`
	// Quiet marks the report made at a quiet point: every worker paused
	// between two of its steps, no connection open, for quietFor.
	Quiet bool `json:"quiet,omitempty"`
}

// quietFor is how long the traffic pauses after each sample period before
// the quiet sample: long enough for every connection's close to be done
// and for the network process to have given back the memory the traffic
// used (it does so after between one and two seconds without a frame:
// sandbox's idleRelease).
const quietFor = 4 * time.Second

// quietHold is how long the pause lasts after the quiet report, for the
// harness to sample before the traffic resumes.
const quietHold = time.Second

func main() {
	if os.Getenv("SOAK_CLIENT") == "1" {
		if err := client(); err != nil {
			fmt.Fprintln(os.Stderr, "soak client:", err)
			os.Exit(1)
		}
		return
	}
	os.Exit(harness())
}

func harness() int {
	gonetns := flag.String("gonetns", "bin/gonetns", "the gonetns binary")
	duration := flag.Duration("duration", 30*time.Minute, "how long the traffic runs")
	sample := flag.Duration("sample", 30*time.Second, "how often memory and descriptors are read")
	flag.Parse()
	ports := map[string]int{}
	for _, name := range servers {
		l, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			fmt.Fprintln(os.Stderr, "soak:", err)
			return 2
		}
		ports[name] = l.Addr().(*net.TCPAddr).Port
		go serve(name, l)
	}
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintln(os.Stderr, "soak:", err)
		return 2
	}
	var env []string
	for _, name := range servers {
		env = append(env, fmt.Sprintf("SOAK_PORT_%s=%d", strings.ToUpper(name), ports[name]))
	}
	args := append(flag.Args(), self)
	cmd := exec.Command(*gonetns, args...)
	cmd.Env = append(os.Environ(), append(env, "SOAK_CLIENT=1", "SOAK_TARGET=10.0.2.2",
		"SOAK_DURATION="+duration.String(), "SOAK_SAMPLE="+sample.String())...)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		fmt.Fprintln(os.Stderr, "soak:", err)
		return 2
	}
	if err := cmd.Start(); err != nil {
		fmt.Fprintln(os.Stderr, "soak:", err)
		return 2
	}
	pid := cmd.Process.Pid
	fmt.Printf("soak: gonetns %s, %v of mixed TCP traffic, a sample every %v\n\n", strings.Join(flag.Args(), " "), *duration, *sample)
	fmt.Println("| time | RSS MiB | private MiB | fds | threads | round trips | new conns | uploads | downloads | slow reads | resets | half-closes | GB moved | bad sha256 | errors |")
	fmt.Println("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
	start := time.Now()
	window := min(levelWindow, *duration)
	// Under traffic, and at the quiet points (which the verdict compares).
	busy, quiet := &series{window: window, duration: *duration}, &series{window: window, duration: *duration}
	var last status
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		var st status
		if err := json.Unmarshal(sc.Bytes(), &st); err != nil {
			fmt.Fprintln(os.Stderr, "soak: client said:", sc.Text())
			continue
		}
		u := usage(pid)
		el := time.Since(start)
		inFirst := el <= time.Minute+*sample/2
		if st.Quiet {
			quiet.add(u, el, inFirst)
			fmt.Printf("| %v quiet | %.1f | %.1f | %d | %d | | | | | | | | | | |\n", el.Round(time.Second),
				float64(u.rssKB)/1024, float64(u.anonKB)/1024, u.fds, u.threads)
			if socks := tcpSockets(pid); len(socks) > 0 {
				fmt.Fprintf(os.Stderr, "soak: at the quiet point of %v the network process holds TCP sockets: %s\n", el.Round(time.Second), strings.Join(socks, ", "))
			}
			continue
		}
		last = st
		busy.add(u, el, inFirst)
		fmt.Printf("| %v | %.1f | %.1f | %d | %d | %d | %d | %d | %d | %d | %d | %d | %.2f | %d | %d |\n", el.Round(time.Second),
			float64(u.rssKB)/1024, float64(u.anonKB)/1024, u.fds, u.threads, st.RoundTrips, st.Conns, st.Uploads, st.Downloads, st.SlowReads, st.Resets, st.HalfCloses,
			float64(st.Bytes)/1e9, st.BadSums, st.Errors)
	}
	werr := cmd.Wait()
	fmt.Println()
	ok := werr == nil && last.BadSums == 0 && last.Errors == 0
	fmt.Printf("summary: %v; %d round trips, %d new connections, %d uploads and %d downloads (%.1f GB, %d with a wrong sha256), %d slow reads, %d resets, %d half-closes, %d errors%s\n",
		time.Since(start).Round(time.Second), last.RoundTrips, last.Conns, last.Uploads, last.Downloads, float64(last.Bytes)/1e9,
		last.BadSums, last.SlowReads, last.Resets, last.HalfCloses, last.Errors, lastError(last))
	fmt.Printf("at the quiet points: peak private memory %.2f MiB in the first minute, %.2f MiB after it; descriptors: %d in the first minute, %d after it; OS threads: %d and %d\n",
		float64(quiet.first.anonKB)/1024, float64(quiet.after.anonKB)/1024, quiet.first.fds, quiet.after.fds, quiet.first.threads, quiet.after.threads)
	fmt.Printf("under traffic: peak private memory %.1f MiB in the first minute, %.1f MiB after it; peak RSS %.1f and %.1f MiB; descriptors: %d in the first minute, %d after it\n",
		float64(busy.first.anonKB)/1024, float64(busy.after.anonKB)/1024, float64(busy.first.rssKB)/1024, float64(busy.after.rssKB)/1024, busy.first.fds, busy.after.fds)
	// A leak raises the floor of each window (its lowest sample) as well
	// as its peak; a heap that only swings between collections moves the
	// peak alone.
	for _, ws := range []struct {
		name string
		w    [][]int64
	}{{"under traffic", busy.windows}, {"at the quiet points", quiet.windows}} {
		if len(ws.w) == 0 {
			continue
		}
		fmt.Printf("private memory %s, per %v window (lowest / median / peak, MiB):", ws.name, window)
		for _, w := range ws.w {
			if len(w) > 0 {
				fmt.Printf(" %.2f / %.2f / %.2f", float64(slices.Min(w))/1024, float64(median(w))/1024, float64(slices.Max(w))/1024)
			}
		}
		fmt.Println()
	}
	if quiet.high > 0 {
		fmt.Printf("at the quiet points: private memory last rose at %v, to %.2f MiB; %d quiet point(s) since, none higher\n",
			quiet.highAt.Round(time.Second), float64(quiet.high)/1024, quiet.samplesSince)
	}
	grew := quiet.after.anonKB > quiet.first.anonKB || quiet.after.fds > quiet.first.fds
	if grew {
		fmt.Println("result: FAIL: at the quiet points, private memory or descriptors grew beyond the first minute's peak")
		if more := quiet.after.threads - quiet.first.threads; more > 0 && quiet.after.anonKB > quiet.first.anonKB {
			// Go starts a thread when a goroutine has been in a system
			// call for a tick of its monitor and hands the goroutine's P
			// to another; it keeps the thread, and its stacks, for good.
			fmt.Printf("note: the network process started %d more OS thread(s) after the first minute; Go keeps each thread and its stacks for the rest of the run, so part of the growth is that high-water mark\n", more)
		}
		ok = false
	}
	if werr != nil {
		fmt.Printf("result: FAIL: gonetns: %v\n", werr)
	} else if ok {
		fmt.Println("result: PASS")
	} else if !grew {
		fmt.Println("result: FAIL: transfers went wrong")
	}
	if !ok {
		return 1
	}
	return 0
}

// levelWindow is the span over which the soak takes the level of the
// network process's memory.
const levelWindow = 5 * time.Minute

// series is one kind of sample (under traffic, or at the quiet points):
// the peaks in the first minute and after it, and private memory per
// window of the run.
type series struct {
	window, duration time.Duration
	first, after     usageSample
	windows          [][]int64
	// The last time private memory rose above every sample before it,
	// and how many samples have come since: a leak keeps rising to the
	// end, a process whose runtime fills in its bookkeeping for a while
	// rises in steps and then holds.
	high         int64
	highAt       time.Duration
	samplesSince int
}

func (s *series) add(u usageSample, el time.Duration, inFirst bool) {
	if u.anonKB > s.high {
		s.high, s.highAt, s.samplesSince = u.anonKB, el, 0
	} else {
		s.samplesSince++
	}
	if inFirst {
		s.first = s.first.peak(u)
	} else {
		s.after = s.after.peak(u)
	}
	if w := int(el / s.window); w < int(s.duration/s.window) { // what comes after the duration is teardown
		for len(s.windows) <= w {
			s.windows = append(s.windows, nil)
		}
		s.windows[w] = append(s.windows[w], u.anonKB)
	}
}

func median(v []int64) int64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

func lastError(s status) string {
	if s.LastError == "" {
		return ""
	}
	return " (last: " + s.LastError + ")"
}

// usageSample is what the soak reads of the network process. Growth is
// judged on private (anonymous) memory: RSS also counts the pages of the
// gonetns binary read in from its file, which rise when a code path runs
// for the first time late in the run and fall when the kernel
// reclaims them, whatever the process allocates. A leak grows the private
// part.
type usageSample struct{ rssKB, anonKB, fds, threads int64 }

func (u usageSample) peak(v usageSample) usageSample {
	return usageSample{max(u.rssKB, v.rssKB), max(u.anonKB, v.anonKB), max(u.fds, v.fds), max(u.threads, v.threads)}
}

// usage reads pid's resident and private memory (KiB) and open
// descriptors.
func usage(pid int) usageSample {
	var u usageSample
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		switch f[0] {
		case "VmRSS:":
			u.rssKB, _ = strconv.ParseInt(f[1], 10, 64)
		case "RssAnon:":
			u.anonKB, _ = strconv.ParseInt(f[1], 10, 64)
		case "Threads:":
			u.threads, _ = strconv.ParseInt(f[1], 10, 64)
		}
	}
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	u.fds = int64(len(ents))
	return u
}

// tcpSockets lists pid's TCP sockets other than listeners, as "local ->
// remote STATE" from /proc/PID/net/tcp: at a quiet point there should be
// none.
func tcpSockets(pid int) []string {
	inodes := map[string]bool{}
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	for _, e := range ents {
		l, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, e.Name()))
		if err == nil && strings.HasPrefix(l, "socket:[") {
			inodes[strings.TrimSuffix(strings.TrimPrefix(l, "socket:["), "]")] = true
		}
	}
	states := map[string]string{"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1", "05": "FIN_WAIT2",
		"06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING"}
	var out []string
	for _, file := range []string{"tcp", "tcp6"} {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/net/%s", pid, file))
		for _, line := range strings.Split(string(b), "\n")[1:] {
			f := strings.Fields(line)
			if len(f) < 10 || !inodes[f[9]] || f[3] == "0A" {
				continue
			}
			out = append(out, fmt.Sprintf("%s -> %s %s (queues %s)", f[1], f[2], states[f[3]], f[4]))
		}
	}
	return out
}

// stream is the bytes a source sends for seed: a PCG stream.
type stream struct{ r *rand.PCG }

func newStream(seed uint64) *stream { return &stream{rand.NewPCG(seed, seed^0x5eed)} }

func (s *stream) Read(b []byte) (int, error) {
	for i := 0; i < len(b); i += 8 {
		var w [8]byte
		binary.LittleEndian.PutUint64(w[:], s.r.Uint64())
		copy(b[i:], w[:])
	}
	return len(b), nil
}

func serve(name string, l net.Listener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			tc := c.(*net.TCPConn)
			switch name {
			case srvEcho:
				io.Copy(c, c)
			case srvSource:
				var hdr [16]byte
				if _, err := io.ReadFull(c, hdr[:]); err != nil {
					return
				}
				size, seed := int64(binary.BigEndian.Uint64(hdr[:])), binary.BigEndian.Uint64(hdr[8:])
				io.CopyN(c, newStream(seed), size)
				tc.CloseWrite()
				io.Copy(io.Discard, c)
			case srvSink:
				h := sha256.New()
				io.Copy(h, c)
				c.Write(h.Sum(nil))
			case srvReset:
				io.ReadFull(c, make([]byte, 1))
				tc.SetLinger(0)
			case srvHalfClose:
				n, _ := io.Copy(io.Discard, c)
				fmt.Fprintf(c, "%d", n)
			}
		}()
	}
}

func client() error {
	duration, err := time.ParseDuration(os.Getenv("SOAK_DURATION"))
	if err != nil {
		return err
	}
	sample, err := time.ParseDuration(os.Getenv("SOAK_SAMPLE"))
	if err != nil {
		return err
	}
	addr := func(name string) string {
		return net.JoinHostPort(os.Getenv("SOAK_TARGET"), os.Getenv("SOAK_PORT_"+strings.ToUpper(name)))
	}
	var st status
	var mu sync.Mutex
	fail := func(err error) {
		atomic.AddInt64(&st.Errors, 1)
		mu.Lock()
		st.LastError = err.Error()
		mu.Unlock()
	}
	end := time.Now().Add(duration)
	var wg sync.WaitGroup
	var gate sync.RWMutex // each worker's step holds it shared; a quiet point, exclusively
	worker := func(f func() error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(end) {
				gate.RLock()
				err := f()
				gate.RUnlock()
				if err != nil {
					fail(err)
					time.Sleep(100 * time.Millisecond)
				}
			}
		}()
	}
	dial := func(name string) (*net.TCPConn, error) {
		c, err := net.DialTimeout("tcp", addr(name), 10*time.Second)
		if err != nil {
			return nil, err
		}
		c.SetDeadline(time.Now().Add(2 * time.Minute))
		return c.(*net.TCPConn), nil
	}
	// Round trips: 1 byte each way, 10,000 on a connection.
	worker(func() error {
		c, err := dial(srvEcho)
		if err != nil {
			return err
		}
		defer c.Close()
		b := []byte{0}
		for i := 0; i < 10000 && time.Now().Before(end); i++ {
			b[0] = byte(i)
			if _, err := c.Write(b); err != nil {
				return err
			}
			if _, err := io.ReadFull(c, b); err != nil || b[0] != byte(i) {
				return fmt.Errorf("round trip %d: %v", i, err)
			}
			atomic.AddInt64(&st.RoundTrips, 1)
		}
		return nil
	})
	// New connections: connect, 1 byte echoed, close.
	worker(func() error {
		c, err := dial(srvEcho)
		if err != nil {
			return err
		}
		defer c.Close()
		b := []byte{'c'}
		if _, err := c.Write(b); err != nil {
			return err
		}
		if _, err := io.ReadFull(c, b); err != nil {
			return err
		}
		atomic.AddInt64(&st.Conns, 1)
		return nil
	})
	seeds := atomic.Uint64{}
	// Bulk, both ways, 64 MiB each, every byte checked.
	worker(func() error {
		c, err := dial(srvSink)
		if err != nil {
			return err
		}
		defer c.Close()
		h := sha256.New()
		const size = 64 << 20
		if _, err := io.CopyN(io.MultiWriter(c, h), newStream(seeds.Add(1)), size); err != nil {
			return err
		}
		c.CloseWrite()
		sum, err := io.ReadAll(c)
		if err != nil {
			return err
		}
		if !bytes.Equal(sum, h.Sum(nil)) {
			atomic.AddInt64(&st.BadSums, 1)
		}
		atomic.AddInt64(&st.Uploads, 1)
		atomic.AddInt64(&st.Bytes, size)
		return nil
	})
	download := func(slow bool) func() error {
		return func() error {
			c, err := dial(srvSource)
			if err != nil {
				return err
			}
			defer c.Close()
			size := int64(64 << 20)
			if slow {
				size = 4 << 20
			}
			seed := seeds.Add(1)
			var hdr [16]byte
			binary.BigEndian.PutUint64(hdr[:], uint64(size))
			binary.BigEndian.PutUint64(hdr[8:], seed)
			if _, err := c.Write(hdr[:]); err != nil {
				return err
			}
			h := sha256.New()
			var r io.Reader = c
			if slow {
				r = &slowReader{r: c}
			}
			n, err := io.Copy(h, r)
			if err != nil {
				return err
			}
			want := sha256.New()
			io.CopyN(want, newStream(seed), size)
			if n != size || !bytes.Equal(h.Sum(nil), want.Sum(nil)) {
				atomic.AddInt64(&st.BadSums, 1)
			}
			if slow {
				atomic.AddInt64(&st.SlowReads, 1)
			} else {
				atomic.AddInt64(&st.Downloads, 1)
			}
			atomic.AddInt64(&st.Bytes, n)
			return nil
		}
	}
	worker(download(false))
	worker(download(true))
	// Resets: the host resets after a byte; the sandbox must see it.
	worker(func() error {
		c, err := dial(srvReset)
		if err != nil {
			return err
		}
		defer c.Close()
		c.Write([]byte{'r'})
		_, err = io.ReadAll(c)
		if !errors.Is(err, syscall.ECONNRESET) {
			return fmt.Errorf("a reset from the host came as %v", err)
		}
		atomic.AddInt64(&st.Resets, 1)
		time.Sleep(10 * time.Millisecond)
		return nil
	})
	// Half-closes: send, close writing, read the count back.
	worker(func() error {
		c, err := dial(srvHalfClose)
		if err != nil {
			return err
		}
		defer c.Close()
		n := 1 + rand.IntN(200000)
		if _, err := c.Write(make([]byte, n)); err != nil {
			return err
		}
		c.CloseWrite()
		got, err := io.ReadAll(c)
		if err != nil || string(got) != strconv.Itoa(n) {
			return fmt.Errorf("half-close: %q, %v (sent %d)", got, err, n)
		}
		atomic.AddInt64(&st.HalfCloses, 1)
		return nil
	})
	report := func(quiet bool) {
		mu.Lock()
		s := status{Quiet: quiet,
			RoundTrips: atomic.LoadInt64(&st.RoundTrips), Conns: atomic.LoadInt64(&st.Conns), Uploads: atomic.LoadInt64(&st.Uploads),
			Downloads: atomic.LoadInt64(&st.Downloads), SlowReads: atomic.LoadInt64(&st.SlowReads), Resets: atomic.LoadInt64(&st.Resets),
			HalfCloses: atomic.LoadInt64(&st.HalfCloses), Bytes: atomic.LoadInt64(&st.Bytes), BadSums: atomic.LoadInt64(&st.BadSums),
			Errors: atomic.LoadInt64(&st.Errors), LastError: st.LastError,
		}
		mu.Unlock()
		b, _ := json.Marshal(s)
		fmt.Println(string(b))
	}
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	t := time.NewTicker(sample)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			report(false)
			if time.Now().Add(quietFor).Before(end) {
				gate.Lock()
				time.Sleep(quietFor)
				report(true)
				// The harness samples when it reads the report: the
				// traffic stays paused meanwhile.
				time.Sleep(quietHold)
				gate.Unlock()
			}
		case <-done:
			report(false)
			return nil
		}
	}
}

// slowReader reads 16 KiB at a time with 2 ms pauses: about 8 MB/s, a
// window that closes and opens all the time.
type slowReader struct{ r io.Reader }

func (s *slowReader) Read(b []byte) (int, error) {
	time.Sleep(2 * time.Millisecond)
	return s.r.Read(b[:min(len(b), 16<<10)])
}
