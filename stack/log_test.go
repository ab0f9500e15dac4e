package stack

import (
	"bytes"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"

	glog "gvisor.dev/gvisor/pkg/log"

	"github.com/gonetns/gonetns/tap/taptest"
)

// Taken at package init, as gVisor's own rate-limited loggers are (ipv4's
// martian packet logger): they hold the logger gVisor's init made.
var (
	initialLogger = glog.Log()
	earlyLogger   = glog.BasicRateLimitedLogger(time.Nanosecond)
)

// gVisor's messages, including those of loggers made before any stack
// started, go to the stack's logger at debug level and never to stderr.
func TestGVisorLogGoesToSlog(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	a, b := taptest.Pipe(false, 16)
	defer b.Close()
	st, err := New(Config{Device: a, MTU: 1500, Addresses: []netip.Prefix{netip.MustParsePrefix("10.0.2.2/24")}, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Start(); err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if glog.Log() != initialLogger {
		t.Error("gVisor's global logger was replaced: loggers taken before (rate-limited ones) still print to stderr")
	}
	if _, ok := initialLogger.Emitter.(gvisorEmitter); !ok {
		t.Errorf("gVisor's initial logger emits with %T", initialLogger.Emitter)
	}
	time.Sleep(time.Millisecond) // the rate limiter's one token per nanosecond
	earlyLogger.Infof("martian packet %d", 42)
	if out := buf.String(); !strings.Contains(out, "level=DEBUG") || !strings.Contains(out, "netstack: martian packet 42") {
		t.Errorf("logged %q, want the message at debug level", out)
	}

	// Without debug, gVisor's Info messages are not even formatted.
	quiet := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelInfo}))
	routeGVisorLog(quiet)
	defer routeGVisorLog(log)
	if initialLogger.IsLogging(glog.Info) {
		t.Error("gVisor logs at Info with a logger that does not want debug")
	}
}
