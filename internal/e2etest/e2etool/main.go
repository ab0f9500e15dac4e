// Command e2etool is the static helper program of the end-to-end tests
// (built by e2etest.Tool with CGO_ENABLED=0, so it also runs inside a
// container image that holds nothing but busybox):
//
//	e2etool supervise [--uid=N --gid=N --grace=D] -- CMD [ARGS...]
//	e2etool tcp-peer ADDR     serve TCP: each connection gets "peer=IP:PORT\n"
//	e2etool udp-echo ADDR     echo UDP datagrams as "peer=IP:PORT MSG"
//	e2etool udp-send ADDR MSG send one datagram, print the reply
//	e2etool tcp-read ADDR     connect, print what the server sends until it closes
//	e2etool send ADDR BYTES   connect, send BYTES zeros, print the rate
//	e2etool recv ADDR         connect, read to the end, print the rate
//	e2etool source ADDR BYTES listen: each connection gets BYTES zeros
//	e2etool sink ADDR         listen: each connection is read to the end
//
// send and recv print "BYTES bytes in SECONDS s: GBPS Gbit/s" (the
// Podman benchmark, scripts/bench-podman.sh, reads it).
//
// supervise runs CMD as the child subreaper of everything it starts
// (PR_SET_CHILD_SUBREAPER), so processes that daemonize (dockerd's
// containerd, its shims, the containers' processes) stay its descendants.
// On SIGTERM it sends SIGTERM to CMD and waits up to --grace for it; on
// EOF of its stdin (the test process closed it, or died) it does not
// wait. Either way, and when CMD exits on its own, it then kills every
// descendant that is left, reaps them all and exits with CMD's status.
// It names on stderr the leftovers it had to kill after CMD exited.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: e2etool supervise|tcp-peer|udp-echo|udp-send ...")
		os.Exit(2)
	}
	var err error
	switch mode, args := os.Args[1], os.Args[2:]; mode {
	case "supervise":
		os.Exit(supervise(args))
	case "tcp-peer":
		err = tcpPeer(args)
	case "udp-echo":
		err = udpEcho(args)
	case "udp-send":
		err = udpSend(args)
	case "tcp-read":
		err = tcpRead(args)
	case "send", "recv":
		err = transfer(mode, args)
	case "source", "sink":
		err = serveBulk(mode, args)
	default:
		err = fmt.Errorf("unknown mode %q", mode)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2etool:", err)
		os.Exit(1)
	}
}

func tcpPeer(args []string) error {
	if len(args) != 1 {
		return errors.New("usage: tcp-peer ADDR")
	}
	l, err := net.Listen("tcp", args[0])
	if err != nil {
		return err
	}
	fmt.Println("listening")
	for {
		c, err := l.Accept()
		if err != nil {
			return err
		}
		fmt.Fprintf(c, "peer=%s\n", c.RemoteAddr())
		c.Close()
	}
}

