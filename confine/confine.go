// Package confine restricts the calling process, for good, to what a
// network process still needs once it is set up: the files it names
// (Landlock) and every system call but the few it never makes again (a
// seccomp filter that refuses exec, ptrace, mounts, namespaces, bpf,
// keyrings, module loading, kexec and the like with EPERM).
//
// gonetns's parent calls it after set-up: it parses every frame the
// sandbox sends and runs with all of the user's rights, so a bug in that
// path must not let the sandbox read the user's files, run programs or
// trace the user's other processes. slirp4netns (--enable-sandbox,
// --enable-seccomp) and pasta confine their network process the same way.
//
// Both layers are best effort: on a kernel without Landlock or seccomp the
// process runs as before, and the Result says so. Both apply to every
// thread of the process (Landlock's all-threads enforcement, seccomp's
// TSYNC) and to threads started later, and cannot be undone.
package confine

import (
	"fmt"
	"time"
)

// Result says what one layer did.
type Result struct {
	// Applied is true when the layer restricts the process now.
	Applied bool
	// Detail is for a person: "ABI 7 applied", "not available: the
	// kernel has no Landlock", ...
	Detail string
	// Err is set when the layer was available but could not be applied;
	// Detail then says so too.
	Err error
}

func (r Result) String() string { return r.Detail }

// Report is what Apply did, layer by layer.
type Report struct {
	Landlock, Seccomp Result
}

// Apply confines the process with Landlock (file access limited to files)
// and then the seccomp filter. It never fails: each layer that cannot be
// applied is reported as such, and the process goes on without it.
func Apply(files Files) Report {
	return Report{Landlock: Landlock(files), Seccomp: Seccomp()}
}

// prepare loads what Go's standard library reads from the file system
// lazily, on first use, and that a confined process could no longer read.
func prepare() {
	// time.Local loads /etc/localtime at its first use (log timestamps):
	// confined, it would silently become UTC.
	time.Now().Zone()
}

func notAvailable(format string, a ...any) Result {
	return Result{Detail: "not available: " + fmt.Sprintf(format, a...)}
}

func failed(err error) Result {
	return Result{Detail: "failed: " + err.Error(), Err: err}
}
