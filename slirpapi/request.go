// Package slirpapi serves slirp4netns's API socket (slirp4netns
// --api-socket) over a port driver: the QMP-like JSON protocol with one
// request per connection that Podman (port_handler=slirp4netns) and
// RootlessKit 1.x/2.x (--port-driver=slirp4netns) speak to publish ports:
// add_hostfwd, list_hostfwd, remove_hostfwd, and slirp4netns's error
// texts.
package slirpapi

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/netip"
	"strings"
)

// MaxRequest is the longest request: slirp4netns reads one buffer of 4096
// bytes and refuses a request that fills it.
const MaxRequest = 4095

// The commands of the protocol.
const (
	cmdAdd    = "add_hostfwd"
	cmdList   = "list_hostfwd"
	cmdRemove = "remove_hostfwd"
)

// Error is an answer {"error":{"desc":...}}: its text is slirp4netns's,
// which callers show and grep ("bad request: add_hostfwd: bad
// arguments.proto"), with gonetns's reason after it where slirp4netns has
// none to give.
type Error struct {
	Desc string
}

func (e *Error) Error() string { return e.Desc }

// Errors of requests, in slirp4netns's words.
var (
	errParse     = &Error{"bad request: cannot parse JSON"}
	errNotObject = &Error{"bad request: json_object() failed"}
	errNoExecute = &Error{"bad request: no execute found"}
	errUnknown   = &Error{"bad request: unknown execute"}
	errTooLarge  = &Error{"bad request: too large message"}
)

func badArgument(cmd, name string) *Error {
	return &Error{fmt.Sprintf("bad request: %s: bad arguments.%s", cmd, name)}
}

// Request is one parsed request.
type Request struct {
	// Execute is add_hostfwd, list_hostfwd or remove_hostfwd.
	Execute string
	// Forward is add_hostfwd's.
	Forward Forward
	// ID is remove_hostfwd's.
	ID int
}

// Forward is the argument of add_hostfwd.
type Forward struct {
	// Proto is tcp or udp, or (as slirp4netns's IPv6 work names them)
	// tcp4, tcp6, udp4, udp6 for one family of the host's side.
	Proto string
	// HostAddr is the address to listen on; unspecified (0.0.0.0, "::"
	// or absent) means every address, of both families when the sandbox
	// has IPv6 (or the protocol says which).
	HostAddr netip.Addr
	HostPort int
	// GuestAddr is where connections go inside; invalid means the
	// namespace's own address (.100, or fd00::100 for IPv6 clients when
	// the sandbox has IPv6).
	GuestAddr netip.Addr
	GuestPort int
}

// ParseRequest parses one request. Its error is an *Error to send back.
func ParseRequest(b []byte) (Request, error) {
	if len(b) > MaxRequest {
		return Request{}, errTooLarge
	}
	top, err := decodeValue(b)
	if err != nil {
		return Request{}, err
	}
	obj, ok := top.(map[string]any)
	if !ok {
		return Request{}, errNotObject
	}
	execute, ok := obj["execute"].(string)
	if !ok {
		return Request{}, errNoExecute
	}
	args, _ := obj["arguments"].(map[string]any) // absent or not an object: none
	req := Request{Execute: execute}
	switch execute {
	case cmdAdd:
		req.Forward, err = parseForward(args)
	case cmdList:
	case cmdRemove:
		id, ok := integer(args["id"], 1, math.MaxInt32)
		if !ok {
			return Request{}, badArgument(cmdRemove, "id")
		}
		req.ID = id
	default:
		return Request{}, errUnknown
	}
	return req, err
}

func parseForward(args map[string]any) (Forward, error) {
	var f Forward
	proto, _ := args["proto"].(string)
	switch proto {
	case "tcp", "udp", "tcp4", "udp4", "tcp6", "udp6":
		f.Proto = proto
	default:
		return f, badArgument(cmdAdd, "proto")
	}
	var ok bool
	if f.HostAddr, ok = address(args, "host_addr"); !ok {
		return f, badArgument(cmdAdd, "host_addr")
	}
	if !f.HostAddr.IsValid() {
		f.HostAddr = netip.IPv4Unspecified()
	}
	switch {
	case strings.HasSuffix(f.Proto, "4") && !f.HostAddr.Is4(),
		strings.HasSuffix(f.Proto, "6") && !f.HostAddr.Is6() && !f.HostAddr.IsUnspecified():
		return f, badArgument(cmdAdd, "host_addr")
	}
	if f.HostPort, ok = integer(args["host_port"], 1, 65535); !ok {
		return f, badArgument(cmdAdd, "host_port")
	}
	if f.GuestAddr, ok = address(args, "guest_addr"); !ok {
		return f, badArgument(cmdAdd, "guest_addr")
	}
	if f.GuestPort, ok = integer(args["guest_port"], 1, 65535); !ok {
		return f, badArgument(cmdAdd, "guest_port")
	}
	return f, nil
}

