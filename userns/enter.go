package userns

import (
	"fmt"
	"os"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Entering namespaces someone else made, and running this program there.
//
// A multi-threaded process cannot setns(2) into a user namespace (EINVAL),
// and every Go process is multi-threaded before main runs, re-executed or
// not. What can: a process just forked from one thread, before it execs,
// which is how os/exec sets up its children. Go's os/exec has no setns
// step, so enterExec makes its own: it forks, and the child, which only
// makes raw system calls until execve, enters the user namespace (when
// one is given), then the network namespace, and executes this program
// again, which then runs in both with the capabilities of the user
// namespace's root. Everything the child needs is prepared before the
// fork.

// enterRequest is what the forked child does before it executes path.
// The fields are read after fork, so none may be changed once forking
// starts.
type enterRequest struct {
	userFD, netFD int // namespaces to enter, in that order; -1 to skip
	// keep are descriptors to hand to the new program as 3, 4, ... (as
	// the gonetns child gets its control socket and extra files); every
	// other descriptor above 2 is closed on exec. They must be above
	// 2+len(keep), so that moving one into place never overwrites another.
	keep []int32
	path *byte
	argv []*byte // nil-terminated
	envp []*byte // nil-terminated
	// errPipe is the write end of a close-on-exec pipe: it closes
	// silently when the exec succeeds, and carries an enterFailure when a
	// step fails.
	errPipe int
	failure enterFailure
}

// enterFailure is what the child reports when a step fails: the step, its
// errno, and the errno of entering the user namespace, which the child
// goes on without (as slirp4netns does) but which explains a failure to
// enter the network namespace.
type enterFailure struct {
	Step      uint32
	Errno     uint32
	UserErrno uint32
}

// Steps of the child, for its failure report.
const (
	enterStepNetNS uint32 = iota + 1
	enterStepFiles
	enterStepExec
)

// closeRangeCloexec is CLOSE_RANGE_CLOEXEC: mark, do not close.
const closeRangeCloexec = unix.CLOSE_RANGE_CLOEXEC

// enterExec forks a child that enters the namespaces of r and executes
// r.path. It returns the child's pid once the exec has succeeded, or the
// step that failed. The calling goroutine must be locked to its thread
// and stay so until the child is reaped: the parent-death signal the
// child sets fires when that thread ends.
func enterExec(r *enterRequest) (int, error) {
	p := make([]int, 2)
	if err := unix.Pipe2(p, unix.O_CLOEXEC); err != nil {
		return 0, fmt.Errorf("pipe: %w", err)
	}
	r.errPipe = p[1]
	pid, errno := forkEnter(r)
	unix.Close(p[1])
	defer unix.Close(p[0])
	if errno != 0 {
		return 0, fmt.Errorf("fork: %w", errno)
	}
	var f enterFailure
	buf := unsafe.Slice((*byte)(unsafe.Pointer(&f)), unsafe.Sizeof(f))
	n, err := readFull(p[0], buf)
	if n == 0 && err == nil {
		return int(pid), nil // closed by the exec
	}
	// The child failed (and exits): reap it.
	var ws unix.WaitStatus
	for {
		if _, werr := unix.Wait4(int(pid), &ws, 0, nil); werr != unix.EINTR {
			break
		}
	}
	if err != nil || n != len(buf) {
		return 0, fmt.Errorf("the namespace helper failed before it could say why (%d bytes, %v)", n, err)
	}
	return 0, f.err()
}

func (f enterFailure) err() error {
	switch f.Step {
	case enterStepNetNS:
		err := &os.SyscallError{Syscall: "setns(CLONE_NEWNET)", Err: syscall.Errno(f.Errno)}
		if f.UserErrno != 0 {
			return fmt.Errorf("%w (entering the user namespace first failed too: %v)", err, syscall.Errno(f.UserErrno))
		}
		return err
	case enterStepFiles:
		return &os.SyscallError{Syscall: "dup3", Err: syscall.Errno(f.Errno)}
	case enterStepExec:
		return &os.SyscallError{Syscall: "execve /proc/self/exe", Err: syscall.Errno(f.Errno)}
	}
	return fmt.Errorf("the namespace helper failed at step %d: %v", f.Step, syscall.Errno(f.Errno))
}

// readFull reads until buf is full or end of file, retrying EINTR.
func readFull(fd int, buf []byte) (int, error) {
	n := 0
	for n < len(buf) {
		m, err := unix.Read(fd, buf[n:])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return n, err
		}
		if m == 0 {
			break
		}
		n += m
	}
	return n, nil
}

