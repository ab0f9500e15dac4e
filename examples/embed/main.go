// Command embed runs commands in a gonetns sandbox from a Go program, with
// no gonetns binary installed: the sandbox package is the whole of it.
//
// It starts a web server on the host's loopback, then runs two commands as
// root in a sandbox: `id -u`, which prints 0, and a fetch of the server's
// page through 10.0.2.2, the sandbox's address for the host's loopback.
// The fetch is this program again (its "fetch" mode), so the example needs
// no curl.
//
//	go build -o embed ./examples/embed && ./embed
package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/gonetns/gonetns/sandbox"
)

func main() {
	// First thing: in the sandbox's re-executed child this runs the child
	// and exits.
	sandbox.Init()
	if len(os.Args) == 3 && os.Args[1] == "fetch" {
		os.Exit(fetch(os.Args[2]))
	}
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "embed:", err)
		os.Exit(1)
	}
}

func run() error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer ln.Close()
	go http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from the host, %s\n", r.RemoteAddr)
	}))
	port := ln.Addr().(*net.TCPAddr).Port

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var out strings.Builder
	code, err := sandbox.Run(ctx, sandbox.Config{Stdout: &out}, []string{"id", "-u"})
	if err != nil {
		return err
	}
	fmt.Printf("id -u in the sandbox: %s (exit %d)\n", strings.TrimSpace(out.String()), code)

	self, err := os.Executable()
	if err != nil {
		return err
	}
	out.Reset()
	url := fmt.Sprintf("http://10.0.2.2:%d/", port)
	code, err = sandbox.Run(ctx, sandbox.Config{Stdout: &out}, []string{self, "fetch", url})
	if err != nil {
		return err
	}
	fmt.Printf("GET %s from the sandbox: %s(exit %d)\n", url, out.String(), code)
	return nil
}

// fetch prints the page at url; it runs inside the sandbox.
func fetch(url string) int {
	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer resp.Body.Close()
	io.Copy(os.Stdout, resp.Body)
	return 0
}