func tcpRead(args []string) error {
	if len(args) != 1 {
		return errors.New("usage: tcp-read ADDR")
	}
	c, err := net.DialTimeout("tcp", args[0], 10*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err = io.Copy(os.Stdout, c)
	return err
}

func udpEcho(args []string) error {
	if len(args) != 1 {
		return errors.New("usage: udp-echo ADDR")
	}
	c, err := net.ListenPacket("udp", args[0])
	if err != nil {
		return err
	}
	fmt.Println("listening")
	b := make([]byte, 65536)
	for {
		n, from, err := c.ReadFrom(b)
		if err != nil {
			return err
		}
		c.WriteTo(fmt.Appendf(nil, "peer=%s %s", from, b[:n]), from)
	}
}

func udpSend(args []string) error {
	if len(args) != 2 {
		return errors.New("usage: udp-send ADDR MSG")
	}
	c, err := net.Dial("udp", args[0])
	if err != nil {
		return err
	}
	defer c.Close()
	b := make([]byte, 65536)
	// A few tries: the first datagram may arrive before the path is set up.
	for range 5 {
		if _, err := c.Write([]byte(args[1])); err != nil {
			return err
		}
		c.SetReadDeadline(time.Now().Add(time.Second))
		n, err := c.Read(b)
		if err == nil {
			fmt.Printf("%s\n", b[:n])
			return nil
		}
	}
	return fmt.Errorf("no reply from %s after 5 tries", args[0])
}

func supervise(args []string) int {
	fs := flag.NewFlagSet("supervise", flag.ContinueOnError)
	uid := fs.Int("uid", -1, "run CMD as this uid")
	gid := fs.Int("gid", -1, "run CMD as this gid")
	grace := fs.Duration("grace", 30*time.Second, "how long SIGTERM waits for CMD")
	if err := fs.Parse(args); err != nil || fs.NArg() == 0 {
		fmt.Fprintln(os.Stderr, "usage: e2etool supervise [--uid=N --gid=N --grace=D] -- CMD [ARGS...]")
		return 2
	}
	logf := func(format string, a ...any) {
		fmt.Fprintf(os.Stderr, "e2etool supervise: "+format+"\n", a...)
	}
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		logf("PR_SET_CHILD_SUBREAPER: %v", err)
		return 125
	}
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)

	attr := &syscall.SysProcAttr{}
	if *uid >= 0 {
		attr.Credential = &syscall.Credential{Uid: uint32(*uid), Gid: uint32(*gid), Groups: []uint32{}}
	}
	path := fs.Arg(0)
	if !strings.Contains(path, "/") {
		// Resolve in CMD's own PATH, as its shell would.
		for _, dir := range strings.Split(os.Getenv("PATH"), ":") {
			if unix.Access(dir+"/"+path, unix.X_OK) == nil {
				path = dir + "/" + path
				break
			}
		}
	}
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		logf("%v", err)
		return 125
	}
	p, err := os.StartProcess(path, fs.Args(), &os.ProcAttr{
		Files: []*os.File{devnull, os.Stdout, os.Stderr},
		Sys:   attr,
	})
	devnull.Close()
	if err != nil {
		logf("start %s: %v", fs.Arg(0), err)
		return 127
	}
	main := p.Pid
	p.Release() // reaped below with wait4(-1), with the orphans

	stdinEOF := make(chan struct{})
	go func() {
		io.Copy(io.Discard, os.Stdin)
		close(stdinEOF)
	}()

	status := -1
	reap := func() {
		for {
			var ws unix.WaitStatus
			pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
			if pid <= 0 || err != nil {
				return
			}
			if pid == main {
				status = exitCode(ws)
			}
		}
	}
	var deadline <-chan time.Time
loop:
	for status < 0 {
		select {
		case s := <-sigs:
			if s == syscall.SIGCHLD {
				reap()
				continue
			}
			unix.Kill(main, unix.SIGTERM)
			if deadline == nil {
				deadline = time.After(*grace)
			}
		case <-stdinEOF:
			stdinEOF = nil
			logf("stdin closed: killing everything")
			break loop
		case <-deadline:
			logf("%s did not exit within %v of SIGTERM: killing everything", fs.Arg(0), *grace)
			break loop
		case <-time.After(time.Second):
			reap() // a SIGCHLD can be coalesced
		}
	}
	if left := killTree(os.Getpid(), main, reap); len(left) > 0 && status >= 0 {
		logf("killed what %s left running: %s", fs.Arg(0), strings.Join(left, ", "))
	}
	if status < 0 {
		status = 137
	}
	return status
}

func exitCode(ws unix.WaitStatus) int {
	if ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return ws.ExitStatus()
}

