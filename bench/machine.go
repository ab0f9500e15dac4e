package main

import (
	"bufio"
	"os"
	"os/exec"
	"os/user"
	"runtime"
	"strconv"
	"strings"
	"time"
)

// versions of the tools, as they report them.
type versions struct {
	gonetns      string
	rootlesskit  string
	rootlesskit3 string
	slirp4netns  string
	passt        string
	iperf3       string
	kernel       string
}

// machine are the facts about this machine a reader of the results needs.
type machine struct {
	Host       string            `json:"host"`
	Kernel     string            `json:"kernel"`
	OS         string            `json:"os"`
	CPU        string            `json:"cpu"`
	NProc      int               `json:"nproc"`
	MemTotalMB int64             `json:"mem_total_mb"`
	User       string            `json:"user"`
	UID        int               `json:"uid"`
	LoadStart  string            `json:"loadavg_start"`
	LoadEnd    string            `json:"loadavg_end,omitempty"`
	GoVersion  string            `json:"go_version"`
	Tools      map[string]string `json:"tools"`
}

func gatherMachine(t tools) (machine, versions) {
	v := versions{
		gonetns:      firstLine(output(t.gonetns, "--version")),
		rootlesskit:  strings.TrimPrefix(firstLine(output(t.rootlesskit, "--version")), "rootlesskit version "),
		rootlesskit3: strings.TrimPrefix(firstLine(output(t.rootlesskit3, "--version")), "rootlesskit version "),
		slirp4netns:  strings.TrimPrefix(firstLine(output(t.slirp4netns, "--version")), "slirp4netns version "),
		passt:        debVersion("passt"),
		iperf3:       firstLine(output(t.iperf3, "--version")),
		kernel:       readTrim("/proc/sys/kernel/osrelease"),
	}
	if v.passt == "" && t.pasta != "" {
		v.passt = firstLine(output(t.pasta, "--version"))
	}
	m := machine{
		Host:       shortHost(),
		Kernel:     v.kernel,
		OS:         osRelease(),
		CPU:        cpuModel(),
		NProc:      runtime.NumCPU(),
		MemTotalMB: memTotalMB(),
		UID:        os.Getuid(),
		LoadStart:  readTrim("/proc/loadavg"),
		GoVersion:  runtime.Version(),
		Tools: map[string]string{
			"gonetns":      v.gonetns,
			"rootlesskit":  v.rootlesskit,
			"rootlesskit3": v.rootlesskit3,
			"slirp4netns":  v.slirp4netns,
			"passt":        v.passt,
			"iperf3":       v.iperf3,
		},
	}
	if u, err := user.Current(); err == nil {
		m.User = u.Username
	}
	for k, val := range m.Tools {
		if val == "" {
			m.Tools[k] = "not installed"
		}
	}
	return m, v
}

// output runs a version command briefly; "" when it cannot.
func output(path string, args ...string) string {
	if path == "" {
		return ""
	}
	cmd := exec.Command(path, args...)
	cmd.WaitDelay = time.Second
	done := make(chan struct{})
	var out []byte
	go func() {
		out, _ = cmd.CombinedOutput()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		if cmd.Process != nil {
			cmd.Process.Kill()
		}
		<-done
	}
	return lastLines(string(out), 20)
}

// debVersion is the installed version of a Debian package (pasta reports
// "unknown version" itself).
func debVersion(pkg string) string {
	if _, err := exec.LookPath("dpkg-query"); err != nil {
		return ""
	}
	out, err := exec.Command("dpkg-query", "-W", "-f=${Version}", pkg).Output()
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(out))
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, " | ")
	return strings.TrimSpace(line)
}

func readTrim(path string) string {
	b, _ := os.ReadFile(path)
	return strings.TrimSpace(string(b))
}

// shortHost is the host name up to its first dot.
func shortHost() string {
	h, err := os.Hostname()
	if err != nil || h == "" {
		return "unknown"
	}
	h, _, _ = strings.Cut(h, ".")
	return h
}

func cpuModel() string {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return ""
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if k, v, ok := strings.Cut(s.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

func memTotalMB() int64 {
	b, _ := os.ReadFile("/proc/meminfo")
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "MemTotal:"); ok {
			n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return n / 1024
		}
	}
	return 0
}

func osRelease() string {
	b, _ := os.ReadFile("/etc/os-release")
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "PRETTY_NAME="); ok {
			return strings.Trim(v, `"`)
		}
	}
	return runtime.GOOS
}
