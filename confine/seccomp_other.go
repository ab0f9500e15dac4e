//go:build !amd64 && !arm64

package confine

// No filter is built for this architecture: Seccomp reports it.
const (
	auditArch = 0
	x32Bit    = 0
)

var archRefused []uintptr
