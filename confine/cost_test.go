package confine

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// BenchmarkSyscallCost measures what the confinement adds to a system
// call, in a child process that times the same calls before and after
// Apply: getppid (allowed by the filter without looking at arguments, the
// case of every socket call), ioctl SIOCINQ on a socket (the filter reads
// its arguments) and open+close of a file in an allowed directory
// (Landlock's check).
//
//	go test -run '^$' -bench SyscallCost ./confine
func BenchmarkSyscallCost(b *testing.B) {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), probeEnv+"=cost", "PROBE_WORK="+b.TempDir())
	out, err := cmd.CombinedOutput()
	if err != nil {
		b.Fatalf("%v\n%s", err, out)
	}
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		var name string
		var ns float64
		if _, err := fmt.Sscanf(l, "%s %f", &name, &ns); err == nil {
			b.ReportMetric(ns, name)
		}
	}
}

// costMain is the child of BenchmarkSyscallCost.
func costMain() int {
	work := os.Getenv("PROBE_WORK")
	file := work + "/f"
	os.WriteFile(file, nil, 0o600)
	fd, _ := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM, 0)
	const n = 300_000
	measure := func(f func()) float64 {
		start := time.Now()
		for range n {
			f()
		}
		return float64(time.Since(start).Nanoseconds()) / n
	}
	calls := []struct {
		name string
		f    func()
	}{
		{"getppid", func() { unix.Getppid() }},
		{"ioctl", func() { unix.IoctlGetInt(fd, unix.SIOCINQ) }},
		{"open", func() {
			if f, err := unix.Open(file, unix.O_RDONLY|unix.O_CLOEXEC, 0); err == nil {
				unix.Close(f)
			}
		}},
	}
	before := map[string]float64{}
	for _, c := range calls {
		before[c.name] = min(measure(c.f), measure(c.f))
	}
	r := Apply(Files{ReadWriteDirs: []string{work}})
	if !r.Landlock.Applied || !r.Seccomp.Applied {
		fmt.Println("not applied:", r.Landlock, r.Seccomp)
		return 1
	}
	for _, c := range calls {
		after := min(measure(c.f), measure(c.f))
		fmt.Printf("ns/%s-unconfined %.1f\n", c.name, before[c.name])
		fmt.Printf("ns/%s-confined %.1f\n", c.name, after)
	}
	return 0
}
