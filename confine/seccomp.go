package confine

import (
	"errors"
	"fmt"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// refused are the system calls a network process never makes once it is
// set up and that would take a compromised one beyond its sockets: running
// programs, reading or writing other processes, mounts and namespaces,
// kernel interfaces that are large attack surfaces (bpf, io_uring,
// userfaultfd, perf), keyrings, modules, kexec and the calls that need a
// privilege anyway. A deny-list, not an allow-list: every socket, epoll,
// timer and memory call the network and Go's runtime make stays allowed,
// whatever the network code comes to use. Calls of this list that an
// architecture lacks are in archRefused.
var refused = []uintptr{
	unix.SYS_EXECVE, unix.SYS_EXECVEAT,
	unix.SYS_PTRACE, unix.SYS_PROCESS_VM_READV, unix.SYS_PROCESS_VM_WRITEV,
	unix.SYS_PROCESS_MADVISE, unix.SYS_PIDFD_GETFD, unix.SYS_KCMP,
	unix.SYS_MOUNT, unix.SYS_UMOUNT2, unix.SYS_PIVOT_ROOT, unix.SYS_CHROOT,
	unix.SYS_MOVE_MOUNT, unix.SYS_OPEN_TREE, unix.SYS_OPEN_TREE_ATTR, unix.SYS_FSOPEN,
	unix.SYS_FSCONFIG, unix.SYS_FSMOUNT, unix.SYS_FSPICK, unix.SYS_MOUNT_SETATTR,
	unix.SYS_UNSHARE, unix.SYS_SETNS,
	unix.SYS_BPF, unix.SYS_PERF_EVENT_OPEN, unix.SYS_USERFAULTFD,
	unix.SYS_IO_URING_SETUP, unix.SYS_IO_URING_ENTER, unix.SYS_IO_URING_REGISTER,
	unix.SYS_KEYCTL, unix.SYS_ADD_KEY, unix.SYS_REQUEST_KEY,
	unix.SYS_INIT_MODULE, unix.SYS_FINIT_MODULE, unix.SYS_DELETE_MODULE,
	unix.SYS_KEXEC_LOAD, unix.SYS_KEXEC_FILE_LOAD, unix.SYS_REBOOT,
	unix.SYS_PERSONALITY,
	unix.SYS_SWAPON, unix.SYS_SWAPOFF, unix.SYS_ACCT, unix.SYS_QUOTACTL, unix.SYS_QUOTACTL_FD,
	unix.SYS_SYSLOG, unix.SYS_VHANGUP, unix.SYS_OPEN_BY_HANDLE_AT, unix.SYS_FANOTIFY_INIT,
	unix.SYS_SETTIMEOFDAY, unix.SYS_CLOCK_SETTIME, unix.SYS_CLOCK_ADJTIME, unix.SYS_ADJTIMEX,
	unix.SYS_SETHOSTNAME, unix.SYS_SETDOMAINNAME,
	unix.SYS_MIGRATE_PAGES, unix.SYS_MOVE_PAGES, unix.SYS_LOOKUP_DCOOKIE,
}

// namespaceFlags are the clone(2) flags that create namespaces: clone with
// any of them is refused like unshare. (CLONE_NEWTIME only exists for
// clone3 and unshare; its bit means something else to clone.)
const namespaceFlags = unix.CLONE_NEWNS | unix.CLONE_NEWCGROUP | unix.CLONE_NEWUTS | unix.CLONE_NEWIPC |
	unix.CLONE_NEWUSER | unix.CLONE_NEWPID | unix.CLONE_NEWNET

// refusedIoctls are terminal ioctls that act on the terminal the process
// shares with the user's shell: TIOCSTI types into it, TIOCLINUX can read
// a virtual console's screen.
var refusedIoctls = []uint32{unix.TIOCSTI, unix.TIOCLINUX}

// Where struct seccomp_data keeps what the filter reads.
const (
	offNr   = 0
	offArch = 4
	// offArgLow is the low 32 bits of argument i (little-endian).
	offArg0Low = 16
	offArg1Low = 24
)

// Seccomp installs the filter on every thread of the process (and so on
// every thread started later): the calls in refused, clone with namespace
// flags, the terminal ioctls and any system call of another ABI (32-bit
// calls through int 0x80, x32) fail with EPERM; clone3, whose flags a
// filter cannot read, fails with ENOSYS, so that callers use clone.
// Everything else is allowed. Setting no_new_privs, which the kernel
// requires, is part of it.
func Seccomp() Result {
	if auditArch == 0 {
		return notAvailable("no filter for %s", runtime.GOARCH)
	}
	prog, err := filter()
	if err != nil {
		return failed(err)
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	// no_new_privs on this thread; TSYNC carries it to the others.
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return failed(fmt.Errorf("prctl(PR_SET_NO_NEW_PRIVS): %w", err))
	}
	fprog := unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}
	r, _, errno := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, unix.SECCOMP_FILTER_FLAG_TSYNC, uintptr(unsafe.Pointer(&fprog)))
	runtime.KeepAlive(prog)
	switch {
	case errno == unix.ENOSYS || errno == unix.EINVAL && r == 0 && !seccompFilterSupported():
		return notAvailable("the kernel has no seccomp filters (CONFIG_SECCOMP_FILTER)")
	case errno != 0:
		return failed(fmt.Errorf("seccomp(SECCOMP_SET_MODE_FILTER, TSYNC): %w", errno))
	case r != 0:
		// TSYNC names a thread it could not synchronize (one with a
		// filter of its own, which gonetns never installs).
		return failed(fmt.Errorf("seccomp: thread %d could not take the filter", r))
	}
	return Result{Applied: true, Detail: fmt.Sprintf("filter applied (%d system calls refused)", len(refused)+len(archRefused)+1)}
}

