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
	"sync"
	"syscall"
	"time"

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

// ServeChild answers the parent's dial requests; it runs in the child
// process, inside the namespaces. For each request it connects inside the
// namespace (TCP: connect with a timeout of 10 s; UDP: a connected UDP
// socket) and replies with the connected socket's descriptor, or with the
// error. At most 256 dials run at once, each on its own goroutine.
//
// ServeChild owns c and closes it. It returns nil when ctx ends or the
// parent closes its end, an error if reading from c fails otherwise; either
// way only after every goroutine it started has finished. log may be nil.
func ServeChild(ctx context.Context, c *wire.Conn, log *slog.Logger) error {
	if log == nil {
		log = discardLogger
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
			serveDial(ctx, c, req, log)
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
func serveDial(ctx context.Context, c *wire.Conn, req dialRequest, log *slog.Logger) {
	start := time.Now()
	f, err := dialInside(ctx, req)
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

// dialInside connects and returns the connected socket as a file (a
// duplicate; the net.Conn is closed).
func dialInside(ctx context.Context, req dialRequest) (*os.File, error) {
	if !validProto(req.Proto) {
		return nil, fmt.Errorf("unknown protocol %q", req.Proto)
	}
	if !req.Addr.IsValid() {
		return nil, errors.New("no address to dial")
	}
	d := net.Dialer{Timeout: childDialTimeout}
	conn, err := d.DialContext(ctx, req.Proto, req.Addr.String())
	if err != nil {
		return nil, err
	}
	defer conn.Close() // the duplicate in the file stays open
	fc, ok := conn.(interface{ File() (*os.File, error) })
	if !ok {
		return nil, fmt.Errorf("dial %s %s: got a %T, which has no descriptor", req.Proto, req.Addr, conn)
	}
	return fc.File()
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
