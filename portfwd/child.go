package portfwd

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/wire"
)

// The dial protocol, one wire message each way:
//
//	parent -> child: dialRequest{id, proto, addr}
//	child -> parent: dialReply{id, error, errno} with, on success, the
//	                 connected socket attached (SCM_RIGHTS)
//
// Requests are served concurrently; replies may come back in any order and
// are matched by id.

// dialRequest asks the child to connect to Addr over Proto inside the
// namespace.
type dialRequest struct {
	ID    uint64         `json:"id"`
	Proto string         `json:"proto"`
	Addr  netip.AddrPort `json:"addr"`
}

// dialReply answers one dialRequest. Error is empty on success, and then
// exactly one descriptor comes with the message. Errno is the syscall.Errno
// behind Error, if any, so that the parent can tell a refusal
// (ECONNREFUSED) from other failures with errors.Is.
type dialReply struct {
	ID    uint64 `json:"id"`
	Error string `json:"error,omitempty"`
	Errno int    `json:"errno,omitempty"`
}

const (
	// childDialTimeout bounds one connect inside the namespace. Loopback
	// targets answer at once; this only matters for a CHILDIP that drops
	// SYNs.
	childDialTimeout = 10 * time.Second
	// maxChildDials bounds the dials in flight in the child. When all are
	// busy, ServeChild stops reading requests until one finishes, so the
	// parent's sends wait (and its dial timeouts apply).
	maxChildDials = 256
)

var discardLogger = slog.New(slog.DiscardHandler)

// ChildConfig configures ServeChild.
type ChildConfig struct {
	// InNetNS runs fn where sockets belong to the sandbox's network
	// namespace; nil means here (the child is in that namespace). With
	// --detach-netns it runs fn on a thread that lives in the detached
	// namespace. fn only creates sockets; connecting happens outside.
	InNetNS func(fn func() error) error
	// Logger may be nil.
	Logger *slog.Logger
}

