package confine

import "golang.org/x/sys/unix"

const (
	auditArch = unix.AUDIT_ARCH_X86_64
	// x32Bit marks the x32 ABI's system call numbers.
	x32Bit = 0x40000000
)

// archRefused are calls of refused's kind that only x86-64 has.
var archRefused = []uintptr{unix.SYS_USELIB, unix.SYS__SYSCTL, unix.SYS_MODIFY_LDT, unix.SYS_IOPL, unix.SYS_IOPERM, unix.SYS_NFSSERVCTL}
