package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gonetns/gonetns/internal/e2etest"
)

// kitRunner runs one implementation of rootlesskit (and its rootlessctl)
// as the unprivileged test user: the behaviour tests below run the same
// scenario against gonetns and against RootlessKit v3.0.1, and both must
// come out as RootlessKit does.
type kitRunner struct {
	name        string
	kit         e2etest.Runner // rootlesskit
	rootlessctl string         // its rootlessctl, for use inside
}

func kitRunners(t *testing.T) []kitRunner {
	t.Helper()
	u := e2etest.Unprivileged(t)
	ref := e2etest.ReferenceKit(t, e2etest.RootlessKitV3Dir)
	rk := u
	rk.Bin = ref.Prog["rootlesskit"]
	return []kitRunner{
		{name: "gonetns", kit: u.As(t, "rootlesskit"), rootlessctl: u.As(t, "rootlessctl").Bin},
		{name: "rootlesskit-v3.0.1", kit: rk, rootlessctl: ref.Prog["rootlessctl"]},
	}
}

// A child address in brackets may be IPv4, as RootlessKit's parser allows:
// -p [::]:P:[127.0.0.1]:80/tcp6 forwards IPv6 clients to an IPv4 server
// inside, and /tcp does the same for both families.
func TestRootlessKitBracketedIPv4ChildAddress(t *testing.T) {
	e2etest.RequireTun(t)
	for _, k := range kitRunners(t) {
		t.Run(k.name, func(t *testing.T) {
			p6, pBoth := freePort(t, "tcp"), freePort(t, "tcp")
			ctx, cancel := context.WithTimeout(context.Background(), netTimeout)
			defer cancel()
			state := filepath.Join(k.kit.TempDir(t), "state")
			cmd := k.kit.Command(ctx, "--state-dir="+state, "--net=slirp4netns", "--port-driver=builtin",
				"-p", fmt.Sprintf("[::]:%d:[127.0.0.1]:8000/tcp6", p6),
				"-p", fmt.Sprintf("[::]:%d:[127.0.0.1]:8000/tcp", pBoth),
				"sh", "-c", "exec "+e2etest.HelperCmd(t, "http-serve", "127.0.0.1:8000"))
			var errOut strings.Builder
			cmd.Stderr = &errOut
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			defer func() { cmd.Process.Kill(); cmd.Wait() }()
			for _, url := range []string{
				fmt.Sprintf("http://[::1]:%d/", p6),
				fmt.Sprintf("http://[::1]:%d/", pBoth),
				fmt.Sprintf("http://127.0.0.1:%d/", pBoth),
			} {
				if body := httpGetRetry(t, url, 20*time.Second); body != "hello from inside\n" {
					t.Errorf("GET %s: %q\nstderr:\n%s", url, body, errOut.String())
				}
			}
			// tcp6 listens on IPv6 only.
			if c, err := net.DialTimeout("tcp4", fmt.Sprintf("127.0.0.1:%d", p6), 2*time.Second); err == nil {
				c.Close()
				t.Errorf("127.0.0.1:%d answered; a tcp6 port must listen on IPv6 only", p6)
			}
		})
	}
}

// killMarked kills the processes whose command line is exactly marker (a
// "sleep N" with an N of this run's), which RootlessKit leaves running
// when its parent is killed.
func killMarked(marker string) {
	for _, pid := range procsMarked(marker) {
		syscall.Kill(pid, syscall.SIGKILL)
	}
}