// seccompFilterSupported asks the kernel whether it knows
// SECCOMP_RET_ERRNO, which a kernel with filters does.
func seccompFilterSupported() bool {
	action := uint32(unix.SECCOMP_RET_ERRNO)
	_, _, errno := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_GET_ACTION_AVAIL, 0, uintptr(unsafe.Pointer(&action)))
	return errno == 0
}

// filter assembles the BPF program.
func filter() ([]unix.SockFilter, error) {
	var a asm
	// Another ABI of this machine (i386 through int 0x80 on x86-64, arm32
	// compat on arm64) has other system call numbers: refused entirely,
	// or it would get round the list.
	a.load(offArch)
	a.jumpIf(unix.BPF_JEQ, auditArch, "native", "")
	a.ret(eperm)
	a.label("native")
	a.load(offNr)
	if x32Bit != 0 {
		a.jumpIf(unix.BPF_JGE, x32Bit, "deny", "")
	}
	for _, nr := range append(append([]uintptr(nil), refused...), archRefused...) {
		a.jumpIf(unix.BPF_JEQ, uint32(nr), "deny", "")
	}
	a.jumpIf(unix.BPF_JEQ, unix.SYS_CLONE3, "enosys", "")
	a.jumpIf(unix.BPF_JEQ, unix.SYS_CLONE, "", "notclone")
	a.load(offArg0Low)
	a.jumpIf(unix.BPF_JSET, namespaceFlags, "deny", "allow")
	a.label("notclone")
	a.jumpIf(unix.BPF_JEQ, unix.SYS_IOCTL, "", "allow")
	a.load(offArg1Low)
	for _, req := range refusedIoctls {
		a.jumpIf(unix.BPF_JEQ, req, "deny", "")
	}
	a.label("allow")
	a.ret(unix.SECCOMP_RET_ALLOW)
	a.label("deny")
	a.ret(eperm)
	a.label("enosys")
	a.ret(unix.SECCOMP_RET_ERRNO | uint32(unix.ENOSYS))
	return a.assemble()
}

const eperm = unix.SECCOMP_RET_ERRNO | uint32(unix.EPERM)

// asm is a small BPF assembler with named jump targets.
type asm struct {
	prog   []unix.SockFilter
	jumps  []jump
	labels map[string]int
}

type jump struct {
	at     int
	jt, jf string
}

func (a *asm) load(off uint32) {
	a.prog = append(a.prog, unix.SockFilter{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: off})
}

func (a *asm) ret(v uint32) {
	a.prog = append(a.prog, unix.SockFilter{Code: unix.BPF_RET | unix.BPF_K, K: v})
}

// jumpIf compares the accumulator with k; "" as a target is the next
// instruction.
func (a *asm) jumpIf(op uint16, k uint32, jt, jf string) {
	a.jumps = append(a.jumps, jump{at: len(a.prog), jt: jt, jf: jf})
	a.prog = append(a.prog, unix.SockFilter{Code: unix.BPF_JMP | op | unix.BPF_K, K: k})
}

func (a *asm) label(name string) {
	if a.labels == nil {
		a.labels = map[string]int{}
	}
	a.labels[name] = len(a.prog)
}

func (a *asm) assemble() ([]unix.SockFilter, error) {
	offset := func(from int, to string) (uint8, error) {
		if to == "" {
			return 0, nil
		}
		at, ok := a.labels[to]
		if !ok {
			return 0, fmt.Errorf("seccomp filter: no label %q", to)
		}
		d := at - from - 1
		if d < 0 || d > 255 {
			return 0, fmt.Errorf("seccomp filter: jump to %q out of range (%d)", to, d)
		}
		return uint8(d), nil
	}
	var errs []error
	for _, j := range a.jumps {
		jt, err1 := offset(j.at, j.jt)
		jf, err2 := offset(j.at, j.jf)
		errs = append(errs, err1, err2)
		a.prog[j.at].Jt, a.prog[j.at].Jf = jt, jf
	}
	return a.prog, errors.Join(errs...)
}