// killTree kills every descendant of root (SIGTERM, then SIGKILL after 3
// s), reaping as it goes, until none is left or 20 s have passed. It
// returns the descendants it found first, as "PID(COMM)", the main child
// excluded.
func killTree(root, main int, reap func()) []string {
	var first []string
	start := time.Now()
	sig := unix.SIGTERM
	for i := 0; ; i++ {
		reap()
		procs := descendants(root)
		if len(procs) == 0 {
			return first
		}
		if i == 0 {
			for _, p := range procs {
				if p.pid != main {
					first = append(first, fmt.Sprintf("%d(%s)", p.pid, p.comm))
				}
			}
		}
		if time.Since(start) > 3*time.Second {
			sig = unix.SIGKILL
		}
		if time.Since(start) > 20*time.Second {
			fmt.Fprintf(os.Stderr, "e2etool supervise: %d processes survive SIGKILL\n", len(procs))
			return first
		}
		for _, p := range procs {
			unix.Kill(p.pid, sig)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

type proc struct {
	pid  int
	comm string
}

// descendants lists the live (not zombie) processes under root, from
// /proc: with root the subreaper, orphans are its children, so the tree
// holds everything started from it.
func descendants(root int) []proc {
	ents, _ := os.ReadDir("/proc")
	children := map[int][]proc{}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...; comm may hold spaces and parentheses.
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		comm := s[strings.IndexByte(s, '(')+1 : i]
		f := strings.Fields(s[i+1:])
		if len(f) < 2 {
			continue
		}
		ppid, _ := strconv.Atoi(f[1])
		if f[0] == "Z" {
			comm += " <zombie>"
		}
		children[ppid] = append(children[ppid], proc{pid, comm})
	}
	var out []proc
	queue := []int{root}
	for len(queue) > 0 {
		for _, c := range children[queue[0]] {
			out = append(out, c)
			queue = append(queue, c.pid)
		}
		queue = queue[1:]
	}
	return out
}

// bulkBuf is the size of the reads and writes of the bulk modes.
const bulkBuf = 256 << 10

// transfer sends or receives one bulk stream and prints its rate.
func transfer(mode string, args []string) error {
	if (mode == "send" && len(args) != 2) || (mode == "recv" && len(args) != 1) {
		return errors.New("usage: send ADDR BYTES | recv ADDR")
	}
	c, err := net.DialTimeout("tcp", args[0], 10*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	start := time.Now()
	var n int64
	if mode == "send" {
		size, err := strconv.ParseInt(args[1], 10, 64)
		if err != nil {
			return err
		}
		if n, err = io.CopyBuffer(c, io.LimitReader(zeros{}, size), make([]byte, bulkBuf)); err != nil {
			return err
		}
		c.(*net.TCPConn).CloseWrite()
		io.Copy(io.Discard, c) // until the peer has read it all and closed
	} else if n, err = io.CopyBuffer(io.Discard, c, make([]byte, bulkBuf)); err != nil {
		return err
	}
	d := time.Since(start).Seconds()
	fmt.Printf("%d bytes in %.3f s: %.3f Gbit/s\n", n, d, float64(n)*8/d/1e9)
	return nil
}

// serveBulk serves source or sink connections until killed.
func serveBulk(mode string, args []string) error {
	if (mode == "source" && len(args) != 2) || (mode == "sink" && len(args) != 1) {
		return errors.New("usage: source ADDR BYTES | sink ADDR")
	}
	var size int64
	if mode == "source" {
		var err error
		if size, err = strconv.ParseInt(args[1], 10, 64); err != nil {
			return err
		}
	}
	ln, err := net.Listen("tcp", args[0])
	if err != nil {
		return err
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go func() {
			defer c.Close()
			if mode == "source" {
				io.CopyBuffer(c, io.LimitReader(zeros{}, size), make([]byte, bulkBuf))
				return
			}
			io.CopyBuffer(io.Discard, c, make([]byte, bulkBuf))
		}()
	}
}

type zeros struct{}

func (zeros) Read(b []byte) (int, error) {
	clear(b)
	return len(b), nil
}
