package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gonetns/gonetns/port"
)

// errorBody is the body of every error response, RootlessKit's
// httputil.ErrorJSON.
type errorBody struct {
	Message string `json:"message"`
}

// maxRequestBody bounds a POST body; a spec is under 200 bytes.
const maxRequestBody = 64 << 10

// NewHandler serves RootlessKit's REST API v1 for pd:
//
//	GET    /v1/info        Info
//	GET    /v1/ports       [Status...] sorted by ID
//	POST   /v1/ports       body: Spec; 201 and the new Status
//	DELETE /v1/ports/{id}  200, empty body; 404 for an unknown id
//
// Errors are 4xx or 5xx with {"message": "..."}. The host part of the URL
// is ignored. info supplies the body of /v1/info; it may be nil. With a
// nil pd there is no port driver: the port calls fail with 400, as
// RootlessKit's do.
func NewHandler(pd port.Manager, info func() Info) http.Handler {
	return newHandler(pd, info, nil)
}

func newHandler(pd port.Manager, info func() Info, log *slog.Logger) http.Handler {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	h := &handler{pd: pd, info: info, log: log}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/info", h.getInfo)
	mux.HandleFunc("GET /v1/ports", h.needPorts(h.getPorts))
	mux.HandleFunc("POST /v1/ports", h.needPorts(h.postPort))
	mux.HandleFunc("DELETE /v1/ports/{id}", h.needPorts(h.deletePort))
	// Known paths with the wrong method, and unknown paths: JSON errors
	// too, rather than the mux's plain text.
	mux.Handle("/v1/info", methodNotAllowed("GET"))
	mux.Handle("/v1/ports", methodNotAllowed("GET, POST"))
	mux.Handle("/v1/ports/{id}", methodNotAllowed("DELETE"))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, fmt.Errorf("no such API endpoint: %s %s (this is RootlessKit's API v1: /v1/info, /v1/ports, /v1/ports/{id})", r.Method, r.URL.Path))
	})
	return mux
}

type handler struct {
	pd   port.Manager
	info func() Info
	log  *slog.Logger
}

// errNoPortDriver answers port calls when gonetns publishes no ports.
var errNoPortDriver = errors.New("no port driver is available: with --net=host the command's ports are the host's already, with nothing to publish; with --port-driver=none, restart gonetns with --port-driver=builtin to publish ports")

func (h *handler) needPorts(f http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if h.pd == nil {
			writeError(w, http.StatusBadRequest, errNoPortDriver)
			return
		}
		f(w, r)
	}
}

func methodNotAllowed(allow string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Allow", allow)
		writeError(w, http.StatusMethodNotAllowed, fmt.Errorf("method %s is not allowed on %s, only %s", r.Method, r.URL.Path, allow))
	})
}

func (h *handler) getInfo(w http.ResponseWriter, r *http.Request) {
	var info Info
	if h.info != nil {
		info = h.info()
	}
	if info.APIVersion == "" {
		info.APIVersion = Version
	}
	writeJSON(w, http.StatusOK, info)
}

func (h *handler) getPorts(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, h.pd.ListPorts())
}

func (h *handler) postPort(w http.ResponseWriter, r *http.Request) {
	spec, err := DecodeSpec(http.MaxBytesReader(w, r.Body, maxRequestBody))
	if err != nil {
		writeError(w, http.StatusBadRequest, err)
		return
	}
	st, err := h.pd.AddPort(r.Context(), spec)
	if err != nil {
		writeError(w, addPortStatus(err), err)
		return
	}
	writeJSON(w, http.StatusCreated, st)
	// An add happens and is answered, or does not happen: a client that
	// never learns the new port's ID cannot remove it, so if the answer
	// cannot be handed to the connection (the client has gone, or the
	// write timed out), the port is removed again.
	if err := http.NewResponseController(w).Flush(); err != nil {
		rerr := h.pd.RemovePort(st.ID)
		h.log.Debug("api: the answer to an add could not be written; the port is removed again", "id", st.ID, "spec", st.Spec.String(), "err", err, "remove_err", rerr)
	}
}

// DecodeSpec reads the body of POST /v1/ports: exactly one JSON object
// with the fields of a port spec and nothing after it. Unknown fields are
// refused rather than ignored, so a misspelt "childPort" is an error, not
// a port published somewhere else.
func DecodeSpec(r io.Reader) (port.Spec, error) {
	var spec port.Spec
	dec := json.NewDecoder(r)
	dec.DisallowUnknownFields()
	err := dec.Decode(&spec)
	if err == nil {
		if _, terr := dec.Token(); terr != io.EOF {
			err = errors.New("data after the JSON object")
		}
	}
	if err != nil {
		return port.Spec{}, fmt.Errorf("bad request body: %v; want one port spec like {\"proto\":\"tcp\",\"parentIP\":\"127.0.0.1\",\"parentPort\":8080,\"childPort\":80}: %w", err, port.ErrInvalidSpec)
	}
	return spec, nil
}

