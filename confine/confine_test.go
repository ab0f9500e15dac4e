package confine

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The probes run in a child process (this test binary again), which
// confines itself: a confined test process could not go on testing.
const probeEnv = "CONFINE_TEST_PROBE"

func TestMain(m *testing.M) {
	switch mode := os.Getenv(probeEnv); mode {
	case "":
	case "cost":
		os.Exit(costMain())
	default:
		os.Exit(probeMain(mode == "confined"))
	}
	os.Exit(m.Run())
}

// probe is one thing the process tries after confinement, with what it
// gets confined and unconfined.
type probe struct {
	name                 string
	confined, unconfined string
}

// probes and their outcome: "ok", or the errno's name.
var probes = []probe{
	{"read a file outside the rules", "EACCES", "ok"},
	{"create and remove a file in a read-write dir", "ok", "ok"},
	{"remove the read-write dir (RemoveDirsIn its parent)", "ok", "ok"},
	{"read /proc/self/status", "ok", "ok"},
	{"read /proc/self/task/TID/children", "ok", "ok"},
	{"exec /bin/true", "EACCES", "ok"},        // Landlock refuses it first: no rule lets anything be executed
	{"execve (null path)", "EPERM", "EFAULT"}, // the filter, before the kernel looks at the path
	{"ptrace a sibling", "EPERM", "ok"},
	{"unshare a user namespace", "EPERM", "EINVAL"}, // EINVAL: the process has threads
	{"clone with CLONE_NEWUSER", "EPERM", "EINVAL"}, // with CLONE_FS, which the kernel refuses before creating anything
	{"clone3", "ENOSYS", "EINVAL"},                  // with a size of 0, the same
	{"ioctl TIOCSTI", "EPERM", "ENOTTY"},            // on a socket
	{"connect to an abstract unix socket outside", "EPERM", "ok"},
	{"TCP listen, connect, accept on loopback", "ok", "ok"},
	{"thread started before: read a file outside", "EACCES", "ok"},
	{"thread started before: exec /bin/true", "EACCES", "ok"},
	{"thread started before: execve (null path)", "EPERM", "EFAULT"},
}

func TestConfinement(t *testing.T) {
	for _, confined := range []bool{true, false} {
		t.Run(fmt.Sprintf("confined=%v", confined), func(t *testing.T) {
			got := runProbes(t, confined)
			for _, p := range probes {
				want := p.unconfined
				if confined {
					want = p.confined
				}
				if got[p.name] != want {
					t.Errorf("%s: %q, want %q", p.name, got[p.name], want)
				}
			}
			if confined && !strings.Contains(got["landlock"], "applied") {
				t.Errorf("landlock: %q", got["landlock"])
			}
			if confined && !strings.HasPrefix(got["seccomp"], "filter applied") {
				t.Errorf("seccomp: %q", got["seccomp"])
			}
		})
	}
}

// runProbes runs the probe child and returns its lines as name -> outcome.
func runProbes(t *testing.T, confined bool) map[string]string {
	t.Helper()
	work := t.TempDir()
	outside := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(outside, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	sibling := exec.Command("sleep", "60")
	if err := sibling.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { sibling.Process.Kill(); sibling.Wait() }()
	abstract, err := net.Listen("unix", "@gonetns-confine-test-"+fmt.Sprint(os.Getpid()))
	if err != nil {
		t.Fatal(err)
	}
	defer abstract.Close()
	go func() {
		for {
			c, err := abstract.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	mode := "unconfined"
	if confined {
		mode = "confined"
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), probeEnv+"="+mode, "PROBE_WORK="+work, "PROBE_OUTSIDE="+outside,
		fmt.Sprintf("PROBE_SIBLING=%d", sibling.Process.Pid), "PROBE_ABSTRACT="+abstract.Addr().String())
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("probe process: %v\n%s", err, out)
	}
	got := map[string]string{}
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		if name, res, ok := strings.Cut(sc.Text(), " => "); ok {
			got[name] = res
		}
	}
	t.Logf("probe output:\n%s", out)
	return got
}

