// Package backoff spaces out the retries of a loop whose accept or read
// keeps failing for a reason that may pass (out of descriptors, out of
// memory), as net/http's server does: wait, doubling, rather than spin.
package backoff

import "time"

// Backoff is the state of one loop. The zero value waits from 5 ms up to
// a second; set Min and Max to change that.
type Backoff struct {
	Min, Max time.Duration
	d        time.Duration
}

// Wait waits for the next, longer, interval, or until done is closed; it
// returns false in the latter case.
func (b *Backoff) Wait(done <-chan struct{}) bool {
	lo, hi := b.Min, b.Max
	if lo <= 0 {
		lo = 5 * time.Millisecond
	}
	if hi <= 0 {
		hi = time.Second
	}
	b.d = min(max(2*b.d, lo), hi)
	t := time.NewTimer(b.d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-done:
		return false
	}
}

// Current is the interval Wait waited last (for log messages).
func (b *Backoff) Current() time.Duration { return b.d }

// Reset starts over after a success.
func (b *Backoff) Reset() { b.d = 0 }