// addPortStatus maps an AddPort error to an HTTP status. RootlessKit
// answers 400 to all of them; the finer codes keep that class.
func addPortStatus(err error) int {
	switch {
	case errors.Is(err, port.ErrInvalidSpec):
		return http.StatusBadRequest
	case errors.Is(err, port.ErrConflict), errors.Is(err, syscall.EADDRINUSE):
		return http.StatusConflict
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		return http.StatusForbidden
	case errors.Is(err, net.ErrClosed):
		return http.StatusServiceUnavailable
	}
	return http.StatusBadRequest
}

func (h *handler) deletePort(w http.ResponseWriter, r *http.Request) {
	idText := r.PathValue("id")
	id, err := strconv.Atoi(idText)
	if err != nil {
		writeError(w, http.StatusBadRequest, fmt.Errorf("bad port ID %q: want the number list-ports shows", idText))
		return
	}
	if err := h.pd.RemovePort(id); err != nil {
		code := http.StatusInternalServerError
		if errors.Is(err, port.ErrUnknownPort) {
			code = http.StatusNotFound
		}
		writeError(w, code, err)
		return
	}
	w.WriteHeader(http.StatusOK)
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		writeError(w, http.StatusInternalServerError, err)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	// Said, not left to net/http: an answer flushed before the handler
	// returns (postPort) would go out chunked without it.
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(code)
	w.Write(b)
}

// writeError writes RootlessKit's error body, {"message": "..."} and a
// newline.
func writeError(w http.ResponseWriter, code int, err error) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(errorBody{Message: err.Error()})
}

// Listen listens on a unix socket at path for the REST API. The socket is
// created with mode 0600 (set on the socket before bind, so it is never
// wider). A socket file left at path by an instance that has exited is
// removed; if something answers there, Listen fails instead, naming path.
// Closing the listener removes the socket file.
func Listen(path string) (*net.UnixListener, error) {
	fi, err := os.Lstat(path)
	switch {
	case err == nil && fi.Mode().Type() != fs.ModeSocket:
		return nil, fmt.Errorf("listen for the API on %s: the path exists and is not a socket; remove it or choose another state directory", path)
	case err == nil:
		c, derr := net.DialTimeout("unix", path, time.Second)
		if derr == nil {
			c.Close()
			return nil, fmt.Errorf("listen for the API on %s: another instance (gonetns or RootlessKit) is serving there; stop it or use another state directory", path)
		}
		if !errors.Is(derr, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("listen for the API on %s: cannot tell whether the socket there is stale: %w", path, derr)
		}
		// Nothing accepts: left behind by an instance that is gone.
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("listen for the API on %s: remove the stale socket: %w", path, err)
		}
	case !errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("listen for the API on %s: %w", path, err)
	}
	lc := net.ListenConfig{
		// Runs between socket(2) and bind(2): bind creates the file with
		// the socket inode's mode (less the umask), so it is 0600 from
		// the start, with no chmod window after.
		Control: func(_, _ string, rc syscall.RawConn) error {
			var ferr error
			if err := rc.Control(func(fd uintptr) { ferr = unix.Fchmod(int(fd), 0o600) }); err != nil {
				return err
			}
			if ferr != nil {
				return fmt.Errorf("fchmod 0600: %w", ferr)
			}
			return nil
		},
	}
	ln, err := lc.Listen(context.Background(), "unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen for the API on %s: %w", path, err)
	}
	return ln.(*net.UnixListener), nil
}

// Limits of a Server. The API socket is reachable from inside the sandbox
// (the command runs as the same user), so a program there can open as
// many connections as it likes and send requests that never end: every
// connection is bounded in time, and in number by closing, when a new one
// needs its place, the connection that has kept the server waiting longest
// for its client (conns.go has the rule).
const (
	// DefaultMaxConns is the connection limit when ServerConfig.MaxConns
	// is zero, and gonetns's own upper cap (internal/fdbudget). A client
	// that sends its request promptly is never closed for the limit, so
	// the limit is also how many such requests are held at once before
	// new connections wait in the listen queue; 1,024 holds a burst of
	// 1,000 concurrent rootlessctl calls (a busy Docker makes a few).
	DefaultMaxConns = 1024
	// readHeaderTimeout and readTimeout bound the receipt of a request's
	// headers and of the whole request; a spec is a few hundred bytes
	// sent at once by every real client.
	readHeaderTimeout = 5 * time.Second
	readTimeout       = 10 * time.Second
	// writeTimeout bounds the answer; idleTimeout a kept-alive connection
	// between requests.
	writeTimeout = 10 * time.Second
	idleTimeout  = 30 * time.Second
)

