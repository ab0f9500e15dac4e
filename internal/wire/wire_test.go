package wire

import (
	"errors"
	"io"
	"net/netip"
	"os"
	"strings"
	"testing"
)

func pair(t *testing.T) (*Conn, *Conn) {
	t.Helper()
	a, b, err := Socketpair()
	if err != nil {
		t.Fatal(err)
	}
	ca, err := FileConn(a)
	a.Close()
	if err != nil {
		t.Fatal(err)
	}
	cb, err := FileConn(b)
	b.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ca.Close(); cb.Close() })
	return ca, cb
}

type msg struct {
	Type string `json:"type"`
	N    int    `json:"n"`
}

func TestSendRecvWithFiles(t *testing.T) {
	a, b := pair(t)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if err := a.Send(msg{"pipe", 1}, w); err != nil {
		t.Fatal(err)
	}
	w.Close() // the receiver has its own copy now
	var m msg
	files, err := b.Recv(&m)
	if err != nil || m != (msg{"pipe", 1}) || len(files) != 1 {
		t.Fatalf("Recv = %+v, %d files, %v", m, len(files), err)
	}
	if _, err := files[0].WriteString("through the passed fd"); err != nil {
		t.Fatal(err)
	}
	files[0].Close()
	got, _ := io.ReadAll(r)
	if string(got) != "through the passed fd" {
		t.Errorf("read %q", got)
	}
}

func TestMessagesKeepBoundaries(t *testing.T) {
	a, b := pair(t)
	for i := range 3 {
		if err := a.Send(msg{"n", i}); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 3 {
		var m msg
		if _, err := b.Recv(&m); err != nil || m.N != i {
			t.Fatalf("message %d: %+v, %v", i, m, err)
		}
	}
}

func TestEOFAndLimits(t *testing.T) {
	a, b := pair(t)
	big := strings.Repeat("x", MaxMessage)
	if err := a.Send(big); err == nil {
		t.Error("a message over MaxMessage was sent")
	}
	files := make([]*os.File, MaxFiles+1)
	for i := range files {
		files[i] = os.Stdin
	}
	if err := a.Send(msg{}, files...); err == nil {
		t.Error("more than MaxFiles descriptors were sent")
	}
	a.Close()
	var m msg
	if _, err := b.Recv(&m); !errors.Is(err, io.EOF) {
		t.Errorf("Recv after the peer closed: %v, want io.EOF", err)
	}
}

func TestRecvBadJSON(t *testing.T) {
	a, b := pair(t)
	a.Send("not an object")
	var m msg
	if _, err := b.Recv(&m); err == nil || !strings.Contains(err.Error(), "decode") {
		t.Errorf("Recv of a string into a struct: %v", err)
	}
}

// Every decoding failure, a field's own included (a bad netip.Addr), is a
// bad message that spoils only itself.
func TestRecvBadMessage(t *testing.T) {
	a, b, err := Socketpair()
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	defer b.Close()
	ca, err := FileConn(a)
	if err != nil {
		t.Fatal(err)
	}
	defer ca.Close()
	cb, err := FileConn(b)
	if err != nil {
		t.Fatal(err)
	}
	defer cb.Close()
	type msg struct {
		Addr netip.Addr `json:"addr"`
	}
	for _, bad := range []any{map[string]string{"addr": "bogus"}, map[string]int{"addr": 7}, "not an object"} {
		if err := ca.Send(bad); err != nil {
			t.Fatal(err)
		}
		var m msg
		if _, err := cb.Recv(&m); !errors.Is(err, ErrBadMessage) {
			t.Errorf("Recv of %v: %v; want ErrBadMessage", bad, err)
		}
	}
	if err := ca.Send(msg{Addr: netip.MustParseAddr("10.0.2.100")}); err != nil {
		t.Fatal(err)
	}
	var m msg
	if _, err := cb.Recv(&m); err != nil || m.Addr.String() != "10.0.2.100" {
		t.Errorf("the message after bad ones: %+v, %v", m, err)
	}
}
