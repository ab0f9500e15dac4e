package main

import (
	"os"
	"os/signal"
	"syscall"
	"unsafe"
)

// ignoreStraySignals keeps the parent, which is the sandbox's network,
// alive through signals whose default action would end it and that only
// a process of the sandbox would send (it runs as the same user and,
// without --pidns, can see gonetns's pid). SIGKILL and SIGSTOP cannot be
// ignored: --pidns hides gonetns from the sandbox for those. SIGPROF stays
// with the profiler; SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1 and SIGUSR2
// are relayed to the command; SIGPIPE is caught.
func ignoreStraySignals() {
	stray := []os.Signal{syscall.SIGALRM, syscall.SIGVTALRM, syscall.SIGIO, syscall.SIGPWR,
		syscall.SIGSTKFLT, syscall.SIGXCPU, syscall.SIGXFSZ, syscall.SIGTRAP, syscall.SIGSYS}
	for s := 35; s <= 64; s++ { // real-time signals end a process by default
		stray = append(stray, syscall.Signal(s))
	}
	signal.Ignore(stray...)
	// Go will neither ignore nor relay 32 and 34 (kept for C libraries:
	// glibc's thread cancellation, musl's SIGSYNCCALL), and one sent from
	// outside kills it; a static gonetns has no C library that uses them,
	// so they are ignored with the system call itself. 33 stays Go's: it
	// is the runtime's own signal for system calls on every thread
	// (syscall.AllThreadsSyscall, Setuid and the like), and Go's handler
	// already survives one sent from outside.
	for _, s := range []uintptr{32, 34} {
		act := kernelSigaction{handler: 1} // SIG_IGN
		syscall.RawSyscall6(syscall.SYS_RT_SIGACTION, s, uintptr(unsafe.Pointer(&act)), 0, 8, 0, 0)
	}
}

// kernelSigaction is the kernel's struct sigaction for rt_sigaction(2) on
// the architectures Go runs on with Linux (handler, flags, restorer,
// mask).
type kernelSigaction struct {
	handler  uintptr
	flags    uint64
	restorer uintptr
	mask     uint64
}
