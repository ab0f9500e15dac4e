package slirpapi

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
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/gonetns/gonetns/port"
)

// Config configures a Server.
type Config struct {
	// Ports publishes the forwards. Required.
	Ports port.Manager
	// Guest is the namespace's address, where a forward without
	// guest_addr leads (slirp4netns's "recommended" address, .100).
	Guest netip.Addr
	// Guest6 is its IPv6 address with --enable-ipv6, else invalid. With
	// it, a forward on every address of the host (0.0.0.0 or "::")
	// listens on IPv6 too, and IPv6 clients go to Guest6 unless the
	// forward names its guest_addr.
	Guest6 netip.Addr
	// Subnets are the namespace's networks, where a guest_addr must be,
	// and Own the addresses in them that are gonetns's, where it must
	// not (see Server.guestAddr). Empty Subnets: any guest_addr.
	Subnets []netip.Prefix
	Own     []netip.Addr
	// Logger gets each request at Debug. Nil discards.
	Logger *slog.Logger
}

// Limits of the server: slirp4netns handles one request at a time and
// lets a slow client stop it; here a client has requestTimeout to send its
// request, and up to maxConns are served at once (the others wait in the
// listen queue), so that one slow client delays nobody.
const (
	requestTimeout = 10 * time.Second
	maxConns       = 16
)

// What is read and dropped after a request that is too large.
const (
	drainTimeout = time.Second
	drainLimit   = 1 << 20
)

// Server answers slirp4netns's API on a unix socket.
type Server struct {
	cfg Config
	log *slog.Logger

	mu      sync.Mutex // serializes requests that change forwards, as slirp4netns does
	nextID  int
	entries map[int]*entry

	ln     net.Listener
	path   string
	wg     sync.WaitGroup
	ctx    context.Context
	cancel context.CancelFunc
	once   sync.Once
}

// entry is one add_hostfwd: the ports it published (one per family).
type entry struct {
	id     int
	fwd    Forward
	v4, v6 *port.Status
}

// NewServer returns a Server with no forwards. It starts nothing.
func NewServer(cfg Config) *Server {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Server{cfg: cfg, log: cfg.Logger, nextID: 1, entries: map[int]*entry{}, ctx: ctx, cancel: cancel}
}

// maxSocketPath is the room in sockaddr_un for a path and its NUL.
const maxSocketPath = 108

// Listen creates the API socket at path, replacing whatever is there (as
// slirp4netns does: a socket left by a killed run must not stop the next).
func Listen(path string) (net.Listener, error) {
	if len(path) >= maxSocketPath {
		return nil, fmt.Errorf("the specified API socket path is too long (>= %d)", maxSocketPath)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("api socket %s: %w", path, err)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("api_bindlisten: %w", err)
	}
	// Close removes the file itself, once.
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	return ln, nil
}

// Serve answers on ln until Close, from goroutines Close waits for. The
// socket file ln is bound to is removed by Close.
func (s *Server) Serve(ln net.Listener) {
	s.ln = ln
	if a, ok := ln.Addr().(*net.UnixAddr); ok {
		s.path = a.Name
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		slots := make(chan struct{}, maxConns)
		for {
			c, err := ln.Accept()
			if err != nil {
				if !errors.Is(err, net.ErrClosed) {
					s.log.Warn("api socket: accept failed; the API is down", "err", err)
				}
				return
			}
			select {
			case slots <- struct{}{}:
			case <-s.ctx.Done():
				c.Close()
				return
			}
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				defer func() { <-slots }()
				s.serveConn(c)
			}()
		}
	}()
}

// serveConn answers one request and closes the connection.
func (s *Server) serveConn(c net.Conn) {
	defer c.Close()
	stop := context.AfterFunc(s.ctx, func() { c.SetDeadline(time.Now()) })
	defer stop()
	c.SetDeadline(time.Now().Add(requestTimeout))
	b, err := readRequest(c)
	var answer []byte
	switch {
	case errors.Is(err, errTooLarge):
		answer = errorAnswer(errTooLarge)
	case err != nil:
		s.log.Debug("api socket: reading a request failed", "err", err)
		return
	default:
		answer = s.Handle(b)
	}
	// One write: clients read the answer with a single read (Podman).
	if _, err := c.Write(answer); err != nil {
		s.log.Debug("api socket: writing an answer failed", "err", err)
	}
	if errors.Is(err, errTooLarge) {
		// What the client still sends is read and dropped for a moment:
		// a unix socket closed with unread data resets the client's next
		// read, which may come before it has read the answer.
		c.SetReadDeadline(time.Now().Add(drainTimeout))
		io.CopyN(io.Discard, c, drainLimit)
	}
}