// ServerConfig configures a Server.
type ServerConfig struct {
	// Ports is the port driver; nil means none (port calls get 400).
	Ports port.Manager
	// Info supplies GET /v1/info.
	Info func() Info
	// MaxConns bounds the open connections. A new connection beyond it
	// closes the one that has kept the server waiting longest for its
	// client: idle between requests, or with a request that stopped
	// arriving. A connection whose request has arrived (read, or still
	// in the socket waiting for a busy server) or is being handled is
	// never closed for the limit; when all are such, new connections
	// wait in the listen queue until one is answered. Zero means
	// DefaultMaxConns.
	MaxConns int
	// Logger gets the server's own errors (accept failures) at Debug.
	Logger *slog.Logger
}

// Server serves the API on a listener. It starts nothing until Serve.
type Server struct {
	cfg  ServerConfig
	http *http.Server
	log  *slog.Logger

	mu       sync.Mutex
	conns    connSet
	closed   bool
	done     chan struct{}
	served   bool
	handlers sync.WaitGroup // requests being handled, for Close
}

// connKey finds a request's connection in its context.
type connKey struct{}

// NewServer returns a Server for cfg. It starts nothing.
func NewServer(cfg ServerConfig) *Server {
	if cfg.MaxConns <= 0 {
		cfg.MaxConns = DefaultMaxConns
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Server{cfg: cfg, log: cfg.Logger, done: make(chan struct{})}
	s.conns.init(&s.mu, cfg.MaxConns)
	s.http = &http.Server{
		Handler:           s.handle(newHandler(cfg.Ports, cfg.Info, cfg.Logger)),
		ConnContext:       func(ctx context.Context, c net.Conn) context.Context { return context.WithValue(ctx, connKey{}, c) },
		ReadHeaderTimeout: readHeaderTimeout,
		ReadTimeout:       readTimeout,
		WriteTimeout:      writeTimeout,
		IdleTimeout:       idleTimeout,
		MaxHeaderBytes:    16 << 10,
		ConnState:         s.connState,
		ErrorLog:          slog.NewLogLogger(cfg.Logger.Handler(), slog.LevelDebug),
	}
	return s
}

// Serve serves ln on a goroutine of its own until Close, which closes ln.
func (s *Server) Serve(ln net.Listener) {
	s.mu.Lock()
	if s.closed || s.served {
		s.mu.Unlock()
		ln.Close()
		return
	}
	s.served = true
	s.mu.Unlock()
	go func() {
		defer close(s.done)
		if err := s.http.Serve(&listener{Listener: ln, s: s}); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Warn("the REST API stopped serving", "err", err)
		}
	}()
}

// Stats reports the connections open, the limit and what the limit did.
func (s *Server) Stats() ConnStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.conns.stats
}

// handle reads a request whole (a body too, bounded in size by
// maxRequestBody and in time by readTimeout) before it counts as being
// handled: from then on Close waits for it.
func (s *Server) handle(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxRequestBody))
		if err != nil {
			writeError(w, http.StatusBadRequest, fmt.Errorf("read the request body: %w", err))
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		c, _ := r.Context().Value(connKey{}).(*apiConn)
		if !s.begin(c) {
			writeError(w, http.StatusServiceUnavailable, errors.New("the API is shutting down"))
			return
		}
		h.ServeHTTP(w, r)
	})
}

// begin marks c's request as being handled; false once Close has begun.
// It stays so until net/http has written the answer out and the connection
// turns idle or closes (connState): the handler returning is not enough, as
// the answer may still sit in the connection's buffer.
func (s *Server) begin(c *apiConn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	if c != nil && !c.gone && !c.busy {
		s.conns.setBusyLocked(c, true)
		s.handlers.Add(1)
	}
	return true
}

// endLocked ends what begin began for c, if anything.
func (s *Server) endLocked(c *apiConn) {
	if c.busy {
		s.conns.setBusyLocked(c, false)
		s.handlers.Done()
	}
}

// connState follows what net/http does with a connection; it runs on the
// connection's own goroutine, before a request is read and after it is
// answered.
func (s *Server) connState(nc net.Conn, st http.ConnState) {
	c, ok := nc.(*apiConn)
	if !ok {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	switch st {
	case http.StateIdle:
		s.endLocked(c)
	case http.StateHijacked, http.StateClosed:
		s.endLocked(c)
		s.conns.removeLocked(c)
	}
}

// Close stops serving, closes the listener and every connection, and waits
// for the serving goroutine. Idempotent.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		<-s.done
		return nil
	}
	s.closed = true
	served := s.served
	s.mu.Unlock()
	// Requests being handled finish (a port being added is added or not,
	// and its client gets the answer); nothing else waits.
	s.handlers.Wait()
	err := s.http.Close() // closes the listener, which wakes a waiting Accept
	if served {
		<-s.done
	} else {
		close(s.done)
	}
	return err
}