// ServeChild answers the parent's dial requests; it runs in the child
// process, inside the namespaces. For each request it connects inside the
// namespace (TCP: connect with a timeout of 10 s; UDP: a connected UDP
// socket) and replies with the connected socket's descriptor, or with the
// error. At most 256 dials run at once, each on its own goroutine.
//
// ServeChild owns c and closes it. It returns nil when ctx ends or the
// parent closes its end, an error if reading from c fails otherwise; either
// way only after every goroutine it started has finished.
func ServeChild(ctx context.Context, c *wire.Conn, cfg ChildConfig) error {
	log := cfg.Logger
	if log == nil {
		log = discardLogger
	}
	inNS := cfg.InNetNS
	if inNS == nil {
		inNS = func(fn func() error) error { return fn() }
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	defer c.Close() // before the wait: a goroutine may block in Send
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// Recv has no deadline: closing c is what interrupts it.
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()

	slots := make(chan struct{}, maxChildDials)
	for {
		var req dialRequest
		files, err := c.Recv(&req)
		wire.CloseFiles(files) // requests carry none
		switch {
		case err == nil:
		case ctx.Err() != nil || errors.Is(err, io.EOF):
			return nil
		case isBadMessage(err):
			log.Warn("portfwd: dropping malformed dial request", "err", err)
			continue
		default:
			return fmt.Errorf("portfwd child: read dial requests from the parent: %w", err)
		}
		select {
		case slots <- struct{}{}:
		case <-ctx.Done():
			return nil
		}
		wg.Go(func() {
			defer func() { <-slots }()
			serveDial(ctx, c, req, inNS, log)
		})
	}
}

// isBadMessage reports errors that spoil one message but not the stream.
func isBadMessage(err error) bool {
	var syntax *json.SyntaxError
	var typ *json.UnmarshalTypeError
	return errors.Is(err, wire.ErrTruncated) || errors.As(err, &syntax) || errors.As(err, &typ)
}

// serveDial connects for one request and sends the reply.
func serveDial(ctx context.Context, c *wire.Conn, req dialRequest, inNS func(func() error) error, log *slog.Logger) {
	start := time.Now()
	f, err := dialInside(ctx, req, inNS)
	rep := dialReply{ID: req.ID}
	var files []*os.File
	if err != nil {
		// The parent names the protocol and address itself: send what
		// went wrong ("connect: connection refused"), not the whole
		// "dial tcp ADDR: ..." chain.
		msg := err
		var op *net.OpError
		if errors.As(err, &op) && op.Err != nil {
			msg = op.Err
		}
		rep.Error = msg.Error()
		rep.Errno = int(errnoOf(err))
	} else {
		defer f.Close()
		files = []*os.File{f}
	}
	log.Debug("portfwd: child dial", "id", req.ID, "proto", req.Proto, "addr", req.Addr,
		"duration", time.Since(start), "err", err)
	if err := c.Send(rep, files...); err != nil && ctx.Err() == nil {
		log.Warn("portfwd: cannot send a dial reply to the parent", "id", req.ID, "err", err)
	}
}

// dialInside connects and returns the connected socket as a file. The
// socket is created by inNS, in the sandbox's network namespace; the
// connect waits here.
func dialInside(ctx context.Context, req dialRequest, inNS func(func() error) error) (*os.File, error) {
	if !validProto(req.Proto) {
		return nil, fmt.Errorf("unknown protocol %q", req.Proto)
	}
	if !req.Addr.IsValid() {
		return nil, errors.New("no address to dial")
	}
	family, sa := unix.AF_INET, unix.Sockaddr(nil)
	if a := req.Addr.Addr(); a.Is4() || a.Is4In6() {
		sa = &unix.SockaddrInet4{Port: int(req.Addr.Port()), Addr: a.Unmap().As4()}
	} else {
		family = unix.AF_INET6
		sa = &unix.SockaddrInet6{Port: int(req.Addr.Port()), Addr: a.As16()}
	}
	if (strings.HasSuffix(req.Proto, "4") && family != unix.AF_INET) || (strings.HasSuffix(req.Proto, "6") && family != unix.AF_INET6) {
		return nil, fmt.Errorf("address %s is not of protocol %s", req.Addr, req.Proto)
	}
	sotype := unix.SOCK_STREAM
	if req.Proto[:3] == "udp" {
		sotype = unix.SOCK_DGRAM
	}
	var fd int
	err := inNS(func() error {
		var err error
		fd, err = unix.Socket(family, sotype|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
		return err
	})
	if err != nil {
		return nil, os.NewSyscallError("socket", err)
	}
	f := os.NewFile(uintptr(fd), "dial "+req.Proto+" "+req.Addr.String())
	if err := connect(ctx, f, sa); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// connect connects the non-blocking socket f to sa, waiting at most
// childDialTimeout or until ctx ends.
func connect(ctx context.Context, f *os.File, sa unix.Sockaddr) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var cerr error
	if err := rc.Control(func(fd uintptr) { cerr = unix.Connect(int(fd), sa) }); err != nil {
		return err
	}
	switch cerr {
	case nil:
		return nil
	case unix.EINPROGRESS:
	default:
		return os.NewSyscallError("connect", cerr)
	}
	deadline := time.Now().Add(childDialTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	f.SetWriteDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { f.SetWriteDeadline(time.Unix(1, 0)) })
	defer stop()
	var soErr int
	err = rc.Write(func(fd uintptr) bool {
		v, gerr := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ERROR)
		if gerr != nil {
			soErr = int(gerr.(unix.Errno))
			return true
		}
		soErr = v
		// Still connecting: wait for writability again.
		return v != int(unix.EINPROGRESS) && v != 0 || isConnected(int(fd))
	})
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return os.NewSyscallError("connect", unix.ETIMEDOUT)
		}
		return err
	}
	if soErr != 0 {
		return os.NewSyscallError("connect", unix.Errno(soErr))
	}
	f.SetWriteDeadline(time.Time{})
	return nil
}

// isConnected reports whether a socket whose SO_ERROR is 0 has finished
// connecting (it has a peer).
func isConnected(fd int) bool {
	_, err := unix.Getpeername(fd)
	return err == nil
}

// errnoOf finds the errno behind a dial error; timeouts count as
// ETIMEDOUT.
func errnoOf(err error) syscall.Errno {
	var errno syscall.Errno
	switch {
	case errors.As(err, &errno):
		return errno
	case errors.Is(err, os.ErrDeadlineExceeded), errors.Is(err, context.DeadlineExceeded):
		return syscall.ETIMEDOUT
	}
	return 0
}
