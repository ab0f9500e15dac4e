package slirpapi

import (
	"encoding/json"
	"errors"
	"io"
	"net/netip"
	"strings"
	"testing"
	"testing/iotest"
)

func TestParseRequest(t *testing.T) {
	v4 := netip.MustParseAddr
	good := []struct {
		in   string
		want Request
	}{
		// slirp4netns's and its callers' requests.
		{`{"execute": "add_hostfwd", "arguments": {"proto": "tcp", "host_addr": "0.0.0.0", "host_port": 8080, "guest_addr": "10.0.2.100", "guest_port": 80}}`,
			Request{Execute: "add_hostfwd", Forward: Forward{Proto: "tcp", HostAddr: v4("0.0.0.0"), HostPort: 8080, GuestAddr: v4("10.0.2.100"), GuestPort: 80}}},
		// Podman 4.3: guest_addr "", a newline after the JSON.
		{`{"execute":"add_hostfwd","arguments":{"proto":"udp","host_addr":"0.0.0.0","host_port":8080,"guest_addr":"","guest_port":80}}` + "\n",
			Request{Execute: "add_hostfwd", Forward: Forward{Proto: "udp", HostAddr: v4("0.0.0.0"), HostPort: 8080, GuestPort: 80}}},
		// Absent host_addr is 0.0.0.0 (slirp4netns's test).
		{`{"execute": "add_hostfwd", "arguments":{"proto": "tcp","host_port":8080,"guest_port":80}}`,
			Request{Execute: "add_hostfwd", Forward: Forward{Proto: "tcp", HostAddr: v4("0.0.0.0"), HostPort: 8080, GuestPort: 80}}},
		{`{"execute":"add_hostfwd","arguments":{"proto":"tcp6","host_addr":"::1","host_port":1,"guest_addr":"fd00::100","guest_port":65535}}`,
			Request{Execute: "add_hostfwd", Forward: Forward{Proto: "tcp6", HostAddr: v4("::1"), HostPort: 1, GuestAddr: v4("fd00::100"), GuestPort: 65535}}},
		{`{"execute":"add_hostfwd","arguments":{"proto":"udp4","host_addr":"127.0.0.1","host_port":8080.0,"guest_port":80}}`,
			Request{Execute: "add_hostfwd", Forward: Forward{Proto: "udp4", HostAddr: v4("127.0.0.1"), HostPort: 8080, GuestPort: 80}}},
		{`{"execute":"add_hostfwd","arguments":{"proto":"tcp6","host_addr":"0.0.0.0","host_port":80,"guest_port":80}}`,
			Request{Execute: "add_hostfwd", Forward: Forward{Proto: "tcp6", HostAddr: v4("0.0.0.0"), HostPort: 80, GuestPort: 80}}},
		{`{"execute": "list_hostfwd"}`, Request{Execute: "list_hostfwd"}},
		{` {"execute" : "list_hostfwd", "arguments": "ignored"} and what follows`, Request{Execute: "list_hostfwd"}},
		{`{"execute": "remove_hostfwd", "arguments": {"id": 42}}`, Request{Execute: "remove_hostfwd", ID: 42}},
	}
	for _, tc := range good {
		got, err := ParseRequest([]byte(tc.in))
		if err != nil {
			t.Errorf("ParseRequest(%s): %v", tc.in, err)
			continue
		}
		if got != tc.want {
			t.Errorf("ParseRequest(%s) = %+v, want %+v", tc.in, got, tc.want)
		}
	}

	bad := []struct{ in, want string }{
		// slirp4netns's own test's requests and texts.
		{`badjson`, "bad request: cannot parse JSON"},
		{`{"unexpectedjson": 42}`, "bad request: no execute found"},
		{`{"execute": "bad"}`, "bad request: unknown execute"},
		{`{"execute": "add_hostfwd", "arguments":{"proto": "bad"}}`, "bad request: add_hostfwd: bad arguments.proto"},
		// Others, as slirp4netns answers them.
		{``, "bad request: cannot parse JSON"},
		{`{"execute": "list_hostfwd"`, "bad request: cannot parse JSON"},
		{`{"execute":"list_hostfwd","execute":"bad"}`, "bad request: cannot parse JSON"},
		{`[1,2]`, "bad request: json_object() failed"},
		{`"add_hostfwd"`, "bad request: json_object() failed"},
		{`{"execute": 5}`, "bad request: no execute found"},
		{`{"Execute": "list_hostfwd"}`, "bad request: no execute found"},
		{`{"execute": "add_hostfwd"}`, "bad request: add_hostfwd: bad arguments.proto"},
		{`{"execute": "add_hostfwd", "arguments": []}`, "bad request: add_hostfwd: bad arguments.proto"},
		{`{"execute": "add_hostfwd", "arguments":{"proto": "TCP","host_port":1,"guest_port":1}}`, "bad arguments.proto"},
		{`{"execute": "add_hostfwd", "arguments":{"proto": "sctp","host_port":1,"guest_port":1}}`, "bad arguments.proto"},
		{`{"execute": "add_hostfwd", "arguments":{"proto": "tcp","host_addr":"localhost","host_port":1,"guest_port":1}}`, "bad arguments.host_addr"},
		{`{"execute": "add_hostfwd", "arguments":{"proto": "tcp","host_addr":7,"host_port":1,"guest_port":1}}`, "bad arguments.host_addr"},
		{`{"execute": "add_hostfwd", "arguments":{"proto": "tcp4","host_addr":"::","host_port":1,"guest_port":1}}`, "bad arguments.host_addr"},
		{`{"execute": "add_hostfwd", "arguments":{"proto": "tcp6","host_addr":"127.0.0.1","host_port":1,"guest_port":1}}`, "bad arguments.host_addr"},
		{`{"execute": "add_hostfwd", "arguments":{"proto": "tcp","host_addr":"::ffff:127.0.0.1","host_port":1,"guest_port":1}}`, "bad arguments.host_addr"},
		{`{"execute": "add_hostfwd", "arguments":{"proto": "tcp","host_addr":"fe80::1%eth0","host_port":1,"guest_port":1}}`, "bad arguments.host_addr"},
		{`{"execute": "add_hostfwd", "arguments":{"proto": "tcp","guest_port":80}}`, "bad request: add_hostfwd: bad arguments.host_port"},
		{`{"execute": "add_hostfwd", "arguments":{"proto": "tcp","host_port":0,"guest_port":80}}`, "bad arguments.host_port"},
		{`{"execute": "add_hostfwd", "arguments":{"proto": "tcp","host_port":70000,"guest_port":80}}`, "bad arguments.host_port"},
		{`{"execute": "add_hostfwd", "arguments":{"proto": "tcp","host_port":-1,"guest_port":80}}`, "bad arguments.host_port"},
		{`{"execute": "add_hostfwd", "arguments":{"proto": "tcp","host_port":"8080","guest_port":80}}`, "bad arguments.host_port"},
		{`{"execute": "add_hostfwd", "arguments":{"proto": "tcp","host_port":80.5,"guest_port":80}}`, "bad arguments.host_port"},
		{`{"execute": "add_hostfwd", "arguments":{"proto": "tcp","host_port":1e400,"guest_port":80}}`, "bad arguments.host_port"},
		{`{"execute": "add_hostfwd", "arguments":{"proto": "tcp","host_port":8080,"guest_addr":"x","guest_port":80}}`, "bad request: add_hostfwd: bad arguments.guest_addr"},
		{`{"execute": "add_hostfwd", "arguments":{"proto": "udp","host_port":8080}}`, "bad request: add_hostfwd: bad arguments.guest_port"},
		{`{"execute": "add_hostfwd", "arguments":{"proto": "udp","host_port":8080,"guest_port":65536}}`, "bad arguments.guest_port"},
		{`{"execute": "remove_hostfwd"}`, "bad request: remove_hostfwd: bad arguments.id"},
		{`{"execute": "remove_hostfwd", "arguments": {"id": "1"}}`, "bad request: remove_hostfwd: bad arguments.id"},
		{`{"execute": "remove_hostfwd", "arguments": {"id": 0}}`, "bad request: remove_hostfwd: bad arguments.id"},
		{strings.Repeat("[", 100) + strings.Repeat("]", 100), "bad request: cannot parse JSON"},
		{strings.Repeat(" ", MaxRequest+1), "bad request: too large message"},
	}
	for _, tc := range bad {
		_, err := ParseRequest([]byte(tc.in))
		var e *Error
		if !errors.As(err, &e) || !strings.Contains(e.Desc, tc.want) {
			t.Errorf("ParseRequest(%.60s) = %v; want an *Error with %q", tc.in, err, tc.want)
		}
	}
}

