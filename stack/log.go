package stack

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	glog "gvisor.dev/gvisor/pkg/log"
)

// gVisor logs through its own global logger, to stderr in glog format by
// default. Its messages (e.g. "martian packet dropped") are about single
// packets, so they go to the most recently started stack's logger at
// debug level, whatever gVisor's level.
//
// The global logger is changed in place, not replaced with
// glog.SetTarget: gVisor's rate-limited loggers (ipv4's martian packet
// logger, the stack's raw-socket one) are package variables that took the
// logger gVisor's init made, and kept printing to stderr, at Info, after
// SetTarget had installed another one.
var (
	gvisorLogOnce sync.Once
	gvisorLogTo   atomic.Pointer[slog.Logger]
)

type gvisorEmitter struct{}

func (gvisorEmitter) Emit(_ int, level glog.Level, _ time.Time, format string, v ...any) {
	l := gvisorLogTo.Load()
	if l == nil || !l.Enabled(context.Background(), slog.LevelDebug) {
		return
	}
	l.Debug("netstack: "+fmt.Sprintf(format, v...), "gvisor_level", level.String())
}

func routeGVisorLog(l *slog.Logger) {
	gvisorLogTo.Store(l)
	gvisorLogOnce.Do(func() {
		// Before any stack of ours handles a packet: nothing logs yet.
		glog.Log().Emitter = gvisorEmitter{}
	})
	// Below debug, gVisor need not even format its messages.
	if l.Enabled(context.Background(), slog.LevelDebug) {
		glog.Log().SetLevel(glog.Debug)
	} else {
		glog.Log().SetLevel(glog.Warning)
	}
}
