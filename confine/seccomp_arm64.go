package confine

import "golang.org/x/sys/unix"

const (
	auditArch = unix.AUDIT_ARCH_AARCH64
	x32Bit    = 0
)

var archRefused = []uintptr{unix.SYS_NFSSERVCTL}
