package e2etest

import (
	"bufio"
	"io"
	"os/exec"
	"strings"
	"sync"
	"testing"
)

// Session is a gonetns run that a test talks to while it runs: lines to
// the sandbox's stdin, its stdout read line by line, its stderr kept.
type Session struct {
	Cmd    *exec.Cmd
	Stdin  io.WriteCloser
	Stdout *bufio.Reader
	Stderr *Log
}

// Interact starts cmd (made by Runner.Command) with its stdin and stdout
// piped to the test and its stderr kept in a Log. What ends it (closing
// Stdin, a line, Kill) and the Wait are the caller's.
func Interact(t testing.TB, cmd *exec.Cmd) *Session {
	t.Helper()
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	s := &Session{Cmd: cmd, Stdin: stdin, Stdout: bufio.NewReader(stdout), Stderr: &Log{}}
	cmd.Stderr = s.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	return s
}

// Lines delivers the rest of stdout line by line, trimmed, on a channel
// closed at its end. Call it once, and read Stdout no more.
func (s *Session) Lines() <-chan string {
	lines := make(chan string, 100)
	go func() {
		defer close(lines)
		for {
			l, err := s.Stdout.ReadString('\n')
			if err != nil {
				return
			}
			lines <- strings.TrimSpace(l)
		}
	}()
	return lines
}

// Log is an io.Writer that is safe to read while a process writes to it;
// past 1 MiB it drops what comes (the start of a flood of warnings says
// enough).
type Log struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *Log) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.b.Len() > 1<<20 {
		return len(p), nil
	}
	return l.b.Write(p)
}

func (l *Log) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