func TestReadRequest(t *testing.T) {
	req := `{"execute": "list_hostfwd"}`
	cases := []struct {
		name string
		r    io.Reader
		want string
		err  error
	}{
		{"shut down after the request", strings.NewReader(req), req, nil},
		// A client that waits for the answer without shutting down: the
		// request is complete once it is one JSON value.
		{"no shutdown", io.MultiReader(iotest.OneByteReader(strings.NewReader(req)), blockingReader{}), req, nil},
		// Two requests in one write, or one and more bytes, without a
		// shutdown: the first is answered (slirp4netns's parser reads the
		// first value).
		{"two requests, no shutdown", io.MultiReader(strings.NewReader(req+req), blockingReader{}), req + req, nil},
		{"a request and more, no shutdown", io.MultiReader(strings.NewReader(req+" x"), blockingReader{}), req + " x", nil},
		{"half a request, then the rest", io.MultiReader(strings.NewReader(req[:10]), strings.NewReader(req[10:]), blockingReader{}), req, nil},
		{"empty", strings.NewReader(""), "", nil},
		{"broken JSON, then end", strings.NewReader("badjson"), "badjson", nil},
		{"too large", strings.NewReader(strings.Repeat("x", MaxRequest+1)), "", errTooLarge},
		{"largest", strings.NewReader(strings.Repeat(" ", MaxRequest-len(req)) + req), strings.Repeat(" ", MaxRequest-len(req)) + req, nil},
	}
	for _, tc := range cases {
		got, err := readRequest(tc.r)
		if !errors.Is(err, tc.err) || (err == nil && string(got) != tc.want) {
			t.Errorf("%s: readRequest = %.40q, %v; want %.40q, %v", tc.name, got, err, tc.want, tc.err)
		}
	}
}

