package main

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gonetns/gonetns/internal/e2etest"
)

// kitRunner runs one implementation of rootlesskit (and its rootlessctl)
// as the unprivileged test user: the behaviour tests below run the same
// scenario against gonetns and against RootlessKit v3.0.1, and both must
// come out as RootlessKit does.
type kitRunner struct {
	name        string
	kit         e2etest.Runner // rootlesskit
	rootlessctl string         // its rootlessctl, for use inside
}

func kitRunners(t *testing.T) []kitRunner {
	t.Helper()
	u := e2etest.Unprivileged(t)
	ref := e2etest.ReferenceKit(t, e2etest.RootlessKitV3Dir)
	rk := u
	rk.Bin = ref.Prog["rootlesskit"]
	return []kitRunner{
		{name: "gonetns", kit: u.As(t, "rootlesskit"), rootlessctl: u.As(t, "rootlessctl").Bin},
		{name: "rootlesskit-v3.0.1", kit: rk, rootlessctl: ref.Prog["rootlessctl"]},
	}
}

// A child address in brackets may be IPv4, as RootlessKit's parser allows:
// -p [::]:P:[127.0.0.1]:80/tcp6 forwards IPv6 clients to an IPv4 server
// inside, and /tcp does the same for both families.
func TestRootlessKitBracketedIPv4ChildAddress(t *testing.T) {
	e2etest.RequireTun(t)
	for _, k := range kitRunners(t) {
		t.Run(k.name, func(t *testing.T) {
			p6, pBoth := freeTCPPort(t), freeTCPPort(t)
			ctx, cancel := context.WithTimeout(context.Background(), netTimeout)
			defer cancel()
			state := filepath.Join(k.kit.TempDir(t), "state")
			cmd := k.kit.Command(ctx, "--state-dir="+state, "--net=slirp4netns", "--port-driver=builtin",
				"-p", fmt.Sprintf("[::]:%d:[127.0.0.1]:8000/tcp6", p6),
				"-p", fmt.Sprintf("[::]:%d:[127.0.0.1]:8000/tcp", pBoth),
				"sh", "-c", "exec "+e2etest.HelperCmd(t, "http-serve", "127.0.0.1:8000"))
			var errOut strings.Builder
			cmd.Stderr = &errOut
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			defer func() { cmd.Process.Kill(); cmd.Wait() }()
			for _, url := range []string{
				fmt.Sprintf("http://[::1]:%d/", p6),
				fmt.Sprintf("http://[::1]:%d/", pBoth),
				fmt.Sprintf("http://127.0.0.1:%d/", pBoth),
			} {
				if body := httpGetRetry(t, url, 20*time.Second); body != "hello from inside\n" {
					t.Errorf("GET %s: %q\nstderr:\n%s", url, body, errOut.String())
				}
			}
			// tcp6 listens on IPv6 only.
			if c, err := net.DialTimeout("tcp4", fmt.Sprintf("127.0.0.1:%d", p6), 2*time.Second); err == nil {
				c.Close()
				t.Errorf("127.0.0.1:%d answered; a tcp6 port must listen on IPv6 only", p6)
			}
		})
	}
}