// When the command dies of a signal, rootlesskit exits with status 255
// and says which signal ("signal: user defined signal 1", Go's text), with
// and without a PID namespace and whatever --reaper says. Here the signal
// goes to $STATE/child_pid, which relays it to the command.
func TestRootlessKitSignalExit(t *testing.T) {
	for _, k := range kitRunners(t) {
		for _, flags := range [][]string{{"--pidns=false"}, {"--pidns=true", "--reaper=auto"}, {"--pidns=true", "--reaper=true"}, {"--pidns=true", "--reaper=false"}} {
			t.Run(k.name+"/"+strings.Join(flags, ","), func(t *testing.T) {
				marker := fmt.Sprintf("sleep %d", 710000+time.Now().UnixNano()%100000)
				defer killMarked(marker)
				state := filepath.Join(k.kit.TempDir(t), "state")
				ctx, cancel := context.WithTimeout(context.Background(), netTimeout)
				defer cancel()
				args := append([]string{"--state-dir=" + state}, flags...)
				cmd := k.kit.Command(ctx, append(args, strings.Fields(marker)...)...)
				var errOut e2etest.Log
				cmd.Stderr = &errOut
				if err := cmd.Start(); err != nil {
					t.Fatal(err)
				}
				waited := make(chan error, 1)
				go func() { waited <- cmd.Wait() }()
				exited := false
				defer func() {
					if !exited {
						cmd.Process.Kill()
						<-waited
					}
				}()
				// child_pid exists once the command runs.
				var childPID int
				for deadline := time.Now().Add(20 * time.Second); ; {
					b, err := os.ReadFile(filepath.Join(state, "child_pid"))
					if childPID, _ = strconv.Atoi(strings.TrimSpace(string(b))); err == nil && childPID > 0 && len(procsMarked(marker)) > 0 {
						break
					}
					if time.Now().After(deadline) {
						t.Fatalf("the command never ran:\n%s", errOut.String())
					}
					time.Sleep(20 * time.Millisecond)
				}
				// A PID namespace's init ignores a signal it has no
				// handler for yet: RootlessKit's child may not have
				// installed its relay when the command already runs
				// (once in a few dozen runs it then waited forever).
				// Sent again until the command is gone (ctx kills it
				// at the deadline).
				var err error
				for !exited {
					syscall.Kill(childPID, syscall.SIGUSR1)
					select {
					case err = <-waited:
						exited = true
					case <-time.After(time.Second):
					}
				}
				code := -1
				if ee, ok := err.(*exec.ExitError); ok {
					code = ee.ExitCode()
				} else if err == nil {
					code = 0
				}
				if code != 255 || !strings.Contains(errOut.String(), "signal: user defined signal 1") {
					t.Errorf("the command killed by SIGUSR1: exit %d (%v), want 255 and \"signal: user defined signal 1\" on stderr:\n%s", code, err, errOut.String())
				}
			})
		}
	}
}

// A command that cannot be started (not found, or not executable) is
// rootlesskit's own failure: status 1 and the reason on stderr (gonetns
// gave a shell's 127 and 126).
func TestRootlessKitCommandNotStarted(t *testing.T) {
	for _, k := range kitRunners(t) {
		dir := k.kit.TempDir(t)
		notExec := filepath.Join(dir, "not-executable")
		if err := os.WriteFile(notExec, []byte("#!/bin/sh\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		for _, command := range []string{"/nonexistent-command", notExec} {
			t.Run(k.name+"/"+filepath.Base(command), func(t *testing.T) {
				res := k.kit.Run(t, netTimeout, "--state-dir="+filepath.Join(dir, "state"), command)
				if res.Code != 1 || !strings.Contains(res.Stderr, command) {
					t.Errorf("rootlesskit %s: want status 1 and the command named on stderr:\n%s", command, res)
				}
			})
		}
	}
}

// procsMarked are the pids of processes whose command line is marker.
func procsMarked(marker string) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, _ := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if strings.ReplaceAll(strings.TrimRight(string(b), "\x00"), "\x00", " ") == marker {
			pids = append(pids, pid)
		}
	}
	return pids
}

// RootlessKit#220: a rootlesskit killed with SIGKILL leaves its state
// directory; the next rootlesskit with the same --state-dir takes it over
// (the lock died with the killed one), and its API answers inside.
func TestRootlessKitStateDirTakeover(t *testing.T) {
	e2etest.RequireTun(t)
	for _, k := range kitRunners(t) {
		t.Run(k.name, func(t *testing.T) {
			marker := fmt.Sprintf("sleep %d", 720000+time.Now().UnixNano()%100000)
			defer killMarked(marker)
			state := filepath.Join(k.kit.TempDir(t), "state")
			flags := []string{"--state-dir=" + state, "--port-driver=builtin", "--net=slirp4netns"}
			ctx, cancel := context.WithTimeout(context.Background(), netTimeout)
			defer cancel()
			first := k.kit.Command(ctx, append(flags, strings.Fields(marker)...)...)
			var errOut e2etest.Log
			first.Stderr = &errOut
			if err := first.Start(); err != nil {
				t.Fatal(err)
			}
			defer func() { first.Process.Kill(); first.Wait() }()
			// RootlessKit v3 may start its API after the command.
			for deadline := time.Now().Add(20 * time.Second); ; {
				_, err := os.Stat(filepath.Join(state, "api.sock"))
				if err == nil && len(procsMarked(marker)) > 0 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("the first rootlesskit's command never ran with its API socket (%v):\n%s", err, errOut.String())
				}
				time.Sleep(20 * time.Millisecond)
			}
			first.Process.Kill()
			first.Wait()
			res := k.kit.Run(t, netTimeout, append(flags, k.rootlessctl, "list-ports")...)
			if res.Code != 0 || !strings.HasPrefix(res.Stdout, "ID    PROTO    PARENTIP    PARENTPORT    CHILDIP    CHILDPORT") {
				t.Errorf("the second rootlesskit on the killed one's state directory:\n%s", res)
			}
		})
	}
}
