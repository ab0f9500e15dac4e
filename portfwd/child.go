package portfwd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/internal/wire"
	"github.com/gonetns/gonetns/port"
)

// The dial protocol, one wire message each way:
//
//	parent -> child: dialRequest{id, proto, addr[, source]}
//	child -> parent: dialReply{id, error, errno[, held]} with, on success,
//	                 the connected socket attached (SCM_RIGHTS)
//	parent -> child: dialRequest{op: "release", id}, when a flow whose
//	                 reply said held has ended (no reply)
//
// Requests are served concurrently; replies may come back in any order and
// are matched by id.

// dialRequest asks the child to connect to Addr over Proto inside the
// namespace, from Source (the client's address on the host) when it is
// valid and the namespace can (see transparent.go). With Op "release" it
// says instead that the flow of dial ID has ended.
type dialRequest struct {
	ID     uint64         `json:"id"`
	Op     string         `json:"op,omitempty"` // "" (dial) or opRelease
	Proto  string         `json:"proto,omitempty"`
	Addr   netip.AddrPort `json:"addr,omitzero"`
	Source netip.AddrPort `json:"source,omitzero"`
}

const opRelease = "release"

// dialReply answers one dialRequest. Error is empty on success, and then
// exactly one descriptor comes with the message. Errno is the syscall.Errno
// behind Error, if any, so that the parent can tell a refusal
// (ECONNREFUSED) from other failures with errors.Is. Held says that the
// child keeps routing state for this connection (a UDP flow that kept the
// client's address) until the parent sends a release for its ID.
type dialReply struct {
	ID    uint64 `json:"id"`
	Error string `json:"error,omitempty"`
	Errno int    `json:"errno,omitempty"`
	Held  bool   `json:"held,omitempty"`
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
	// Logger gets per-dial events at Debug and trouble at Warn. Nil
	// discards.
	Logger *slog.Logger
	// InNetNS runs fn on an OS thread that is in the sandbox's network
	// namespace and returns fn's error. Every socket the child creates
	// (the dials' sockets, the rtnetlink socket of the routing set-up) and
	// every /proc/sys write goes through it. Nil runs fn right away, for a
	// child that lives in that namespace itself; with --detach-netns the
	// child passes a hook onto a thread that has entered it. fn never
	// blocks for long (a connect's wait happens outside).
	InNetNS func(fn func() error) error
	// SandboxPrefixes are the subnets of the sandbox's own network
	// (10.0.2.0/24, fd00::/64). A client whose address is inside them is
	// never given as the source inside: there that address is the
	// gateway's, DNS's or the sandbox's own (a client can look like one,
	// e.g. behind VirtualBox's NAT, which shows every client as 10.0.2.2).
	SandboxPrefixes []netip.Prefix
}

// ServeChild answers the parent's dial requests; it runs in the child
// process, which owns the sandbox's network namespace. For each request it
// connects inside the namespace (TCP: connect with a timeout of 10 s; UDP:
// a connected UDP socket), from the client's own address when the request
// carries one and the namespace allows it (transparent.go), and replies
// with the connected socket's descriptor, or with the error. At most 256
// dials run at once, each on its own goroutine.
//
// ServeChild owns c and closes it. It returns nil when ctx ends or the
// parent closes its end, an error if reading from c fails otherwise; either
// way only after every goroutine it started has finished, and after it has
// removed the routing rules and routes it added.
func ServeChild(ctx context.Context, c *wire.Conn, cfg ChildConfig) error {
	s := &childServer{c: c, log: cfg.Logger, inNS: cfg.InNetNS}
	if s.log == nil {
		s.log = discardLogger
	}
	if s.inNS == nil {
		s.inNS = func(fn func() error) error { return fn() }
	}
	s.tp = newTransparency(s.inNS, s.log)
	s.tp.sandbox = cfg.SandboxPrefixes
	defer s.tp.close() // last: after every dial has finished
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
			s.log.Warn("portfwd: dropping malformed dial request", "err", err)
			continue
		default:
			return fmt.Errorf("portfwd child: read dial requests from the parent: %w", err)
		}
		if req.Op == opRelease {
			s.tp.releaseUDP(req.ID)
			continue
		}
		select {
		case slots <- struct{}{}:
		case <-ctx.Done():
			return nil
		}
		wg.Go(func() {
			defer func() { <-slots }()
			s.serveDial(ctx, req)
		})
	}
}

// childServer is one ServeChild.
type childServer struct {
	c    *wire.Conn
	log  *slog.Logger
	inNS func(func() error) error
	tp   *transparency
}