// probeMain is the child: it confines itself (or not) and tries each probe.
func probeMain(confine bool) int {
	work, outside := os.Getenv("PROBE_WORK"), os.Getenv("PROBE_OUTSIDE")
	rw := filepath.Join(work, "rw")
	if err := os.Mkdir(rw, 0o700); err != nil {
		fmt.Println("setup:", err)
		return 1
	}
	// A thread that exists before confinement, to show that it is
	// confined too.
	type job struct {
		f    func() error
		done chan error
	}
	jobs := make(chan job)
	go func() {
		runtime.LockOSThread()
		for j := range jobs {
			j.done <- j.f()
		}
	}()
	onOldThread := func(f func() error) error {
		j := job{f, make(chan error)}
		jobs <- j
		return <-j.done
	}
	onOldThread(func() error { return nil })

	if confine {
		r := Apply(Files{ReadWriteDirs: []string{rw}, RemoveDirsIn: []string{work}})
		fmt.Println("landlock =>", r.Landlock)
		fmt.Println("seccomp =>", r.Seccomp)
	}
	readOutside := func() error {
		_, err := os.ReadFile(outside)
		return err
	}
	execTrue := func() error { return exec.Command("/bin/true").Run() }
	execveNull := func() error { return rawErr(unix.RawSyscall(unix.SYS_EXECVE, 0, 0, 0)) }
	results := map[string]error{
		"read a file outside the rules": readOutside(),
		"create and remove a file in a read-write dir": func() error {
			p := filepath.Join(rw, "f")
			if err := os.WriteFile(p, []byte("x"), 0o600); err != nil {
				return err
			}
			return os.Remove(p)
		}(),
		"remove the read-write dir (RemoveDirsIn its parent)": os.Remove(rw),
		"read /proc/self/status": func() error {
			_, err := os.ReadFile("/proc/self/status")
			return err
		}(),
		"read /proc/self/task/TID/children": func() error {
			_, err := os.ReadFile(fmt.Sprintf("/proc/self/task/%d/children", os.Getpid()))
			return err
		}(),
		"exec /bin/true":     execTrue(),
		"execve (null path)": execveNull(),
		"ptrace a sibling": func() error {
			var pid int
			fmt.Sscan(os.Getenv("PROBE_SIBLING"), &pid)
			runtime.LockOSThread() // never unlocked: the thread goes, and the trace with it
			return unix.PtraceSeize(pid)
		}(),
		"unshare a user namespace": func() error {
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			return unix.Unshare(unix.CLONE_NEWUSER)
		}(),
		"clone with CLONE_NEWUSER": rawErr(unix.RawSyscall(unix.SYS_CLONE, unix.CLONE_NEWUSER|unix.CLONE_FS, 0, 0)),
		"clone3":                   rawErr(unix.RawSyscall(unix.SYS_CLONE3, 0, 0, 0)),
		"ioctl TIOCSTI": func() error {
			fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM, 0)
			if err != nil {
				return err
			}
			defer unix.Close(fd)
			c := byte('x')
			return rawErr(unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.TIOCSTI, uintptr(unsafe.Pointer(&c))))
		}(),
		"connect to an abstract unix socket outside": func() error {
			c, err := net.Dial("unix", os.Getenv("PROBE_ABSTRACT"))
			if err == nil {
				c.Close()
			}
			return err
		}(),
		"TCP listen, connect, accept on loopback": func() error {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				return err
			}
			defer ln.Close()
			c, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				return err
			}
			defer c.Close()
			s, err := ln.Accept()
			if err == nil {
				s.Close()
			}
			return err
		}(),
		"thread started before: read a file outside": onOldThread(readOutside),
		"thread started before: exec /bin/true":      onOldThread(execTrue),
		"thread started before: execve (null path)":  onOldThread(execveNull),
	}
	for name, err := range results {
		fmt.Printf("%s => %s\n", name, errnoName(err))
	}
	return 0
}

func rawErr(_, _ uintptr, e syscall.Errno) error {
	if e != 0 {
		return e
	}
	return nil
}

func errnoName(err error) string {
	if err == nil {
		return "ok"
	}
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return unix.ErrnoName(errno)
	}
	return err.Error()
}
