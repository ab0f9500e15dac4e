// Package dns owns the DNS server the sandbox sees at 10.0.2.3: it answers
// queries over UDP and TCP on sockets it is handed (in production, gVisor
// netstack sockets) by forwarding them to the host's resolvers over
// ordinary host sockets. It also owns resolv.conf handling: reading the
// host's file for upstreams, search domains and options, and writing the
// one the sandbox sees.
//
// The server is a forwarder, not a resolver or a cache: a query goes
// upstream byte for byte (only the ID changes) and the answer comes back
// the same way, so EDNS options, DNSSEC bits and TTLs pass through intact.
package dns

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/gonetns/gonetns/internal/backoff"
)

// Limits. A flood from inside the sandbox can cost at most maxInFlight
// concurrent queries (each holding at most two 64 KiB messages) and
// maxTCPConns connections.
const (
	// DefaultTimeout is the budget for one query across all upstreams:
	// long enough for an upstream resolving a name it has not cached
	// (seconds, for a slow authority or DNSSEC), and for the datagrams
	// resent to it (resendAfter), short of the 5 s a glibc client waits
	// per try (resolv.conf's timeout), so that the client gets SERVFAIL
	// rather than silence. At 2 s an upstream that answered in 3 s failed
	// names that resolved on the host and through slirp4netns and pasta.
	DefaultTimeout = 4 * time.Second

	// maxInFlight bounds queries being forwarded at once, UDP and TCP
	// together. A query beyond it takes the slot of the oldest one if
	// that one has gone unanswered for a quarter of the budget (slots);
	// else a UDP query is dropped (the client retransmits after its
	// timeout, as it would for a lost datagram) and a TCP connection
	// stops being read until a slot frees.
	maxInFlight = 256
	// maxTCPConns bounds open TCP client connections; one beyond it is
	// closed as soon as it is accepted.
	maxTCPConns = 64
	// maxConnInFlight bounds pipelined queries per TCP connection, so one
	// connection cannot take every slot.
	maxConnInFlight = 16
	// tcpIdleTimeout closes a TCP connection with no new query for this
	// long (RFC 7766 section 6.2.3 suggests seconds, not minutes).
	tcpIdleTimeout = 10 * time.Second
	// tcpWriteTimeout bounds writing one answer to a TCP client.
	tcpWriteTimeout = 10 * time.Second
)

// Config configures a Server.
type Config struct {
	// Upstreams are the resolvers queries are forwarded to, tried in
	// order. At least one is required.
	Upstreams []netip.AddrPort
	// Timeout is the whole budget for one query across all upstreams;
	// 0 means DefaultTimeout. When it runs out the client gets SERVFAIL.
	Timeout time.Duration
	// Logger receives per-query events at Debug and outages at Warn; nil
	// discards.
	Logger *slog.Logger
}

// Server answers DNS queries by forwarding them upstream. Create it with
// New, give it sockets with Start, and stop it with Close.
type Server struct {
	fwd *forwarder
	log *slog.Logger

	// ctx is cancelled by Close; every query runs under it.
	ctx    context.Context
	cancel context.CancelFunc

	slots  *slots        // one per query in flight
	tcpSem chan struct{} // one slot per open TCP client connection

	wg sync.WaitGroup // every goroutine the Server started

	mu      sync.Mutex
	closed  bool
	closers []io.Closer           // sockets handed to Start
	conns   map[net.Conn]struct{} // open TCP client connections
	// udpInFlight are the UDP queries being answered (inFlight), at
	// most maxInFlight.
	udpInFlight map[string]struct{}

	closeOnce sync.Once
	closeErr  error
}

