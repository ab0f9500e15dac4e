package portfwd

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// APIVersion is the RootlessKit REST API version served (not gonetns's
// version).
const APIVersion = "1.1.1"

// Info is the body of GET /v1/info, RootlessKit's api.Info.
type Info struct {
	APIVersion    string             `json:"apiVersion"` // REST API version; empty means APIVersion
	Version       string             `json:"version"`    // gonetns's version
	StateDir      string             `json:"stateDir"`
	ChildPID      int                `json:"childPID"`
	NetworkDriver *NetworkDriverInfo `json:"networkDriver,omitempty"`
	PortDriver    *PortDriverInfo    `json:"portDriver,omitempty"` // nil means the Manager's
}

// NetworkDriverInfo is RootlessKit's api.NetworkDriverInfo.
type NetworkDriverInfo struct {
	Driver         string       `json:"driver"`
	DNS            []netip.Addr `json:"dns,omitempty"`
	ChildIP        netip.Addr   `json:"childIP,omitzero"`
	DynamicChildIP bool         `json:"dynamicChildIP,omitempty"`
}

// PortDriverInfo is RootlessKit's api.PortDriverInfo.
type PortDriverInfo struct {
	Driver                  string   `json:"driver"`
	Protos                  []string `json:"protos"`
	DisallowLoopbackChildIP bool     `json:"disallowLoopbackChildIP"`
}

// errorBody is the body of every error response, RootlessKit's
// httputil.ErrorJSON.
type errorBody struct {
	Message string `json:"message"`
}

// maxRequestBody bounds a POST body; a spec is under 200 bytes.
const maxRequestBody = 64 << 10

// NewAPIHandler serves RootlessKit's REST API v1 for m, so that rootlessctl
// and other RootlessKit clients work unchanged:
//
//	GET    /v1/info        Info
//	GET    /v1/ports       [Status...] sorted by ID
//	POST   /v1/ports       body: Spec; 201 and the new Status
//	DELETE /v1/ports/{id}  200, empty body; 404 for an unknown id
//
// Errors are 4xx or 5xx with {"message": "..."}. The host part of the URL
// is ignored. info supplies what the Manager does not know (version, state
// dir, child PID, network); it may be nil. With a nil m there is no port
// driver: info answers without one and the port calls fail with 400, as
// RootlessKit's do.
func NewAPIHandler(m *Manager, info func() Info) http.Handler {
	h := &apiHandler{m: m, info: info}
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

type apiHandler struct {
	m    *Manager
	info func() Info
}

// errNoPortDriver answers port calls when gonetns publishes no ports.
var errNoPortDriver = errors.New("no port driver is available: gonetns runs with --port-driver=none (or --net=host); restart it with --port-driver=builtin to publish ports")

func (h *apiHandler) needPorts(f http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if h.m == nil {
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

func (h *apiHandler) getInfo(w http.ResponseWriter, r *http.Request) {
	var info Info
	if h.info != nil {
		info = h.info()
	}
	if info.APIVersion == "" {
		info.APIVersion = APIVersion
	}
	if info.PortDriver == nil && h.m != nil {
		pd := h.m.PortDriverInfo()
		info.PortDriver = &pd
	}
	writeJSON(w, http.StatusOK, info)
}

func (h *apiHandler) getPorts(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, h.m.ListPorts())
}

func (h *apiHandler) postPort(w http.ResponseWriter, r *http.Request) {
	var spec Spec
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxRequestBody))
	if err := dec.Decode(&spec); err != nil {
		writeError(w, http.StatusBadRequest, fmt.Errorf("bad request body: %v; want a port spec like {\"proto\":\"tcp\",\"parentIP\":\"127.0.0.1\",\"parentPort\":8080,\"childPort\":80}", err))
		return
	}
	st, err := h.m.AddPort(r.Context(), spec)
	if err != nil {
		writeError(w, addPortStatus(err), err)
		return
	}
	writeJSON(w, http.StatusCreated, st)
}

// addPortStatus maps an AddPort error to an HTTP status. RootlessKit
// answers 400 to all of them; the finer codes keep that class.
func addPortStatus(err error) int {
	switch {
	case errors.Is(err, ErrInvalidSpec):
		return http.StatusBadRequest
	case errors.Is(err, ErrConflict), errors.Is(err, syscall.EADDRINUSE):
		return http.StatusConflict
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		return http.StatusForbidden
	case errors.Is(err, net.ErrClosed):
		return http.StatusServiceUnavailable
	}
	return http.StatusBadRequest
}

func (h *apiHandler) deletePort(w http.ResponseWriter, r *http.Request) {
	idText := r.PathValue("id")
	id, err := strconv.Atoi(idText)
	if err != nil {
		writeError(w, http.StatusBadRequest, fmt.Errorf("bad port ID %q: want the number list-ports shows", idText))
		return
	}
	if err := h.m.RemovePort(id); err != nil {
		code := http.StatusInternalServerError
		if errors.Is(err, ErrUnknownPort) {
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

// ListenAPI listens on a unix socket at path for the REST API. The socket
// is created with mode 0600 (set on the socket before bind, so it is never
// wider). A socket file left at path by an instance that has exited is
// removed; if something answers there, ListenAPI fails instead, naming
// path. Closing the listener removes the socket file.
func ListenAPI(path string) (net.Listener, error) {
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
	return ln, nil
}