// address reads an optional address argument: absent or "" is the zero
// Addr. IPv4-mapped and zoned addresses are refused (a zone names an
// interface of the host, and a mapped address is an IPv4 one in
// disguise).
func address(args map[string]any, name string) (netip.Addr, bool) {
	v, present := args[name]
	if !present {
		return netip.Addr{}, true
	}
	s, ok := v.(string)
	if !ok {
		return netip.Addr{}, false
	}
	if s == "" {
		return netip.Addr{}, true
	}
	a, err := netip.ParseAddr(s)
	if err != nil || a.Is4In6() || a.Zone() != "" {
		return netip.Addr{}, false
	}
	return a, true
}

// integer reads a JSON number that is a whole number in lo..hi (8080 and
// 8080.0, not 8080.5, "8080" or 1e100).
func integer(v any, lo, hi int) (int, bool) {
	n, ok := v.(json.Number)
	if !ok {
		return 0, false
	}
	f, err := n.Float64()
	if err != nil || f != math.Trunc(f) || f < float64(lo) || f > float64(hi) {
		return 0, false
	}
	return int(f), true
}

// decodeValue decodes the first JSON value of b, numbers kept as
// json.Number. Like slirp4netns's parser it ignores what follows the
// value, and refuses an object with the same key twice, which parsers
// read differently.
func decodeValue(b []byte) (any, error) {
	d := json.NewDecoder(bytes.NewReader(b))
	d.UseNumber()
	v, err := value(d, 0)
	if err != nil {
		return nil, errParse
	}
	return v, nil
}

// maxDepth bounds nesting: a request is two objects deep.
const maxDepth = 32

var errDepth = errors.New("too deeply nested")

func value(d *json.Decoder, depth int) (any, error) {
	if depth > maxDepth {
		return nil, errDepth
	}
	t, err := d.Token()
	if err != nil {
		return nil, err
	}
	switch t := t.(type) {
	case json.Delim:
		switch t {
		case '{':
			obj := map[string]any{}
			for d.More() {
				kt, err := d.Token()
				if err != nil {
					return nil, err
				}
				k, ok := kt.(string)
				if !ok {
					return nil, fmt.Errorf("key %v is not a string", kt)
				}
				if _, dup := obj[k]; dup {
					return nil, fmt.Errorf("key %q twice", k)
				}
				if obj[k], err = value(d, depth+1); err != nil {
					return nil, err
				}
			}
			if _, err := d.Token(); err != nil { // '}'
				return nil, err
			}
			return obj, nil
		case '[':
			var arr []any
			for d.More() {
				v, err := value(d, depth+1)
				if err != nil {
					return nil, err
				}
				arr = append(arr, v)
			}
			if _, err := d.Token(); err != nil { // ']'
				return nil, err
			}
			return arr, nil
		}
		return nil, fmt.Errorf("unexpected %v", t)
	case nil:
		return nil, nil
	}
	return t, nil
}

// readRequest reads a request from a client: up to its end of stream
// (slirp4netns asks clients to shut down their writing side after the
// request), or as soon as what arrived starts with one whole JSON value,
// for a client that waits for the answer without shutting down; what
// follows the value is left to the parser, which ignores it as
// slirp4netns does. A client that sent two requests in one write and
// waited was never answered (requestTimeout closed it after 10 s;
// slirp4netns answers the first at once). More than MaxRequest bytes is
// errTooLarge.
func readRequest(r io.Reader) ([]byte, error) {
	buf := make([]byte, 0, 512)
	chunk := make([]byte, 4096)
	for {
		n, err := r.Read(chunk)
		buf = append(buf, chunk[:n]...)
		if len(buf) > MaxRequest {
			return nil, errTooLarge
		}
		if err == io.EOF {
			return buf, nil
		}
		if err != nil {
			return nil, err
		}
		if n > 0 && firstValueRead(buf) {
			return buf, nil
		}
	}
}

// firstValueRead reports whether buf starts with a whole JSON value.
func firstValueRead(buf []byte) bool {
	var v json.RawMessage
	return json.NewDecoder(bytes.NewReader(buf)).Decode(&v) == nil
}