// New checks cfg and returns a Server that serves nothing until Start.
func New(cfg Config) (*Server, error) {
	if len(cfg.Upstreams) == 0 {
		return nil, errors.New("dns: no upstream resolvers: give one with --dns-upstream=IP[:PORT] or add a nameserver line to the host's /etc/resolv.conf")
	}
	for _, u := range cfg.Upstreams {
		if !u.Addr().IsValid() || u.Port() == 0 {
			return nil, fmt.Errorf("dns: upstream %q is not an IP address with a port: pass IP[:PORT], e.g. --dns-upstream=1.1.1.1:53", u)
		}
	}
	if cfg.Timeout < 0 {
		return nil, fmt.Errorf("dns: negative timeout %v: use 0 for the default of %v", cfg.Timeout, DefaultTimeout)
	}
	timeout := cfg.Timeout
	if timeout == 0 {
		timeout = DefaultTimeout
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Server{
		fwd: &forwarder{
			ex:        &hostExchanger{},
			upstreams: append([]netip.AddrPort(nil), cfg.Upstreams...),
			timeout:   timeout,
			log:       log,
		},
		log:    log,
		ctx:    ctx,
		cancel: cancel,
		slots:  newSlots(maxInFlight, timeout/4),
		tcpSem: make(chan struct{}, maxTCPConns),
		conns:  make(map[net.Conn]struct{}),

		udpInFlight: make(map[string]struct{}),
	}, nil
}

// Start serves DNS over UDP on pc and over TCP on ln; either may be nil.
// The Server owns both from now on and closes them in Close. Start may be
// called more than once; after Close it closes what it is given and
// returns.
func (s *Server) Start(pc net.PacketConn, ln net.Listener) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		if pc != nil {
			pc.Close()
		}
		if ln != nil {
			ln.Close()
		}
		return
	}
	if pc != nil {
		s.closers = append(s.closers, pc)
		s.wg.Add(1)
		go s.serveUDP(pc)
	}
	if ln != nil {
		s.closers = append(s.closers, ln)
		s.wg.Add(1)
		go s.serveTCP(ln)
	}
}

// Close stops serving: it closes the sockets given to Start and every TCP
// client connection, cancels queries in flight, and returns once every
// goroutine the Server started has finished. Queries cut short get no
// answer. Close is safe to call more than once and from several
// goroutines; every call returns the first call's result.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		closers := s.closers
		conns := make([]net.Conn, 0, len(s.conns))
		for c := range s.conns {
			conns = append(conns, c)
		}
		s.mu.Unlock()

		s.cancel()
		var errs []error
		for _, c := range closers {
			if err := c.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
				errs = append(errs, err)
			}
		}
		for _, c := range conns {
			c.Close()
		}
		s.wg.Wait()
		if len(errs) > 0 {
			s.closeErr = fmt.Errorf("dns: close: %w", errors.Join(errs...))
		}
	})
	return s.closeErr
}

// stopping reports whether err from a socket means the server is done
// with it.
func (s *Server) stopping(err error) bool {
	return s.ctx.Err() != nil || errors.Is(err, net.ErrClosed)
}

func (s *Server) serveUDP(pc net.PacketConn) {
	defer s.wg.Done()
	buf := make([]byte, 65535)
	var retry backoff.Backoff
	for {
		n, addr, err := pc.ReadFrom(buf)
		if err != nil {
			if s.stopping(err) {
				return
			}
			s.log.Warn("dns: reading UDP query failed; retrying", slog.Any("error", err))
			if !retry.Wait(s.ctx.Done()) {
				return
			}
			continue
		}
		retry.Reset()
		if n < headerLen {
			continue // not DNS; handle would drop it too
		}
		sl, qctx, ok := s.slots.take(s.ctx, questionKey(buf[:n]))
		if !ok {
			s.log.LogAttrs(s.ctx, slog.LevelDebug, "dns: too many queries in flight, or for its question; dropping UDP query",
				slog.String("client", addr.String()))
			continue
		}
		query := append([]byte(nil), buf[:n]...)
		key := addr.String() + string(query[:2]) + string(query[headerLen:])
		if !s.inFlight(key) {
			sl.release()
			s.log.LogAttrs(s.ctx, slog.LevelDebug, "dns: the client resent a query still in flight; its answer answers both",
				slog.String("client", addr.String()))
			continue
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer sl.release()
			defer s.landed(key)
			resp := s.fwd.handle(qctx, query, udp)
			if resp == nil {
				s.gaveUp(qctx, sl, addr)
				return
			}
			if _, err := pc.WriteTo(resp, addr); err != nil && s.ctx.Err() == nil {
				s.log.LogAttrs(s.ctx, slog.LevelDebug, "dns: writing UDP answer failed",
					slog.String("client", addr.String()), slog.Any("error", err))
			}
		}()
	}
}