// Handle answers one request.
func (s *Server) Handle(b []byte) []byte {
	req, err := ParseRequest(b)
	if err != nil {
		s.log.Debug("api socket: bad request", "request", string(b), "err", err)
		return errorAnswer(err)
	}
	s.log.Debug("api socket: request", "execute", req.Execute)
	switch req.Execute {
	case cmdAdd:
		id, err := s.add(req.Forward)
		if err != nil {
			return errorAnswer(err)
		}
		return answerJSON(map[string]any{"return": map[string]int{"id": id}})
	case cmdRemove:
		if err := s.remove(req.ID); err != nil {
			return errorAnswer(err)
		}
		return []byte(`{"return":{}}`)
	default:
		return s.list()
	}
}

// specs are the port driver's specs of f: one per family it listens on.
func (s *Server) specs(f Forward) (v4, v6 *port.Spec) {
	transport := f.Proto[:3]
	listen4, listen6 := f.HostAddr.Is4(), f.HostAddr.Is6()
	switch {
	case f.Proto == transport+"4":
		listen4, listen6 = true, false
	case f.Proto == transport+"6":
		listen4, listen6 = false, true
	case f.HostAddr.IsUnspecified():
		listen4, listen6 = true, s.cfg.Guest6.IsValid()
	}
	if listen4 {
		host := f.HostAddr
		if !host.Is4() {
			host = netip.IPv4Unspecified()
		}
		guest := f.GuestAddr
		if !guest.IsValid() {
			guest = s.cfg.Guest
		}
		v4 = &port.Spec{Proto: transport + "4", ParentIP: host, ParentPort: f.HostPort, ChildIP: guest, ChildPort: f.GuestPort}
	}
	if listen6 {
		host := f.HostAddr
		if !host.Is6() {
			host = netip.IPv6Unspecified()
		}
		guest := f.GuestAddr
		if !guest.IsValid() {
			guest = s.cfg.Guest6
			if !guest.IsValid() {
				guest = s.cfg.Guest // an IPv6 listener into an IPv4-only namespace
			}
		}
		v6 = &port.Spec{Proto: transport + "6", ParentIP: host, ParentPort: f.HostPort, ChildIP: guest, ChildPort: f.GuestPort}
	}
	return v4, v6
}

// add publishes f and returns its id.
func (s *Server) add(f Forward) (int, error) {
	if err := s.guestAddr(f.GuestAddr); err != nil {
		return 0, &Error{"bad request: add_hostfwd: slirp_add_hostfwd failed: " + err.Error()}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	v4, v6 := s.specs(f)
	e := &entry{fwd: f}
	fail := func(err error) (int, error) {
		for _, st := range []*port.Status{e.v4, e.v6} {
			if st != nil {
				s.cfg.Ports.RemovePort(st.ID)
			}
		}
		s.log.Debug("api socket: add_hostfwd failed", "err", err)
		if errors.Is(err, port.ErrConflict) {
			// The port driver's message names its own port IDs, which
			// are not this API's.
			err = fmt.Errorf("%s port %d of %s is forwarded already", f.Proto[:3], f.HostPort, f.HostAddr)
		}
		return 0, &Error{"bad request: add_hostfwd: slirp_add_hostfwd failed: " + err.Error()}
	}
	// A forward of an unspecified host address listens on both families
	// with -6; the family slirp4netns listens on (host_addr's) is the
	// forward, the other an addition that may fail alone (its port taken
	// by another program, no IPv6 on the host): slirp4netns publishes
	// 0.0.0.0:P while [::]:P is in use, and Podman's `-p P:80` failed
	// here where it worked there.
	both := v4 != nil && v6 != nil
	for _, half := range []struct {
		spec     *port.Spec
		st       **port.Status
		optional bool
	}{{v4, &e.v4, both && f.HostAddr.Is6()}, {v6, &e.v6, both && !f.HostAddr.Is6()}} {
		if half.spec == nil {
			continue
		}
		st, err := s.cfg.Ports.AddPort(s.ctx, *half.spec)
		if err != nil && half.optional {
			s.log.Warn(fmt.Sprintf("api socket: forward of %s port %d listens on %s only: %v", f.Proto[:3], f.HostPort, f.HostAddr, err))
			continue
		}
		if err != nil {
			return fail(err)
		}
		*half.st = &st
	}
	e.id = s.nextID
	s.nextID++
	s.entries[e.id] = e
	return e.id, nil
}

// guestAddr checks a forward's guest_addr (invalid: none given). A
// forward leads to the namespace's side of the link, as slirp4netns's
// do: its connections are dialled from inside the namespace, so an
// address there that is not the namespace's own would lead elsewhere:
// gonetns's gateway to the host's loopback (a host service listening on
// 127.0.0.1 published on every address), an outside address off the
// machine, 127.0.0.1 to a service bound to the namespace's loopback. With
// slirp4netns each of these is accepted and goes nowhere.
func (s *Server) guestAddr(a netip.Addr) error {
	if !a.IsValid() || len(s.cfg.Subnets) == 0 {
		return nil
	}
	a = a.Unmap()
	if slices.Contains(s.cfg.Own, a) {
		return fmt.Errorf("guest_addr %s is gonetns's own (the namespace's gateway or DNS), not an address of the namespace: leave guest_addr out for %s", a, s.cfg.Guest)
	}
	for _, p := range s.cfg.Subnets {
		if p.Contains(a) {
			return nil
		}
	}
	return fmt.Errorf("guest_addr %s is not in the namespace's network (%s): leave guest_addr out for %s", a, prefixList(s.cfg.Subnets), s.cfg.Guest)
}

func prefixList(ps []netip.Prefix) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ", ")
}

