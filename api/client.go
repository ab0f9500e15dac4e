package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"github.com/gonetns/gonetns/port"
)

// Client talks to the REST API over its unix socket; it works against
// gonetns and RootlessKit alike. Its methods are safe for concurrent use.
type Client struct {
	socket string
	hc     *http.Client
}

// NewClient returns a Client for the API socket at socketPath. It connects
// on each call, not now.
func NewClient(socketPath string) *Client {
	return &Client{
		socket: socketPath,
		hc: &http.Client{
			Transport: &http.Transport{
				DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
					var d net.Dialer
					return d.DialContext(ctx, "unix", socketPath)
				},
				// One request per connection: a CLI makes a few, and no idle
				// connection (with its goroutines) outlives a call.
				DisableKeepAlives: true,
			},
		},
	}
}

// APIError is an error response of the API. Error returns the server's
// message. It matches ErrConflict (409) and ErrUnknownPort (404 on
// DELETE) of package portfwd with errors.Is.
type APIError struct {
	StatusCode int
	Message    string
	kind       error
}

func (e *APIError) Error() string { return e.Message }
func (e *APIError) Unwrap() error { return e.kind }

// Info returns GET /v1/info.
func (c *Client) Info(ctx context.Context) (Info, error) {
	var info Info
	err := c.do(ctx, http.MethodGet, "/v1/info", nil, &info)
	return info, err
}

// ListPorts returns GET /v1/ports.
func (c *Client) ListPorts(ctx context.Context) ([]port.Status, error) {
	var ports []port.Status
	err := c.do(ctx, http.MethodGet, "/v1/ports", nil, &ports)
	return ports, err
}

// AddPort publishes spec (POST /v1/ports) and returns its Status.
func (c *Client) AddPort(ctx context.Context, spec port.Spec) (port.Status, error) {
	body, err := json.Marshal(spec)
	if err != nil {
		return port.Status{}, err
	}
	var st port.Status
	err = c.do(ctx, http.MethodPost, "/v1/ports", body, &st)
	return st, err
}

// RemovePort unpublishes port id (DELETE /v1/ports/{id}).
func (c *Client) RemovePort(ctx context.Context, id int) error {
	return c.do(ctx, http.MethodDelete, "/v1/ports/"+strconv.Itoa(id), nil, nil)
}

// do makes one request; a non-2xx answer becomes an *APIError. The host in
// the URL is a dummy, as with RootlessKit's client.
func (c *Client) do(ctx context.Context, method, path string, body []byte, out any) error {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://gonetns"+path, rd)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("cannot reach the API at %s (is gonetns running, and is the socket path right?): %w", c.socket, unwrapURLError(err))
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return fmt.Errorf("%s %s: read the answer: %w", method, path, err)
	}
	if resp.StatusCode/100 != 2 {
		return newAPIError(method, resp.StatusCode, data)
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("%s %s: the API answered something that is not the expected JSON: %w", method, path, err)
	}
	return nil
}

func newAPIError(method string, code int, body []byte) *APIError {
	e := &APIError{StatusCode: code}
	var eb errorBody
	if json.Unmarshal(body, &eb) == nil && eb.Message != "" {
		e.Message = eb.Message
	} else {
		e.Message = fmt.Sprintf("the API answered %d %s: %q", code, http.StatusText(code), strings.TrimSpace(string(body)))
	}
	switch {
	case code == http.StatusNotFound && method == http.MethodDelete:
		e.kind = port.ErrUnknownPort
	case code == http.StatusConflict:
		e.kind = port.ErrConflict
	}
	return e
}

// unwrapURLError drops net/http's `Get "http://gonetns/v1/info":` prefix,
// which names a dummy host.
func unwrapURLError(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}
