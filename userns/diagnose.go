package userns

import (
	"errors"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// procSys and procSelf are where Diagnose reads sysctls and this
// process's confinement; tests point them elsewhere.
var (
	procSys  = "/proc/sys"
	procSelf = "/proc/self"
)

// Diagnose explains, in words a person can act on, why namespaces could not
// be created or set up. It returns "" when nothing known is wrong; the text
// starts with a newline so it can be appended to an error message.
func Diagnose(err error) string {
	var hints []string
	if v, ok := readSysctl("kernel/unprivileged_userns_clone"); ok && v == "0" && os.Getuid() != 0 {
		hints = append(hints, "unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone=0); "+
			"enable them: sudo sysctl -w kernel.unprivileged_userns_clone=1 (and persist it in /etc/sysctl.d/)")
	}
	if v, ok := readSysctl("user/max_user_namespaces"); ok && v == "0" {
		hints = append(hints, "user namespaces are disabled (user.max_user_namespaces=0); "+
			"enable them: sudo sysctl -w user.max_user_namespaces=28633")
	} else if errors.Is(err, unix.ENOSPC) || errors.Is(err, unix.EUSERS) {
		hints = append(hints, "the limit of user namespaces is reached (user.max_user_namespaces="+v+"); raise it or end other sandboxes")
	}
	if v, ok := readSysctl("kernel/apparmor_restrict_unprivileged_userns"); ok && v == "1" && os.Getuid() != 0 {
		hints = append(hints, "AppArmor restricts unprivileged user namespaces (kernel.apparmor_restrict_unprivileged_userns=1, "+
			"Ubuntu 23.10 and later): namespaces are created without capabilities. Allow gonetns with an AppArmor profile "+
			"(/etc/apparmor.d/gonetns: `abi <abi/4.0>, include <tunables/global> profile gonetns /path/to/gonetns flags=(unconfined) { userns, }`, "+
			"then sudo apparmor_parser -r /etc/apparmor.d/gonetns), or sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0")
	}
	if permissionError(err) {
		hints = append(hints, confinementHints()...)
		if len(hints) == 0 {
			hints = append(hints, "the kernel refused the operation; if gonetns runs inside a container, that container needs "+
				"user namespaces allowed (e.g. a seccomp profile permitting clone/unshare with CLONE_NEWUSER)")
		}
	}
	return joinHints(hints)
}

func permissionError(err error) bool {
	if err == nil {
		return false
	}
	return errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) ||
		strings.Contains(err.Error(), "operation not permitted") || strings.Contains(err.Error(), "permission denied")
}

// confinementHints name what confines this process the way container
// engines confine a container's: a seccomp filter, an AppArmor profile.
func confinementHints() []string {
	var hints []string
	if status, err := os.ReadFile(filepath.Join(procSelf, "status")); err == nil {
		for _, line := range strings.Split(string(status), "\n") {
			if v, ok := strings.CutPrefix(line, "Seccomp:"); ok && strings.TrimSpace(v) == "2" {
				hints = append(hints, "a seccomp filter confines gonetns (Seccomp: 2 in /proc/self/status), as container engines' "+
					"default profiles do: Docker's and Podman's refuse clone and unshare with namespace flags, setns and mount to a "+
					"container without CAP_SYS_ADMIN. Start the container with --security-opt seccomp=unconfined (docs/packet-link.md)")
			}
		}
	}
	for _, f := range []string{"attr/apparmor/current", "attr/current"} {
		b, err := os.ReadFile(filepath.Join(procSelf, f))
		if err != nil {
			continue
		}
		if p := strings.TrimSpace(strings.TrimRight(string(b), "\x00")); p != "" && p != "unconfined" {
			hints = append(hints, "the AppArmor profile "+p+" confines gonetns (Docker's docker-default refuses mount): "+
				"start the container with --security-opt apparmor=unconfined (docs/packet-link.md)")
		}
		break
	}
	return hints
}

func joinHints(h []string) string {
	if len(h) == 0 {
		return ""
	}
	return "\n  hint: " + strings.Join(h, "\n  hint: ")
}

func readSysctl(name string) (string, bool) {
	b, err := os.ReadFile(filepath.Join(procSys, name))
	if err != nil {
		return "", false
	}
	return strings.TrimSpace(string(b)), true
}
