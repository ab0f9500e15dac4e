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

// gVisor logs through its own global logger, to stderr by default. Its
// messages (e.g. "martian packet dropped") are about single packets, so
// they go to the most recently started stack's logger at debug level.
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
	gvisorLogOnce.Do(func() { glog.SetTarget(gvisorEmitter{}) })
	// Below debug, gVisor need not even format its messages.
	if l.Enabled(context.Background(), slog.LevelDebug) {
		glog.SetLevel(glog.Debug)
	} else {
		glog.SetLevel(glog.Warning)
	}
}
