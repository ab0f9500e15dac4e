package userns

import (
	"os"
	"strings"
	"testing"
	"time"

	"github.com/gonetns/gonetns/internal/wire"
)

// Run as a gonetns child (Start re-executes /proc/self/exe, this test
// binary), the test binary plays a child that dies right after the parent
// told it to proceed, without ever answering.
func TestMain(m *testing.M) {
	if os.Getenv(envStage) == stageJoin {
		os.Exit(RunChild(joinTestHooks))
	}
	if IsChild() {
		ctl, err := wire.FileConn(os.NewFile(ctlFD, "control"))
		if err == nil {
			var msg message
			ctl.Recv(&msg)
		}
		os.Exit(3)
	}
	os.Exit(m.Run())
}

// A child that exits during setup must make Start fail with its story, not
// hang waiting for an answer that never comes.
func TestStartChildDiesDuringSetup(t *testing.T) {
	if os.Getuid() != 0 {
		t.Fatal("this test creates namespaces with the whole id space mapped and needs root: run `make test` as root")
	}
	sd, err := OpenStateDir(t.TempDir() + "/state")
	if err != nil {
		t.Fatal(err)
	}
	defer sd.Close()
	done := make(chan error, 1)
	go func() {
		c, err := Start(Options{Args: []string{"true"}, StateDir: sd, NewNet: true})
		if c != nil {
			c.Kill()
			c.Wait()
		}
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "exited during setup") || !strings.Contains(err.Error(), "exit status 3") {
			t.Errorf("Start with a dying child: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Start hung after its child died")
	}
}