// blockingReader fails the test's reader if read: a request must be
// complete without it.
type blockingReader struct{}

func (blockingReader) Read([]byte) (int, error) { panic("read past a complete request") }

func FuzzParseRequest(f *testing.F) {
	for _, s := range []string{
		`{"execute": "add_hostfwd", "arguments": {"proto": "tcp", "host_addr": "0.0.0.0", "host_port": 8080, "guest_addr": "10.0.2.100", "guest_port": 80}}`,
		`{"execute":"add_hostfwd","arguments":{"proto":"tcp6","host_addr":"::1","host_port":1,"guest_addr":"fd00::100","guest_port":65535}}`,
		`{"execute": "list_hostfwd"}`,
		`{"execute": "remove_hostfwd", "arguments": {"id": 42}}`,
		`{"execute":"list_hostfwd","execute":"bad"}`,
		`[{"a":[1,{"b":null}]},true,false,"x"]`,
		`{"execute": "add_hostfwd", "arguments":{"proto": "tcp","host_port":1e400}}`,
		"badjson",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		req, err := ParseRequest(b)
		if err != nil {
			var e *Error
			if !errors.As(err, &e) || !strings.HasPrefix(e.Desc, "bad request: ") {
				t.Fatalf("ParseRequest(%q): %v is not an answer for the client", b, err)
			}
			var ans struct{ Error struct{ Desc string } }
			if json.Unmarshal(errorAnswer(err), &ans) != nil || ans.Error.Desc != e.Desc {
				t.Fatalf("answer to %q: %s", b, errorAnswer(err))
			}
			return
		}
		switch req.Execute {
		case cmdAdd:
			f := req.Forward
			if f.HostPort < 1 || f.HostPort > 65535 || f.GuestPort < 1 || f.GuestPort > 65535 || !f.HostAddr.IsValid() {
				t.Fatalf("ParseRequest(%q) = %+v: out of range", b, f)
			}
		case cmdRemove:
			if req.ID < 1 {
				t.Fatalf("ParseRequest(%q): id %d", b, req.ID)
			}
		case cmdList:
		default:
			t.Fatalf("ParseRequest(%q): execute %q", b, req.Execute)
		}
	})
}