// forkEnter forks; the child runs the steps of r and never returns. Like
// syscall.forkAndExecInChild1, after the fork the child may not grow its
// stack, allocate or call anything but raw system calls: it has one
// thread and a copy of a runtime that believes it has more. Signals stay
// blocked in the child from before the fork through the exec, so that no
// Go signal handler runs there; the new program starts with them blocked
// and Go's runtime unblocks those it needs. The caller's goroutine is
// locked to its thread, whose signal mask this changes for a moment.
//
//go:noinline
//go:norace
//go:nocheckptr
func forkEnter(r *enterRequest) (pid uintptr, errno syscall.Errno) {
	var (
		all, old  uint64
		e1, uerr  syscall.Errno
		i         int
		fd        uintptr
		failedRaw uintptr
	)
	all = ^uint64(0)
	syscall.RawSyscall6(syscall.SYS_RT_SIGPROCMASK, unix.SIG_SETMASK, uintptr(unsafe.Pointer(&all)), uintptr(unsafe.Pointer(&old)), 8, 0, 0)
	pid, _, errno = syscall.RawSyscall6(syscall.SYS_CLONE, uintptr(syscall.SIGCHLD), 0, 0, 0, 0, 0)
	if errno != 0 || pid != 0 {
		// The parent.
		syscall.RawSyscall6(syscall.SYS_RT_SIGPROCMASK, unix.SIG_SETMASK, uintptr(unsafe.Pointer(&old)), 0, 8, 0, 0)
		return pid, errno
	}

	// The child.
	if r.userFD >= 0 {
		_, _, uerr = syscall.RawSyscall(unix.SYS_SETNS, uintptr(r.userFD), unix.CLONE_NEWUSER, 0)
	}
	if r.netFD >= 0 {
		_, _, e1 = syscall.RawSyscall(unix.SYS_SETNS, uintptr(r.netFD), unix.CLONE_NEWNET, 0)
		if e1 != 0 {
			r.failure = enterFailure{Step: enterStepNetNS, Errno: uint32(e1), UserErrno: uint32(uerr)}
			goto fail
		}
	}
	syscall.RawSyscall(unix.SYS_PRCTL, unix.PR_SET_PDEATHSIG, uintptr(syscall.SIGKILL), 0)
	for i = 0; i < len(r.keep); i++ {
		fd = uintptr(r.keep[i])
		// dup3 without O_CLOEXEC: the copy survives the exec.
		_, _, e1 = syscall.RawSyscall(syscall.SYS_DUP3, fd, uintptr(3+i), 0)
		if e1 != 0 {
			r.failure = enterFailure{Step: enterStepFiles, Errno: uint32(e1)}
			goto fail
		}
	}
	// Whatever else this process inherited (the caller's descriptors left
	// open for it, the originals of keep) stays out of the new program.
	syscall.RawSyscall(unix.SYS_CLOSE_RANGE, uintptr(3+len(r.keep)), ^uintptr(0), closeRangeCloexec)
	_, _, e1 = syscall.RawSyscall(syscall.SYS_EXECVE, uintptr(unsafe.Pointer(r.path)), uintptr(unsafe.Pointer(&r.argv[0])), uintptr(unsafe.Pointer(&r.envp[0])))
	r.failure = enterFailure{Step: enterStepExec, Errno: uint32(e1)}
fail:
	failedRaw = uintptr(unsafe.Pointer(&r.failure))
	syscall.RawSyscall(syscall.SYS_WRITE, uintptr(r.errPipe), failedRaw, unsafe.Sizeof(r.failure))
	for {
		syscall.RawSyscall(syscall.SYS_EXIT_GROUP, 253, 0, 0)
	}
}