// remove stops forward id.
func (s *Server) remove(id int) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.entries[id]
	if !ok {
		return badArgument(cmdRemove, "id")
	}
	var errs []error
	for _, st := range []*port.Status{e.v4, e.v6} {
		if st != nil {
			if err := s.cfg.Ports.RemovePort(st.ID); err != nil && !errors.Is(err, port.ErrUnknownPort) {
				errs = append(errs, err)
			}
		}
	}
	delete(s.entries, id)
	if err := errors.Join(errs...); err != nil {
		return &Error{"bad request: remove_hostfwd: slirp_remove_hostfwd failed: " + err.Error()}
	}
	return nil
}

// listEntry is one forward in list_hostfwd's answer: slirp4netns's
// fields, with host_addr6 and guest_addr6 for a forward that listens on
// IPv6 (the names of slirp4netns's IPv6 work).
type listEntry struct {
	ID         int    `json:"id"`
	Proto      string `json:"proto"`
	HostAddr   string `json:"host_addr,omitempty"`
	HostAddr6  string `json:"host_addr6,omitempty"`
	HostPort   int    `json:"host_port"`
	GuestAddr  string `json:"guest_addr,omitempty"`
	GuestAddr6 string `json:"guest_addr6,omitempty"`
	GuestPort  int    `json:"guest_port"`
}

// list answers list_hostfwd. slirp4netns documents the answer as
// {"return":{"entries":[...]}} but sends {"entries":[...]}; both keys are
// here, so that a client written against either finds its entries.
func (s *Server) list() []byte {
	s.mu.Lock()
	entries := make([]listEntry, 0, len(s.entries))
	for _, e := range s.entries {
		le := listEntry{ID: e.id, Proto: e.fwd.Proto, HostPort: e.fwd.HostPort, GuestPort: e.fwd.GuestPort}
		if e.v4 != nil {
			le.HostAddr, le.GuestAddr = e.v4.Spec.ParentIP.String(), e.v4.Spec.ChildIP.String()
		}
		if e.v6 != nil {
			le.HostAddr6, le.GuestAddr6 = e.v6.Spec.ParentIP.String(), e.v6.Spec.ChildIP.String()
			if e.v4 == nil {
				le.GuestAddr = le.GuestAddr6
			}
		}
		entries = append(entries, le)
	}
	s.mu.Unlock()
	sort.Slice(entries, func(i, j int) bool { return entries[i].ID < entries[j].ID })
	return answerJSON(map[string]any{"return": map[string]any{"entries": entries}, "entries": entries})
}

func errorAnswer(err error) []byte {
	var e *Error
	if !errors.As(err, &e) {
		e = &Error{err.Error()}
	}
	return answerJSON(map[string]any{"error": map[string]string{"desc": e.Desc}})
}

func answerJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err) // only our own types
	}
	return b
}

// Close stops serving, waits for the requests being answered, removes
// the socket file and the forwards. Idempotent.
func (s *Server) Close() error {
	s.once.Do(func() {
		s.cancel()
		if s.ln != nil {
			s.ln.Close()
		}
		s.wg.Wait()
		if s.path != "" {
			if err := os.Remove(s.path); err != nil && !errors.Is(err, os.ErrNotExist) && !errors.Is(err, syscall.ENOTDIR) {
				s.log.Debug("api socket: remove", "err", err)
			}
		}
		s.mu.Lock()
		for id, e := range s.entries {
			for _, st := range []*port.Status{e.v4, e.v6} {
				if st != nil {
					s.cfg.Ports.RemovePort(st.ID)
				}
			}
			delete(s.entries, id)
		}
		s.mu.Unlock()
	})
	return nil
}
