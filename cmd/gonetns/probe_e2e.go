//go:build e2ehooks

package main

import (
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/sandbox"
)

// confineProbeEnv asks a binary built with the e2ehooks tag to try, once
// the sandbox runs (and the network process is confined), what a
// compromised network process would: read FILE, run /bin/true and ptrace
// PID, given as FILE:PID. Each outcome goes to stderr as a line
// "confine-probe: WHAT => ok" or "... => ERROR".
const confineProbeEnv = "GONETNS_E2E_CONFINE_PROBE"

func afterStart(_ *sandbox.Sandbox, _ *slog.Logger) {
	v := os.Getenv(confineProbeEnv)
	if v == "" {
		return
	}
	file, pidStr, _ := strings.Cut(v, ":")
	pid, _ := strconv.Atoi(pidStr)
	report := func(what string, err error) {
		res := "ok"
		if err != nil {
			res = err.Error()
		}
		fmt.Fprintf(os.Stderr, "confine-probe: %s => %s\n", what, res)
	}
	_, err := os.ReadFile(file)
	report("read "+file, err)
	report("exec /bin/true", exec.Command("/bin/true").Run())
	done := make(chan error)
	go func() {
		// Never unlocked: the tracer is this thread, and the trace ends
		// when the goroutine does and takes the thread with it.
		runtime.LockOSThread()
		done <- unix.PtraceSeize(pid)
	}()
	report(fmt.Sprintf("ptrace %d", pid), <-done)
}
