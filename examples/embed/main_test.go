package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"testing"
	"time"

	"github.com/gonetns/gonetns/internal/e2etest"
)

// The example, built and run as the unprivileged test user, prints 0 for
// `id -u` in the sandbox and the host's page fetched through 10.0.2.2.
func TestEmbedExample(t *testing.T) {
	e2etest.RequireTun(t)
	r := e2etest.Unprivileged(t)
	dir := r.TempDir(t)
	os.Chmod(dir, 0o755)
	bin := filepath.Join(dir, "embed")
	build := exec.Command("go", "build", "-o", bin, ".")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build ./examples/embed: %v\n%s", err, out)
	}
	r.Bin = bin
	res := r.MustRun(t, time.Minute)
	want := regexp.MustCompile(`(?m)^id -u in the sandbox: 0 \(exit 0\)\nGET http://10\.0\.2\.2:\d+/ from the sandbox: hello from the host, 127\.0\.0\.1:\d+\n\(exit 0\)\n$`)
	if !want.MatchString(res.Stdout) {
		t.Errorf("the example printed:\n%s", res)
	}
}