// gaveUp logs a query given up for a younger one (slots) while every
// slot was taken.
func (s *Server) gaveUp(qctx context.Context, sl *slot, client net.Addr) {
	if qctx.Err() == nil || s.ctx.Err() != nil {
		return
	}
	s.log.LogAttrs(s.ctx, slog.LevelDebug, "dns: every query slot taken; gave up the oldest query for a new one",
		slog.String("client", client.String()), slog.Duration("unanswered_for", time.Since(sl.start)))
}

// inFlight notes a UDP query (its client, ID and the rest after the
// header) as in flight and reports true, or reports false when the same
// one already is: the client resent it (glibc after 5 s, musl every 2.5
// s) while the upstream has not answered yet. Asking the upstream again
// would start the budget afresh and, when it runs out, answer SERVFAIL
// to the first copy while the second still waits; the answer to the
// first answers the client, whose copies carry the same ID.
func (s *Server) inFlight(key string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.udpInFlight[key]; ok {
		return false
	}
	s.udpInFlight[key] = struct{}{}
	return true
}

// landed notes that the query of key has its answer (or none will come).
func (s *Server) landed(key string) {
	s.mu.Lock()
	delete(s.udpInFlight, key)
	s.mu.Unlock()
}

func (s *Server) serveTCP(ln net.Listener) {
	defer s.wg.Done()
	var retry backoff.Backoff
	for {
		c, err := ln.Accept()
		if err != nil {
			if s.stopping(err) {
				return
			}
			s.log.Warn("dns: accepting TCP connection failed; retrying", slog.Any("error", err))
			if !retry.Wait(s.ctx.Done()) {
				return
			}
			continue
		}
		retry.Reset()
		select {
		case s.tcpSem <- struct{}{}:
		default:
			s.log.LogAttrs(s.ctx, slog.LevelDebug, "dns: too many TCP connections; closing new one",
				slog.String("client", c.RemoteAddr().String()))
			c.Close()
			continue
		}
		if !s.track(c) {
			c.Close()
			<-s.tcpSem
			return
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer func() { <-s.tcpSem }()
			s.serveConn(c)
		}()
	}
}

// track registers c so Close can close it; false means Close has begun.
func (s *Server) track(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.conns[c] = struct{}{}
	return true
}

func (s *Server) untrack(c net.Conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}

// serveConn reads length-prefixed queries from c (RFC 1035 section 4.2.2)
// and answers each as soon as its answer is ready, so pipelined queries
// may be answered out of order (RFC 7766 section 6.2.1.1). A TCP client's
// query goes upstream over TCP: it usually came here over TCP because a
// UDP answer was truncated, so asking upstream over UDP first would only
// be truncated again.
func (s *Server) serveConn(c net.Conn) {
	var (
		queries  sync.WaitGroup
		wmu      sync.Mutex
		inflight = make(chan struct{}, maxConnInFlight)
	)
	defer func() {
		queries.Wait() // answer what was asked before closing
		c.Close()
		s.untrack(c)
	}()
	var lenBuf [2]byte
	for {
		c.SetReadDeadline(time.Now().Add(tcpIdleTimeout))
		if _, err := io.ReadFull(c, lenBuf[:]); err != nil {
			return // EOF, idle timeout, or Close
		}
		n := binary.BigEndian.Uint16(lenBuf[:])
		if n < headerLen {
			return // not a DNS message; the framing cannot be trusted
		}
		query := make([]byte, n)
		if _, err := io.ReadFull(c, query); err != nil {
			return
		}
		select {
		case inflight <- struct{}{}:
		case <-s.ctx.Done():
			return
		}
		sl, qctx, ok := s.slots.wait(s.ctx, questionKey(query))
		if !ok {
			<-inflight
			return
		}
		queries.Add(1)
		go func() {
			defer queries.Done()
			defer func() {
				sl.release()
				<-inflight
			}()
			resp := s.fwd.handle(qctx, query, tcp)
			if resp == nil {
				s.gaveUp(qctx, sl, c.RemoteAddr())
			}
			if resp == nil || len(resp) > 0xFFFF {
				return
			}
			frame := make([]byte, 2+len(resp))
			binary.BigEndian.PutUint16(frame, uint16(len(resp)))
			copy(frame[2:], resp)
			wmu.Lock()
			defer wmu.Unlock()
			c.SetWriteDeadline(time.Now().Add(tcpWriteTimeout))
			if _, err := c.Write(frame); err != nil {
				c.Close() // unblocks the reader, which then returns
			}
		}()
	}
}
