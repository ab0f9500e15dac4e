package confine

import (
	"encoding/binary"
	"fmt"
	"testing"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// runFilter runs the filter in x/net/bpf's interpreter on a seccomp_data.
// The interpreter loads words big-endian, the kernel in host order: the
// data is laid out big-endian here, so both read the same values.
func runFilter(t *testing.T, arch, nr uint32, args ...uint64) uint32 {
	t.Helper()
	prog, err := filter()
	if err != nil {
		t.Fatal(err)
	}
	insts := make([]bpf.Instruction, len(prog))
	for i, f := range prog {
		insts[i] = bpf.RawInstruction{Op: f.Code, Jt: f.Jt, Jf: f.Jf, K: f.K}.Disassemble()
	}
	vm, err := bpf.NewVM(insts)
	if err != nil {
		t.Fatalf("the filter is not valid BPF: %v", err)
	}
	data := make([]byte, 64)
	binary.BigEndian.PutUint32(data[offNr:], nr)
	binary.BigEndian.PutUint32(data[offArch:], arch)
	for i, a := range args {
		// The filter reads the low 32 bits of an argument at 16+8i.
		binary.BigEndian.PutUint32(data[offArg0Low+8*i:], uint32(a))
	}
	v, err := vm.Run(data)
	if err != nil {
		t.Fatal(err)
	}
	return uint32(v)
}

func TestFilter(t *testing.T) {
	if auditArch == 0 {
		t.Fatal("no filter for this architecture")
	}
	const allow, enosys = unix.SECCOMP_RET_ALLOW, unix.SECCOMP_RET_ERRNO | uint32(unix.ENOSYS)
	threadFlags := uint64(unix.CLONE_VM | unix.CLONE_FS | unix.CLONE_FILES | unix.CLONE_SIGHAND | unix.CLONE_SYSVSEM | unix.CLONE_THREAD)
	cases := []struct {
		name string
		arch uint32
		nr   uintptr
		args []uint64
		want uint32
	}{
		{"getpid", auditArch, unix.SYS_GETPID, nil, allow},
		{"socket", auditArch, unix.SYS_SOCKET, nil, allow},
		{"recvmsg", auditArch, unix.SYS_RECVMSG, nil, allow},
		{"setsockopt", auditArch, unix.SYS_SETSOCKOPT, nil, allow},
		{"epoll_pwait", auditArch, unix.SYS_EPOLL_PWAIT, nil, allow},
		{"splice", auditArch, unix.SYS_SPLICE, nil, allow},
		{"kill", auditArch, unix.SYS_KILL, nil, allow},
		{"wait4", auditArch, unix.SYS_WAIT4, nil, allow},
		{"pidfd_send_signal", auditArch, unix.SYS_PIDFD_SEND_SIGNAL, nil, allow},
		{"execve", auditArch, unix.SYS_EXECVE, nil, eperm},
		{"clone of a thread", auditArch, unix.SYS_CLONE, []uint64{threadFlags}, allow},
		{"clone into a new user namespace", auditArch, unix.SYS_CLONE, []uint64{unix.CLONE_NEWUSER}, eperm},
		{"clone into a new network namespace", auditArch, unix.SYS_CLONE, []uint64{unix.CLONE_NEWNET | 17}, eperm},
		{"clone3", auditArch, unix.SYS_CLONE3, nil, enosys},
		{"ioctl SIOCINQ", auditArch, unix.SYS_IOCTL, []uint64{0, unix.SIOCINQ}, allow},
		{"ioctl TIOCSTI", auditArch, unix.SYS_IOCTL, []uint64{0, unix.TIOCSTI}, eperm},
		{"ioctl TIOCSTI, high bits set", auditArch, unix.SYS_IOCTL, []uint64{0, 1<<32 | unix.TIOCSTI}, eperm},
		{"another ABI's call", unix.AUDIT_ARCH_I386, 20, nil, eperm},
	}
	if x32Bit != 0 {
		cases = append(cases, struct {
			name string
			arch uint32
			nr   uintptr
			args []uint64
			want uint32
		}{"x32 getpid", auditArch, x32Bit | unix.SYS_GETPID, nil, eperm})
	}
	for _, nr := range append(append([]uintptr(nil), refused...), archRefused...) {
		cases = append(cases, struct {
			name string
			arch uint32
			nr   uintptr
			args []uint64
			want uint32
		}{fmt.Sprintf("refused %d", nr), auditArch, nr, nil, eperm})
	}
	for _, c := range cases {
		if got := runFilter(t, c.arch, uint32(c.nr), c.args...); got != c.want {
			t.Errorf("%s: %#x, want %#x", c.name, got, c.want)
		}
	}
}
