package sandbox

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gonetns/gonetns/tap"
)

func TestTAPReason(t *testing.T) {
	for _, c := range []struct {
		err  error
		want string
	}{
		{fmt.Errorf("%w: %w. The tun driver is missing", tap.ErrTunAccess, syscall.ENOENT), "/dev/net/tun cannot be opened (no such file or directory)"},
		{fmt.Errorf("create TAP %q (TUNSETIFF): %w", "tap0", syscall.EPERM), `the TAP cannot be made (create TAP "tap0" (TUNSETIFF): operation not permitted)`},
	} {
		if got := tapReason(c.err); got != c.want {
			t.Errorf("tapReason(%v) = %q, want %q", c.err, got, c.want)
		}
	}
}

// With Link: LinkPacket the command reaches the host's loopback through
// the gateway over the packet link, and the API says which link it is.
func TestPacketLinkReachesHost(t *testing.T) {
	needRoot(t)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprintln(w, "hello from the host") })}
	go srv.Serve(ln)
	defer srv.Close()
	var out strings.Builder
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	port := ln.Addr().(*net.TCPAddr).Port
	code, err := Run(ctx, Config{Link: LinkPacket, MTU: 1500, Stdout: &out, Stderr: &out}, []string{"sh", "-c",
		fmt.Sprintf("cat /sys/class/net/tap0/mtu; wget -q -O- http://10.0.2.2:%d/ || curl -sS http://10.0.2.2:%d/", port, port)})
	if err != nil || code != 0 || out.String() != "1500\nhello from the host\n" {
		t.Errorf("on the packet link: %d, %v\n%s", code, err, out.String())
	}
}

func TestPacketLinkInfo(t *testing.T) {
	needRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, link := range []Link{LinkPacket, LinkAuto} {
		s, err := Start(ctx, Config{Link: link, Stdout: io.Discard, Stderr: io.Discard}, []string{"sleep", "60"})
		if err != nil {
			t.Fatal(err)
		}
		want := "packet"
		if link == LinkAuto {
			want = "tap" // root opens /dev/net/tun
		}
		if got := s.nw.info().NetworkDriver.Link; got != want {
			t.Errorf("Link %s: /v1/info says the link is %q, want %q", link, got, want)
		}
		s.Close()
	}
}
