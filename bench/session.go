package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"
)

// harnessError is a fault of the harness itself (as opposed to a system
// that fails to run): our client's output does not parse, a result file
// cannot be written. Any makes the harness exit non-zero.
type harnessError struct{ err error }

func (e *harnessError) Error() string { return e.err.Error() }
func (e *harnessError) Unwrap() error { return e.err }

// session is our client running inside one system's namespace.
type session struct {
	sys    *system
	p      *proc
	stdin  io.WriteCloser
	events chan clientEvent
	fault  chan error    // a line of ours that does not parse
	noise  *tailBuffer   // other lines on stdout (a wrapper's chatter)
	closed chan struct{} // stdout reached EOF
}

// startSession starts the client with spec inside sys, for mtu (and, for
// a port system, publishing hostPort).
func (b *bench) startSession(ctx context.Context, sys *system, mtu, hostPort int, spec clientSpec) (*session, error) {
	specJSON, err := json.Marshal(spec)
	if err != nil {
		return nil, &harnessError{err}
	}
	// Real pipes, handed to the process as they are: no copying goroutine
	// for exec.Cmd.Wait to wait for, and EOF on stdout once the whole
	// tree has let go of it.
	stdinR, stdinW, err := os.Pipe()
	if err != nil {
		return nil, &harnessError{err}
	}
	stdoutR, stdoutW, err := os.Pipe()
	if err != nil {
		stdinR.Close()
		stdinW.Close()
		return nil, &harnessError{err}
	}
	p, err := startProc(ctx, procOptions{
		argv:   sys.argv(mtu, hostPort, []string{b.client, string(specJSON)}),
		env:    []string{clientEnv + "=1"},
		dir:    b.workDir,
		stdin:  stdinR,
		stdout: stdoutW,
	})
	stdinR.Close()
	stdoutW.Close()
	if err != nil {
		stdinW.Close()
		stdoutR.Close()
		return nil, err
	}
	s := &session{
		sys: sys, p: p, stdin: stdinW,
		events: make(chan clientEvent, 4), fault: make(chan error, 1),
		noise: newTailBuffer(4 << 10), closed: make(chan struct{}),
	}
	go s.read(stdoutR)
	return s, nil
}

func (s *session) read(r *os.File) {
	defer close(s.closed)
	defer r.Close()
	defer io.Copy(io.Discard, r)
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, eventMarker) {
			s.noise.Write([]byte(line + "\n"))
			continue
		}
		var ev clientEvent
		if err := json.Unmarshal([]byte(line), &ev); err != nil || ev.Event == "" {
			s.fault <- &harnessError{fmt.Errorf("%s: the client's output does not parse (%v): %.200q", s.sys.name, err, line)}
			return
		}
		s.events <- ev
	}
}

// next waits for the client's next event, for at most d; it must be
// want unless want is "" (any event). An "error" event, the process ending first or the time running out are failures
// of the system (the process is then killed); a line of ours that does
// not parse is a harnessError.
func (s *session) next(ctx context.Context, want string, d time.Duration) (clientEvent, error) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case ev := <-s.events:
		if ev.Event == "error" {
			return ev, errors.New(ev.Error)
		}
		if want != "" && ev.Event != want {
			return ev, &harnessError{fmt.Errorf("%s: the client sent %q, want %q", s.sys.name, ev.Event, want)}
		}
		return ev, nil
	case err := <-s.fault:
		s.p.kill()
		return clientEvent{}, err
	case <-s.p.done:
		// The client may have written its last event just before the
		// end: let the reader get to the end of what it can read.
		select {
		case <-s.closed:
		case <-time.After(time.Second):
		}
		select {
		case err := <-s.fault:
			return clientEvent{}, err
		case ev := <-s.events:
			if ev.Event == "error" {
				return ev, errors.New(ev.Error)
			}
			if want == "" || ev.Event == want {
				return ev, nil
			}
		default:
		}
		err := s.p.err
		if err == nil {
			err = errors.New("exited")
		}
		return clientEvent{}, errors.New(s.failure(fmt.Errorf("ended before %s: %w", want, err)))
	case <-t.C:
		s.p.kill()
		return clientEvent{}, errors.New(s.failure(fmt.Errorf("no %s from the client within %v", want, d)))
	case <-ctx.Done():
		s.p.kill()
		return clientEvent{}, ctx.Err()
	}
}

// failure describes a failed session with what it printed.
func (s *session) failure(err error) string {
	msg := s.p.errorText(err)
	if n := lastLines(s.noise.String(), 2); n != "" {
		msg += " | stdout: " + n
	}
	return msg
}

// send writes one command line to the client.
func (s *session) send(cmd string) {
	io.WriteString(s.stdin, cmd+"\n")
}

// finish tells the client to exit and waits for the whole tree to end;
// whatever is still running after d is killed.
func (s *session) finish(d time.Duration) {
	s.send("exit")
	s.stdin.Close()
	select {
	case <-s.p.done:
	case <-time.After(d):
		s.p.kill()
		<-s.p.done
	}
}
