// Package limitlog rate-limits the warnings that say a limit was reached:
// a flood of refused connections or flows gets one line every 10 s with
// the count, not one line each.
package limitlog

import (
	"log/slog"
	"sync"
	"time"
)

// Every is the shortest interval between two warnings of one Warner.
const Every = 10 * time.Second

// Warner logs a "limit reached" warning at most once every 10 s, with the
// number of events since the last one. The zero value is ready; it is safe
// for concurrent use.
type Warner struct {
	mu   sync.Mutex
	last time.Time
	n    int // events since the last warning
}

// Warn counts one event and logs msg with args and the count if the last
// warning is 10 s old or more.
func (w *Warner) Warn(log *slog.Logger, msg string, args ...any) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.n++
	if now := time.Now(); now.Sub(w.last) >= Every {
		log.Warn(msg, append(args, "events", w.n)...)
		w.last, w.n = now, 0
	}
}