// isBadMessage reports errors that spoil one message but not the stream.
func isBadMessage(err error) bool { return errors.Is(err, wire.ErrBadMessage) }

// serveDial connects for one request and sends the reply.
func (s *childServer) serveDial(ctx context.Context, req dialRequest) {
	start := time.Now()
	f, kept, err := s.dial(ctx, req)
	// A UDP flow that kept the client's address holds a route until the
	// parent releases it; TCP needs nothing per connection.
	held := kept && req.Proto[:3] == "udp"
	rep := dialReply{ID: req.ID, Held: held}
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
	s.log.Debug("portfwd: child dial", "id", req.ID, "proto", req.Proto, "addr", req.Addr, "source", req.Source,
		"kept_source", kept,
		"duration", time.Since(start), "err", err)
	if err := s.c.Send(rep, files...); err != nil {
		if held {
			s.tp.releaseUDP(req.ID) // the parent will never release it
		}
		if ctx.Err() == nil {
			s.log.Warn("portfwd: cannot send a dial reply to the parent", "id", req.ID, "err", err)
		}
	}
}

// dial connects for req and returns the connected socket as a file; kept
// reports that it is bound to the client's address. A request with a
// source tries a transparent connection first and falls back to a plain
// one when the namespace cannot keep the address.
func (s *childServer) dial(ctx context.Context, req dialRequest) (f *os.File, kept bool, err error) {
	if !slices.Contains(port.Protos, req.Proto) {
		return nil, false, fmt.Errorf("unknown protocol %q", req.Proto)
	}
	if !req.Addr.IsValid() {
		return nil, false, errors.New("no address to dial")
	}
	req.Addr = netip.AddrPortFrom(req.Addr.Addr().Unmap(), req.Addr.Port())
	if (strings.HasSuffix(req.Proto, "4") && !req.Addr.Addr().Is4()) || (strings.HasSuffix(req.Proto, "6") && !req.Addr.Addr().Is6()) {
		return nil, false, fmt.Errorf("address %s is not of protocol %s", req.Addr, req.Proto)
	}
	transport := req.Proto[:3]
	if req.Source.IsValid() {
		f, err := s.dialTransparent(ctx, req, transport)
		if err == nil {
			return f, true, nil
		}
		var not *errNotTransparent
		if ctx.Err() == nil {
			what := "portfwd: transparent dial failed; dialing from the namespace's own address"
			if errors.As(err, &not) {
				what = "portfwd: the client's address is not kept for this dial"
			}
			s.log.Debug(what, "id", req.ID, "addr", req.Addr, "source", req.Source, "err", err)
		}
		if ctx.Err() != nil {
			return nil, false, err
		}
	}
	typ := unix.SOCK_STREAM
	if transport == "udp" {
		typ = unix.SOCK_DGRAM
	}
	fd, sa, err := openSocket(s.inNS, req.Addr, socketOpts{typ: typ})
	if err != nil {
		return nil, false, err
	}
	f, err = connectSocket(ctx, fd, sa, childDialTimeout, nil)
	return f, false, err
}

// dialTransparent connects from req.Source. Its errors make the caller
// fall back to a plain dial; *errNotTransparent ones say why the address
// cannot be kept (a loopback client, say) rather than that something
// failed.
func (s *childServer) dialTransparent(ctx context.Context, req dialRequest, transport string) (*os.File, error) {
	if err := s.tp.eligible(transport, req.Addr, req.Source); err != nil {
		return nil, err
	}
	typ := unix.SOCK_STREAM
	if transport == "udp" {
		typ = unix.SOCK_DGRAM
	}
	fd, sa, err := openSocket(s.inNS, req.Addr, socketOpts{typ: typ, from: req.Source})
	if err != nil {
		return nil, err
	}
	if typ == unix.SOCK_DGRAM {
		// The way back first: a server may answer the first datagram as
		// soon as the parent sends it.
		if err := s.tp.acquireUDP(req.ID, req.Addr, req.Source); err != nil {
			unix.Close(fd)
			return nil, err
		}
	}
	var sent func() error
	if typ == unix.SOCK_STREAM {
		sent = func() error { return s.tp.checkRedirect(req.Source, req.Addr) }
	}
	f, err := connectSocket(ctx, fd, sa, childDialTimeout, sent)
	if err != nil && typ == unix.SOCK_DGRAM {
		s.tp.releaseUDP(req.ID)
	}
	return f, err
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
